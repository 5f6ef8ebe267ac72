# Stowage container image: `docker build -t stowage .`
#
# Stage 1 builds the release binary; stage 2 is a small distroless runtime (glibc, libgcc and
# CA certificates, no shell) running as an unprivileged user. Configuration comes from STOWAGE_*
# environment variables or a mounted TOML file (`--config`); data lives in /var/lib/stowage.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY benches ./benches
RUN cargo build --release --locked --bin stowage \
    && install -D -m 0755 target/release/stowage /out/stowage \
    && mkdir -p /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/stowage /usr/local/bin/stowage
# The data directory, owned by the image's non-root user (65532), so that a named volume
# mounted there starts out writable.
COPY --from=build --chown=65532:65532 /out/data /var/lib/stowage
USER 65532:65532
ENV STOWAGE_LISTEN=0.0.0.0:5000 \
    STOWAGE_DATA_DIR=/var/lib/stowage
EXPOSE 5000
VOLUME ["/var/lib/stowage"]
ENTRYPOINT ["/usr/local/bin/stowage"]
CMD ["serve"]
