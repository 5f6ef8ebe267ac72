//! The `index.spack` of a proxied Spack buildcache: the upstream's index merged with the specs
//! cached here (see `docs/proxy.md`, "Spack buildcaches").
//!
//! Two indexes live in a proxied repository that holds spec tags:
//! - the upstream's, fetched as the ordinary proxied tag `index.spack` (`tag_ttl`, single
//!   flight, a stale copy when the upstream cannot answer: [`Registry::fill_proxied_manifest`]).
//!   It is checked when it is fetched ([`Registry::check_upstream_index`]): its layer must be at
//!   most the entry's `max_spack_index_size` (looked at before the blob is fetched) and a
//!   Spack index (parsed, streaming, on the blocking pool). A refused one is never stored, so
//!   the tag keeps naming the last good index, which is served stale meanwhile; its digest is
//!   remembered so that it is not parsed again on every request.
//! - the merged one, built here: an untagged manifest of the same shape as a hosted index
//!   (a `{}` config, one layer of JSON), with one annotation, [`UPSTREAM_ANNOTATION`], naming
//!   the upstream index manifest it was built from (`none` without one). It is recorded as the
//!   repository's current Spack index (`spack_index.manifest_digest`, at the spec generation it
//!   read), so the collector and the size cap keep it and drop the one it replaces, as for a
//!   hosted index.
//!
//! Invariants:
//! - The merged index is rebuilt only when its inputs changed: the spec generation (bumped by
//!   every change to the repository's spec tags, i.e. by every spec fetched or evicted) or the
//!   upstream index's digest. Otherwise the manifest built last is served. Builds run one at a
//!   time per repository (the hosted index's lock), as a task of their own, so a client that
//!   goes away does not abandon one others wait for.
//! - A repository with no spec cached serves the upstream's index as it is (nothing to merge).
//! - A locally cached spec stays listed while its spec tag is cached, whatever the upstream
//!   index says; a spec the upstream lists is listed whether cached or not.
//! - The upstream index is held in memory once while merging (bounded by
//!   `max_spack_index_size`); the output is streamed into a staged upload. At most
//!   [`INDEX_READS`] indexes are read whole at a time in the process (checks and builds).
//! - A build never publishes from inputs older than those it could see: its sources are read
//!   again under the build lock, and a source replaced while it is read restarts the build.
//! - An upstream failure (down, refusing, an invalid or oversized index) never gives a 500: the
//!   merged index built last is served (with a warning and the stale-serve metric), or the
//!   upstream error (502) when there is none.

use bytes::Bytes;
use futures_util::StreamExt;

use super::super::Registry;
use super::{FetchError, Route};
use crate::catalog::ManifestRecord;
use crate::error::{Error, Internal, Result};
use crate::oci::{Algorithm, Digest, Reference, RepoName, Tag, manifest};
use crate::proxy::UpstreamError;
use crate::spack::INDEX_TAG;
use crate::spack::merge::{self, MergeError};

/// The annotation of a merged index manifest naming the upstream index manifest it merged.
pub const UPSTREAM_ANNOTATION: &str = "org.stowage.spack.upstream-index";

/// Pieces the merged index is written in.
const PIECE: usize = 1024 * 1024;

/// Pieces produced ahead of the upload they are written to.
const PIECES_AHEAD: usize = 16;

/// Spack indexes read whole at a time in the whole process (checks of a fetched upstream index
/// and merged builds): each holds up to `max_spack_index_size` (a hosted build with fallbacks
/// more), so this bounds their memory whatever the number of `[[proxy]]` entries.
pub(super) const INDEX_READS: usize = 2;

/// Attempts at a merged build whose source index was replaced (and deleted) while it was read.
const BUILD_ATTEMPTS: usize = 3;

/// Upstream index digests remembered as refused (per process); beyond it they are forgotten.
const MAX_REJECTED: usize = 1024;

/// An index manifest merged into another repository's index.
pub(super) struct Source {
    /// The repository holding the manifest.
    pub(super) repo: RepoName,
    pub(super) digest: String,
    /// Largest index blob read.
    pub(super) max: u64,
    /// The upstream it came from (named in errors).
    pub(super) upstream: String,
}

impl Source {
    /// Stands for "no source" in an error message.
    fn none(repo: &RepoName) -> Source {
        Source {
            repo: repo.clone(),
            digest: String::new(),
            max: 0,
            upstream: String::new(),
        }
    }
}

/// A failed merge as an error: the source's fault is an upstream error (502, or the stale
/// copy), anything else internal.
fn merge_failure(e: MergeError, repo: &RepoName, source: &Source) -> Error {
    match e {
        MergeError::Primary(reason) => {
            tracing::warn!(repo = %repo, source = %source.repo, reason = %reason, "a Spack index to merge is invalid");
            Error::Upstream(UpstreamError::Invalid {
                upstream: source.upstream.clone(),
                reason: format!("index.spack is not a valid Spack index: {reason}"),
            })
        }
        MergeError::Secondary(_) => Error::Internal(Internal::Other("the local Spack index could not be read")),
        MergeError::Output(_) => Error::Internal(Internal::Other("writing the merged Spack index failed")),
    }
}

pub(super) fn index_tag() -> Reference {
    // A constant that is a valid tag: parsing cannot fail.
    Reference::Tag(
        INDEX_TAG
            .parse::<Tag>()
            .unwrap_or_else(|_| unreachable!("index.spack is a valid tag")),
    )
}

impl Registry {
    /// `index.spack` of proxied `repo`: the merged index, built first if its inputs changed.
    /// `Ok(None)`: a hosted repository, or no spec cached here (the caller serves the
    /// upstream's index as the ordinary proxied tag).
    pub(in crate::registry) async fn proxied_spack_index(
        &self,
        repo: &RepoName,
        with_content: bool,
    ) -> Result<Option<ManifestRecord>> {
        let Some(route) = self.route(repo) else {
            return Ok(None);
        };
        if self.catalog.spack_index_state(repo).await?.is_none() {
            return Ok(None);
        }
        let tag = index_tag();
        let (upstream, inputs) = match self.fill_proxied_manifest(repo, &tag).await {
            Ok(_) => {
                let digest = self.catalog.manifest(repo, &tag, false).await?.map(|m| m.digest);
                let inputs = digest.clone().unwrap_or_else(|| "none".to_owned());
                (digest, inputs)
            }
            // The upstream has no index: the specs cached here are the whole index.
            Err(Error::ManifestUnknown) => (None, "none".to_owned()),
            Err(e) => match self
                .stale_merged_index(repo, route.upstream.prefix(), with_content, e)
                .await
            {
                Ok(stale) => return Ok(stale),
                // Nothing built before and no upstream index cached: the specs cached here
                // are served alone (rebuilt once the upstream's index can be read).
                Err(e) => {
                    tracing::warn!(
                        repo = %repo, upstream = route.upstream.prefix(), error = %e,
                        "the upstream's Spack index is unavailable: the merged index lists the specs cached here only"
                    );
                    crate::metrics::get()
                        .proxy_stale_serves
                        .get_or_create(&crate::metrics::UpstreamOnlyLabels {
                            upstream: route.upstream.prefix().to_owned(),
                        })
                        .inc();
                    (None, UNAVAILABLE.to_owned())
                }
            },
        };
        if let Some(m) = self.current_merged_index(repo, &inputs, with_content).await? {
            return Ok(Some(m));
        }
        if self.is_read_only() {
            return self
                .stale_merged_index(repo, route.upstream.prefix(), with_content, Error::ReadOnly)
                .await;
        }
        let sources: Vec<Source> = upstream
            .into_iter()
            .map(|digest| Source {
                repo: repo.clone(),
                digest,
                max: route.upstream.max_spack_index_size(),
                upstream: route.upstream.url().to_owned(),
            })
            .collect();
        match self.build_merged_once(repo, sources, false, inputs).await {
            Ok(Some(digest)) => self.merged_manifest(repo, &digest, with_content).await,
            Ok(None) => Ok(None),
            Err(e @ Error::Upstream(_)) => {
                self.stale_merged_index(repo, route.upstream.prefix(), with_content, e)
                    .await
            }
            Err(e) => Err(e),
        }
    }

    /// The index manifest `digest` of `repo`.
    pub(super) async fn merged_manifest(
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

    /// Builds the merged index of `repo` from `sources` and its own specs in a task of its
    /// own, under the repository's build lock, unless a build from the same `inputs` is
    /// current by then. Returns the manifest's digest (`None`: no spec recorded here).
    ///
    /// Under the lock the sources are read again from the catalog ([`Self::sources_now`]): a
    /// caller that read them before waiting may hold digests another build has since replaced,
    /// and a build from older inputs must never replace a newer one (the catalog accepts an
    /// equal generation). A source replaced (and its manifest deleted) while it is read makes
    /// the build start again from the sources read afresh, a few times, then an upstream
    /// error (served as the stale copy), never a 500.
    pub(super) async fn build_merged_once(
        &self,
        repo: &RepoName,
        sources: Vec<Source>,
        prefer_local: bool,
        inputs: String,
    ) -> Result<Option<String>> {
        let (this, owned) = (self.clone(), repo.clone());
        tokio::spawn(async move {
            let _guard = this.spack_builds.lock(owned.as_str()).await?;
            let _permit = match this.proxy.as_ref() {
                Some(p) => Some(
                    p.spack_index_reads
                        .acquire()
                        .await
                        .map_err(|_| Error::Internal(Internal::Other("the Spack index semaphore is closed")))?,
                ),
                None => None,
            };
            let mut sources = sources;
            let mut inputs = inputs;
            for _ in 0..BUILD_ATTEMPTS {
                (sources, inputs) = this.sources_now(&owned, sources, prefer_local, inputs).await?;
                // Another reader may have built it while this one waited.
                if let Some(m) = this.current_merged_index(&owned, &inputs, false).await? {
                    return Ok(Some(m.digest));
                }
                match this.build_merged_index(&owned, &sources, prefer_local, &inputs).await? {
                    Built::Index(digest) => return Ok(Some(digest)),
                    Built::NoSpecs => return Ok(None),
                    Built::Vanished(source) => {
                        tracing::info!(repo = %owned, source = %source, "a Spack index being merged was replaced: merging again");
                    }
                }
            }
            Err(Error::Upstream(UpstreamError::Invalid {
                upstream: sources.first().map(|s| s.upstream.clone()).unwrap_or_default(),
                reason: "index.spack kept changing while it was merged".to_owned(),
            }))
        })
        .await?
    }

    /// `sources` (and their `inputs` string) as the catalog names them now: each source's
    /// digest replaced by the newer one its repository holds, if any (a proxied repository's
    /// upstream index tag; a fallback's current merged index, else its upstream index tag).
    /// A source whose repository holds none now keeps its digest.
    async fn sources_now(
        &self,
        repo: &RepoName,
        mut sources: Vec<Source>,
        hosted: bool,
        inputs: String,
    ) -> Result<(Vec<Source>, String)> {
        let mut changed = false;
        for source in &mut sources {
            let merged = if &source.repo == repo {
                None
            } else {
                self.catalog
                    .spack_index_state(&source.repo)
                    .await?
                    .and_then(|s| s.manifest_digest)
            };
            let now = match merged {
                Some(d) => Some(d),
                None => self
                    .catalog
                    .manifest(&source.repo, &index_tag(), false)
                    .await?
                    .map(|m| m.digest.to_string()),
            };
            if let Some(now) = now
                && now != source.digest
            {
                source.digest = now;
                changed = true;
            }
        }
        if !changed {
            return Ok((sources, inputs));
        }
        let inputs = inputs_of(&sources, hosted);
        Ok((sources, inputs))
    }

    /// The merged index built last, if it was built from the current spec generation and the
    /// upstream index `inputs` names.
    pub(super) async fn current_merged_index(
        &self,
        repo: &RepoName,
        inputs: &str,
        with_content: bool,
    ) -> Result<Option<ManifestRecord>> {
        let Some(state) = self.catalog.spack_index_state(repo).await? else {
            return Ok(None);
        };
        let (Some(digest), true) = (state.manifest_digest, state.built_generation == Some(state.generation)) else {
            return Ok(None);
        };
        let digest: Digest = digest.parse()?;
        let Some(mut m) = self.catalog.manifest(repo, &Reference::Digest(digest), true).await? else {
            return Ok(None);
        };
        if merged_from(m.content.as_deref().unwrap_or_default()).as_deref() != Some(inputs) {
            return Ok(None);
        }
        if !with_content {
            m.content = None;
        }
        Ok(Some(m))
    }

    /// The merged index built last, whatever its inputs, served because `why` kept a new one
    /// from being built; `why` itself when there is none.
    pub(super) async fn stale_merged_index(
        &self,
        repo: &RepoName,
        prefix: &str,
        with_content: bool,
        why: Error,
    ) -> Result<Option<ManifestRecord>> {
        let last = self
            .catalog
            .spack_index_state(repo)
            .await?
            .and_then(|s| s.manifest_digest);
        let Some(digest) = last else {
            return Err(why);
        };
        let digest: Digest = digest.parse()?;
        let Some(m) = self
            .catalog
            .manifest(repo, &Reference::Digest(digest), with_content)
            .await?
        else {
            return Err(why);
        };
        tracing::warn!(
            repo = %repo, upstream = prefix, error = %why,
            "serving the merged Spack index built last: a new one could not be built"
        );
        crate::metrics::get()
            .proxy_stale_serves
            .get_or_create(&crate::metrics::UpstreamOnlyLabels {
                upstream: prefix.to_owned(),
            })
            .inc();
        Ok(Some(m))
    }

    /// Builds the merged index of `repo` from the index manifests `sources` (in priority
    /// order) and the specs recorded here, and records it as the repository's current index.
    /// With `prefer_local` a hash listed here and in a source keeps this repository's spec,
    /// else the source's.
    async fn build_merged_index(
        &self,
        repo: &RepoName,
        sources: &[Source],
        prefer_local: bool,
        inputs: &str,
    ) -> Result<Built> {
        let started = std::time::Instant::now();
        // A source without a digest could not be read (`inputs` names it): left out.
        let sources: Vec<&Source> = sources.iter().filter(|s| !s.digest.is_empty()).collect();

        // The local index, from one catalog snapshot.
        let (to, mut from) = tokio::sync::mpsc::channel::<Bytes>(PIECES_AHEAD);
        let collect = async {
            let mut local = Vec::new();
            while let Some(piece) = from.recv().await {
                local.extend_from_slice(&piece);
            }
            local
        };
        let (snapshot, local) = tokio::join!(self.catalog.spack_index_stream(repo, PIECE, to), collect);
        let Some(snapshot) = snapshot? else {
            return Ok(Built::NoSpecs);
        };
        // Sources folded in one at a time, each under what was merged before (which wins a
        // hash in both when `prefer_local`); all but the last into memory, the last streamed.
        let mut merged_so_far = Bytes::from(local);
        let last = sources.len().saturating_sub(1);
        for source in sources.iter().take(last) {
            let Some(primary) = self.source_index(source).await? else {
                return Ok(Built::Vanished(source.repo.clone()));
            };
            let secondary = merged_so_far.clone();
            let folded = crate::metrics::spawn_blocking(move || {
                let mut out = Vec::new();
                merge::merge(&primary, &secondary, prefer_local, &mut |d: &[u8]| {
                    out.extend_from_slice(d);
                    Ok(())
                })
                .map(|_| out)
            })
            .await?;
            merged_so_far = Bytes::from(folded.map_err(|e| merge_failure(e, repo, source))?);
        }
        let primary = match sources.get(last) {
            Some(source) => match self.source_index(source).await? {
                Some(data) => data,
                None => return Ok(Built::Vanished(source.repo.clone())),
            },
            None => Bytes::from_static(br#"{"database":{"installs":{}}}"#),
        };
        let local = merged_so_far;

        let id = uuid::Uuid::new_v4();
        let mut writer = self.store.start_upload_kept_in_cache(id, Algorithm::Sha256).await?;
        let (to, from) = tokio::sync::mpsc::channel::<Bytes>(PIECES_AHEAD);
        let merging = crate::metrics::spawn_blocking(move || {
            let mut piece = Vec::with_capacity(PIECE);
            // Output is cut into pieces of exactly `PIECE` bytes, however large one write
            // (a spec) is.
            let mut out = |mut data: &[u8]| {
                while !data.is_empty() {
                    let take = data.len().min(PIECE - piece.len());
                    piece.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if piece.len() >= PIECE {
                        let full = std::mem::replace(&mut piece, Vec::with_capacity(PIECE));
                        to.blocking_send(Bytes::from(full))
                            .map_err(|_| "the index writer went away".to_owned())?;
                    }
                }
                Ok(())
            };
            let stats = merge::merge(&primary, &local, prefer_local, &mut out)?;
            if !piece.is_empty() {
                to.blocking_send(Bytes::from(piece))
                    .map_err(|_| MergeError::Output("the index writer went away".to_owned()))?;
            }
            Ok::<_, MergeError>(stats)
        });
        // The receiver is moved into the block, so that a failed write drops it: the merge task
        // then sees a closed channel instead of blocking in `blocking_send` for ever (holding
        // the build lock and a blocking thread).
        let store = async {
            let mut from = from;
            while let Some(piece) = from.recv().await {
                writer.write(piece).await?;
            }
            Ok::<_, Error>(())
        };
        let (merged, stored) = tokio::join!(merging, store);
        let stats = match (merged, stored) {
            (Ok(Ok(stats)), Ok(())) => stats,
            (_, Err(e)) => {
                writer.abort().await;
                return Err(e);
            }
            (Ok(Err(e)), Ok(())) => {
                writer.abort().await;
                return Err(match sources.get(last) {
                    Some(source) => merge_failure(e, repo, source),
                    None => merge_failure(e, repo, &Source::none(repo)),
                });
            }
            (Err(e), Ok(())) => {
                writer.abort().await;
                return Err(e.into());
            }
        };
        let (index_digest, index_size) = self.commit_as(repo, id, writer, None).await?;
        let digest = self
            .publish_index_manifest(
                repo,
                &index_digest,
                index_size,
                Some(serde_json::json!({ UPSTREAM_ANNOTATION: inputs })),
                snapshot.generation,
            )
            .await?;
        let m = crate::metrics::get();
        m.spack_builds.inc();
        m.spack_build_duration.observe(started.elapsed().as_secs_f64());
        tracing::info!(
            repo = %repo, digest = %digest, inputs, generation = snapshot.generation,
            last_source_entries = stats.primary, other_entries = stats.secondary_only, bytes = stats.bytes,
            duration_ms = started.elapsed().as_millis() as u64, "merged spack index built"
        );
        Ok(Built::Index(digest.to_string()))
    }

    /// The index blob of `source`, read whole (at most its `max`). `None`: its manifest is
    /// gone (replaced by a newer index since the source was read).
    async fn source_index(&self, source: &Source) -> Result<Option<Bytes>> {
        let Some(m) = self.merged_manifest(&source.repo, &source.digest, true).await? else {
            return Ok(None);
        };
        let layer =
            index_layer(m.content.as_deref().unwrap_or_default(), &m.media_type, source.max).map_err(|reason| {
                Error::Upstream(UpstreamError::Invalid {
                    upstream: source.upstream.clone(),
                    reason: format!("index.spack {}: {reason}", source.digest),
                })
            })?;
        match self.read_blob_bounded(&layer, source.max).await {
            Ok(data) => Ok(Some(data)),
            // The manifest was deleted (and its blob collected) while it was read.
            Err(Error::BlobUnknown(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A stored blob read whole, refused (as an invalid upstream answer) past `max` bytes.
    async fn read_blob_bounded(&self, layer: &Digest, max: u64) -> Result<Bytes> {
        let mut body = self.store.get(layer, None).await?;
        let mut data = Vec::new();
        while let Some(piece) = body.next().await {
            let piece = piece?;
            if (data.len() + piece.len()) as u64 > max {
                return Err(Error::Internal(Internal::Other(
                    "a stored upstream Spack index is larger than max_spack_index_size",
                )));
            }
            data.extend_from_slice(&piece);
        }
        Ok(Bytes::from(data))
    }

    /// The error for upstream index `digest` of proxied `repo` (tag `tag`) if it was refused
    /// before (see [`Self::check_upstream_index`]); `None` for any other tag or digest.
    pub(super) fn refused_spack_index(
        &self,
        route: &Route,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
    ) -> Option<FetchError> {
        if tag.as_str() != INDEX_TAG {
            return None;
        }
        let state = self.proxy.as_ref()?;
        let key = format!("{repo}@{digest}");
        if !state.rejected_indexes.lock().is_ok_and(|r| r.contains(&key)) {
            return None;
        }
        Some(FetchError::Upstream(UpstreamError::Invalid {
            upstream: route.upstream.url().to_owned(),
            reason: format!("index.spack {digest} was refused before"),
        }))
    }

    /// Checks a fetched upstream `index.spack` manifest of a proxied repository before its
    /// blobs are fetched (the layer's announced size) and, with `fetched`, after (the index is
    /// a Spack index). Refused indexes are remembered by digest and refused at once next time.
    pub(super) async fn check_upstream_index(
        &self,
        route: &Route,
        repo: &RepoName,
        digest: &Digest,
        parsed: &manifest::Manifest,
        fetched: bool,
    ) -> std::result::Result<(), FetchError> {
        let Some(state) = self.proxy.clone() else {
            return Ok(());
        };
        let key = format!("{repo}@{digest}");
        let refuse = |reason: String| {
            tracing::warn!(
                repo = %repo, digest = %digest, upstream = route.upstream.prefix(), reason = %reason,
                "the upstream's index.spack was refused"
            );
            if let Ok(mut r) = state.rejected_indexes.lock() {
                if r.len() >= MAX_REJECTED {
                    r.clear();
                }
                r.insert(key.clone());
            }
            FetchError::Upstream(UpstreamError::Invalid {
                upstream: route.upstream.url().to_owned(),
                reason: format!("index.spack {digest}: {reason}"),
            })
        };
        if state.rejected_indexes.lock().is_ok_and(|r| r.contains(&key)) {
            return Err(FetchError::Upstream(UpstreamError::Invalid {
                upstream: route.upstream.url().to_owned(),
                reason: format!("index.spack {digest} was refused before"),
            }));
        }
        let max = route.upstream.max_spack_index_size();
        let Some(layer) = parsed.layers.first() else {
            return Err(refuse("the manifest has no layer".to_owned()));
        };
        if layer.size > max {
            return Err(refuse(format!(
                "its index is {} bytes, more than max_spack_index_size ({max} bytes)",
                layer.size
            )));
        }
        if !fetched {
            return Ok(());
        }
        let Ok(_permit) = state.spack_index_reads.acquire().await else {
            return Err(super::local_failure(
                Error::Internal(Internal::Other("the Spack index semaphore is closed")),
                repo,
                "checking an upstream Spack index",
            ));
        };
        let data = match self.read_blob_bounded(&layer.digest, max).await {
            Ok(data) => data,
            Err(e) => return Err(super::local_failure(e, repo, "reading an upstream Spack index")),
        };
        let checked = crate::metrics::spawn_blocking(move || merge::validate(&data)).await;
        match checked {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(reason)) => Err(refuse(format!("not a valid Spack index: {reason}"))),
            Err(e) => Err(super::local_failure(e.into(), repo, "checking an upstream Spack index")),
        }
    }
}

/// The inputs of a merged index built while a source could not be read: never equal to a
/// digest, so the index is rebuilt once the source answers.
const UNAVAILABLE: &str = "unavailable";

/// What a merged build did.
enum Built {
    /// The manifest built and recorded.
    Index(String),
    /// No spec is recorded in the repository after all.
    NoSpecs,
    /// The source index of this repository was replaced (its manifest deleted) meanwhile.
    Vanished(RepoName),
}

/// The inputs annotation of a merged index built from `sources`: a proxied repository's
/// upstream index digest, or `<fallback>@<digest>,…` for a hosted one; `none` without any.
pub(super) fn inputs_of(sources: &[Source], hosted: bool) -> String {
    if sources.is_empty() {
        return "none".to_owned();
    }
    if hosted {
        // A fallback that could not be read (no digest) is named `<fallback>@unavailable`.
        sources
            .iter()
            .map(|s| match s.digest.as_str() {
                "" => format!("{}@{UNAVAILABLE}", s.repo),
                d => format!("{}@{d}", s.repo),
            })
            .collect::<Vec<_>>()
            .join(",")
    } else {
        sources.iter().map(|s| s.digest.clone()).collect::<Vec<_>>().join(",")
    }
}

/// The upstream index manifest named in a merged index manifest's annotation.
fn merged_from(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("annotations")?
        .get(UPSTREAM_ANNOTATION)?
        .as_str()
        .map(str::to_owned)
}

/// The index blob of an index manifest, if it is at most `max` bytes.
fn index_layer(body: &[u8], media_type: &str, max: u64) -> std::result::Result<Digest, String> {
    let parsed = manifest::parse(body, Some(media_type)).map_err(|e| e.to_string())?;
    let layer = parsed.layers.first().ok_or("the manifest has no layer")?;
    if layer.size > max {
        return Err(format!(
            "its index is {} bytes, more than max_spack_index_size ({max} bytes)",
            layer.size
        ));
    }
    Ok(layer.digest.clone())
}
