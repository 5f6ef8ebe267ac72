# Stowage container image.
#
#   docker build -t stowage .                       # from source (the `runtime` stage, the default)
#   docker build --target prebuilt --build-arg STOWAGE_BINARY=stowage -t stowage <dir>
#                                                   # a binary built elsewhere, named `stowage`,
#                                                   # in the build context <dir> (see below)
#
# Base images are build arguments, so the image also builds where no public registry can be
# reached: point BUILDER_IMAGE at a Rust toolchain image and RUNTIME_IMAGE at any image that has
# glibc's shared libraries and CA certificates (distroless/cc is that and nothing more; no shell
# or package manager is needed, since `stowage healthcheck` replaces curl).
#
# The image: the binary at /usr/local/bin/stowage running as the unprivileged UID/GID 10001
# (fixed, for file ownership on volumes and for Kubernetes' runAsUser); the data directory
# /var/lib/stowage (catalog, keys, and blobs with the fs backend) a VOLUME owned by that user;
# configuration from STOWAGE_* environment variables or a TOML file (`--config` or
# STOWAGE_CONFIG); a HEALTHCHECK that GETs /livez with `stowage healthcheck`.
#
# The `prebuilt` stage copies `${STOWAGE_BINARY}` (a path inside the build context) instead of
# compiling: the test suite builds the image that way from its own binary (tests/deploy.rs). The
# binary must be for the runtime image's glibc. The stages come in this order so that
# `--target prebuilt` never needs the toolchain image, even with Docker's legacy builder, which
# builds every stage before its target. For the same reason the from-source build needs a
# builder that skips unused stages: BuildKit (Docker's default since 23.0; DOCKER_BUILDKIT=1 on
# 20.10), Buildah or Podman. The legacy builder stops at the `prebuilt` stage without
# STOWAGE_BINARY.

ARG BUILDER_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:latest

# An empty data directory, to be copied in with its owner set (the runtime has no shell to
# mkdir/chown with).
FROM scratch AS datadir
WORKDIR /var/lib/stowage

# Everything but the binary.
FROM ${RUNTIME_IMAGE} AS base
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
# Where the source lives; set it when publishing (empty: the label is empty).
ARG SOURCE=
LABEL org.opencontainers.image.title="Stowage" \
      org.opencontainers.image.description="A self-hostable OCI registry built to be the best binary cache for package managers" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"
# Owned by the runtime user, so that a named volume mounted there starts out writable.
COPY --from=datadir --chown=10001:10001 /var/lib/stowage /var/lib/stowage
USER 10001:10001
ENV STOWAGE_LISTEN=0.0.0.0:5000 \
    STOWAGE_DATA_DIR=/var/lib/stowage
EXPOSE 5000
VOLUME ["/var/lib/stowage"]
# `stowage healthcheck` reads the same STOWAGE_* settings as `serve`, so it finds the port
# (and https) by itself.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/stowage", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/stowage"]
CMD ["serve"]

# A binary built elsewhere: `--target prebuilt --build-arg STOWAGE_BINARY=<path in the context>`
# (the file's name must be `stowage`; without it the `prebuilt` stage fails on /in/stowage).
# Dockerfile is copied too only so that the COPY has a source when STOWAGE_BINARY is not given.
FROM scratch AS prebuilt-binary
ARG STOWAGE_BINARY
COPY Dockerfile ${STOWAGE_BINARY} /in/

FROM base AS prebuilt
COPY --from=prebuilt-binary /in/stowage /usr/local/bin/stowage

# The release binary, from source.
FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY benches ./benches
RUN cargo build --release --locked --bin stowage \
    && install -D -m 0755 target/release/stowage /out/stowage

FROM base AS runtime
COPY --from=build /out/stowage /usr/local/bin/stowage
