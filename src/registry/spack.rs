//! The Spack buildcache index, served as `index.spack`.
//!
//! Pushes only record spec rows (see `catalog::spack`); the index blob is materialised here when
//! `index.spack` is read and the repository's spec tags changed since the last build. One build
//! runs at a time per repository and concurrent readers wait for it and share its result; an
//! unchanged index is served from the manifest already built.
//!
//! A build writes only the segments that changed since the last one, and the index is then a
//! composite blob of those and the runs already stored (`storage::composite`,
//! `catalog::spack::BuildMode`); a build that cannot reuse them builds in full.
//!
//! A proxied repository's index (the upstream's merged with the specs cached there) and a
//! hosted repository's with `[[spack.merge]]` fallbacks are built by `registry::proxy::spack`
//! and `registry::proxy::merge`; [`Registry::spack_index`] only dispatches to them.

use bytes::Bytes;

use super::Registry;
use super::locks::SharedGuard;
use crate::catalog::{BuildMode, INDEX_TRAILER, IndexRun, ManifestRecord, NewManifest, RunSource};
use crate::error::{Error, Internal, Result};
use crate::oci::{Algorithm, Digest, Reference, RepoName, manifest};
use crate::storage::composite::{self, Piece};

/// Size of the pieces the catalog scan sends. Small enough that the allocator reuses their
/// memory from piece to piece: pieces of a whole part (8 MiB) were fresh mappings each time, and
/// faulting in fresh pages cost more (~0.3 s at 500,000 specs here) than copying 1 MiB pieces
/// into the upload's pooled part buffers.
const INDEX_PIECE: usize = 1024 * 1024;

/// Index pieces serialised ahead of the upload they are written to: two parts' worth, so that
/// the catalog scan runs on while the writer hashes and writes a part (the scan and the hash
/// then take a core each instead of taking turns).
const INDEX_PIECES_AHEAD: usize = 16;

/// The 2-byte `{}` config of an index manifest, as Spack writes it.
const EMPTY_CONFIG: &[u8] = b"{}";

impl Registry {
    /// The current index manifest of a Spack build cache, building it first if the repository's
    /// spec tags changed since the last build. `None` when the repository holds no Spack specs.
    pub async fn spack_index(&self, repo: &RepoName, with_content: bool) -> Result<Option<ManifestRecord>> {
        // A pull-through cache merges the upstream's index with its cached specs.
        if self.is_proxied(repo) {
            return self.proxied_spack_index(repo, with_content).await;
        }
        // A hosted repository with fallbacks (`[[spack.merge]]`) lists theirs too.
        if let Some(fallbacks) = self.spack_fallbacks(repo) {
            return self.hosted_merged_index(repo, &fallbacks, with_content).await;
        }
        match self.current_spack_index(repo, with_content).await? {
            Current::NotSpack => return Ok(None),
            Current::Fresh(m) => return Ok(Some(m)),
            Current::Stale => {}
        }
        // Read-only: building would write; serve the index as last built, if there is one.
        if self.is_read_only() {
            let last = self
                .catalog
                .spack_index_state(repo)
                .await?
                .and_then(|s| s.manifest_digest);
            return match last {
                Some(digest) => match self.index_manifest(repo, &digest, with_content).await? {
                    Some(m) => Ok(Some(m)),
                    None => Err(Error::ReadOnly),
                },
                None => Err(Error::ReadOnly),
            };
        }
        // The build runs as a task of its own, so that a reader that goes away does not abandon
        // (and leave half-staged) a build that other readers are waiting for.
        let (this, owned) = (self.clone(), repo.clone());
        let built = tokio::spawn(async move { this.build_spack_index_once(&owned).await }).await??;
        match built {
            None => Ok(None),
            Some(digest) => self.index_manifest(repo, &digest, with_content).await,
        }
    }

    /// Builds the index unless another build made it current meanwhile; returns the current
    /// manifest's digest (`None`: the repository holds no Spack specs).
    async fn build_spack_index_once(&self, repo: &RepoName) -> Result<Option<String>> {
        let guard = self.spack_builds.lock(repo.as_str()).await?;
        // Another reader may have built it while this one waited.
        match self.current_spack_index(repo, false).await? {
            Current::NotSpack => Ok(None),
            Current::Fresh(m) => Ok(Some(m.digest)),
            Current::Stale => {
                let started = std::time::Instant::now();
                let built = self.build_spack_index(repo, &guard).await;
                if built.is_ok() {
                    let m = crate::metrics::get();
                    m.spack_builds.inc();
                    m.spack_build_duration.observe(started.elapsed().as_secs_f64());
                }
                built.map(Some)
            }
        }
    }

    async fn current_spack_index(&self, repo: &RepoName, with_content: bool) -> Result<Current> {
        let Some(state) = self.catalog.spack_index_state(repo).await? else {
            return Ok(Current::NotSpack);
        };
        match state.manifest_digest {
            Some(digest) if state.built_generation == Some(state.generation) => {
                // A client may have deleted the built manifest by digest: then build again.
                Ok(self
                    .index_manifest(repo, &digest, with_content)
                    .await?
                    .map_or(Current::Stale, Current::Fresh))
            }
            _ => Ok(Current::Stale),
        }
    }

    async fn index_manifest(
        &self,
        repo: &RepoName,
        digest: &str,
        with_content: bool,
    ) -> Result<Option<ManifestRecord>> {
        let digest: Digest = digest.parse()?;
        self.catalog
            .manifest(repo, &Reference::Digest(digest), with_content)
            .await
    }

    /// Builds the index and its manifest from one snapshot and records them as current: an
    /// incremental build first (see `catalog::spack::BuildMode`), and a full one when the
    /// incremental one cannot reuse what it named (the collector took a blob of the layout
    /// meanwhile, or a piece cannot be read back), or when the collector took the new index
    /// blob (or the empty config) between its publish and the manifest that names it. That last
    /// can happen to any build, only with a grace period of about zero, so a full build is
    /// tried up to [`BUILD_ATTEMPTS`] times in all.
    async fn build_spack_index(&self, repo: &RepoName, lock: &SharedGuard) -> Result<String> {
        let mut mode = BuildMode::Incremental;
        for attempt in 1.. {
            let why = match self.build_spack_index_as(repo, mode, lock).await {
                Ok(Built::Index(digest)) => return Ok(digest),
                Ok(Built::Retry(why)) => why,
                Err(Error::ManifestBlobUnknown(_)) => "the collector took a blob of the new index before its manifest",
                Err(e) => return Err(e),
            };
            if attempt >= BUILD_ATTEMPTS {
                return Err(Internal::Other(why).into());
            }
            tracing::warn!(repo = %repo, why, attempt, "a spack index build was not kept; building in full");
            mode = BuildMode::Full;
        }
        Err(Internal::Other("spack index build attempts ran out").into())
    }

    /// One build. What the catalog serialises (the header, the segments it writes, the
    /// trailer) is streamed into a staged upload and published as a plain blob; when the build
    /// reused runs of earlier builds, the index is the composite of that blob's runs and the
    /// reused ones (`storage::composite`), hashed by reading them back, and recorded with its
    /// pieces. [`Built::Retry`] when what an incremental build composed cannot be kept (see
    /// there); errors of the catalog or the store otherwise, which a full build would meet too.
    /// `lock` is the repository's build lock, held by the caller.
    async fn build_spack_index_as(&self, repo: &RepoName, mode: BuildMode, lock: &SharedGuard) -> Result<Built> {
        let started = std::time::Instant::now();
        let id = uuid::Uuid::new_v4();
        let mut writer = self.store.start_upload_kept_in_cache(id, Algorithm::Sha256).await?;
        let (to, from) = tokio::sync::mpsc::channel::<Bytes>(INDEX_PIECES_AHEAD);
        let serialise = self.catalog.spack_index_build(repo, INDEX_PIECE, to, mode);
        let store = async {
            // Owned here, so that a failed write closes the channel and stops the serialiser.
            let mut from = from;
            while let Some(piece) = from.recv().await {
                writer.write(piece).await?;
            }
            Ok::<_, Error>(())
        };
        let (built, stored) = tokio::join!(serialise, store);
        let built = match (built, stored) {
            (Ok(Some(built)), Ok(())) => built,
            // A write failure closes the channel, which fails the serialiser: report the cause.
            (_, Err(e)) | (Err(e), Ok(())) => {
                writer.abort().await;
                return Err(e);
            }
            (Ok(None), Ok(())) => {
                writer.abort().await;
                return Err(Error::ManifestUnknown);
            }
        };
        let streamed = started.elapsed();
        let (written, written_size) = self.commit_as(repo, id, writer, None).await?;
        let published = started.elapsed();
        let trailer = INDEX_TRAILER.len() as u64;
        let blob_of = |source: &RunSource| match source {
            RunSource::Written => Ok(written.clone()),
            RunSource::Stored(d) => d.parse::<Digest>(),
        };
        let mut pieces = vec![Piece {
            blob: written.clone(),
            start: 0,
            len: built.header,
        }];
        for run in &built.runs {
            pieces.push(Piece {
                blob: blob_of(&run.source)?,
                start: run.start,
                len: run.len,
            });
        }
        pieces.push(Piece {
            blob: written.clone(),
            start: written_size.saturating_sub(trailer),
            len: trailer,
        });
        let pieces = composite::coalesce(pieces);
        let plain = matches!(pieces.as_slice(), [p] if p.blob == written && p.start == 0 && p.len == written_size);
        if !plain && pieces.len() > MAX_PIECES {
            return Ok(Built::Retry("the composite index would have too many pieces"));
        }
        let (index_digest, index_size, recorded) = if plain {
            (written.clone(), written_size, None)
        } else {
            let (size, digest) = match composite::hash(&self.store, &pieces, Algorithm::Sha256).await {
                Ok(hashed) => hashed,
                Err(e) => {
                    tracing::warn!(repo = %repo, error = %e, "reading back the pieces of a spack index failed");
                    return Ok(Built::Retry("a piece of the composite index could not be read"));
                }
            };
            if size != composite::size(&pieces) {
                return Ok(Built::Retry("the pieces of the composite index read back short"));
            }
            (digest.clone(), size, Some((digest, size, pieces.clone())))
        };
        let hashed = started.elapsed();
        let layout = built
            .runs
            .iter()
            .map(|r| {
                let blob = blob_of(&r.source)?.to_string();
                Ok(IndexRun {
                    source: RunSource::Stored(blob),
                    ..r.clone()
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // With PostgreSQL, a build whose lock went with its connection may overlap another
        // replica's build of this repository: it records nothing (see `catalog::locks`).
        if lock.is_lost() {
            return Err(Internal::CatalogUnavailable("the Spack index build lost its database lock").into());
        }
        if !self
            .catalog
            .record_spack_build(repo, recorded, layout, built.marks.clone())
            .await?
        {
            return Ok(Built::Retry("a blob the index layout names was collected meanwhile"));
        }
        let snapshot = built.snapshot;
        let digest = self
            .publish_index_manifest(repo, &index_digest, index_size, None, snapshot.generation)
            .await?;
        tracing::info!(
            repo = %repo, digest = %digest, generation = snapshot.generation, specs = snapshot.specs,
            incremental = built.incremental, nodes_written = snapshot.nodes, bytes_written = snapshot.bytes,
            bytes = index_size, pieces = if plain { 1 } else { pieces.len() },
            streamed_ms = streamed.as_millis() as u64, published_ms = published.as_millis() as u64,
            hashed_ms = hashed.as_millis() as u64, duration_ms = started.elapsed().as_millis() as u64,
            "spack index built"
        );
        Ok(Built::Index(digest.to_string()))
    }

    /// Records the index manifest of a build: a `{}` config (stored if missing) and one
    /// layer, the index blob (`index_digest`, `index_size`, already stored), with
    /// `annotations` when given, marked as built from `generation`. Untagged: `index.spack`
    /// resolves to it through the catalog's index state. Returns the manifest's digest.
    pub(super) async fn publish_index_manifest(
        &self,
        repo: &RepoName,
        index_digest: &Digest,
        index_size: u64,
        annotations: Option<serde_json::Value>,
        generation: i64,
    ) -> Result<Digest> {
        let config_digest = Digest::sha256_of(EMPTY_CONFIG);
        if self.catalog.blob_size(repo, &config_digest).await?.is_none() {
            let body = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(EMPTY_CONFIG))]);
            self.store_whole(repo, &config_digest, body).await?;
        }
        let mut body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": EMPTY_CONFIG.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": index_digest.to_string(), "size": index_size}],
        });
        if let Some(annotations) = annotations {
            body["annotations"] = annotations;
        }
        let body = body.to_string().into_bytes();
        let digest = Digest::sha256_of(&body);
        let parsed = manifest::parse(&body, None)?;
        self.catalog
            .put_manifest(
                repo,
                NewManifest {
                    digest: digest.clone(),
                    content: body,
                    parsed,
                    tag: None,
                    spack: None,
                    platform: None,
                    spack_index_generation: Some(generation),
                },
                // Untagged: no tag to protect.
                self.settings
                    .immutable_tags
                    .for_repo(repo.as_str(), crate::auth::Overwrite::Refused),
                // Derived data the registry publishes itself: not audited.
                None,
            )
            .await?;
        Ok(digest)
    }
}

/// Builds of one index per request at most: the first (incremental) and full ones after it.
const BUILD_ATTEMPTS: u32 = 3;

/// Coalesced pieces a composite index may have: more (changes scattered over many segments,
/// runs alternating between blobs) and the build is a full one, so that serving or hashing the
/// index never takes more than this many store reads in a row.
const MAX_PIECES: usize = 64;

/// What one build did.
enum Built {
    /// Recorded: the index manifest's digest.
    Index(String),
    /// An incremental build whose composite cannot be kept: too many pieces, a piece that
    /// cannot be read back, or a blob the layout names that was collected meanwhile. A full
    /// build names no earlier blob, so it never ends this way.
    Retry(&'static str),
}

/// Where a repository's index stands when `index.spack` is read.
enum Current {
    /// The repository holds no Spack specs: `index.spack` is an ordinary tag there.
    NotSpack,
    /// The index built last is current.
    Fresh(ManifestRecord),
    /// Never built, out of date, or its manifest was deleted: build it.
    Stale,
}
