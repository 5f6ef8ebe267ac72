//! Pull-through caching: repositories under a `[[proxy]]` prefix are read-only mirrors of an
//! upstream registry, filled on demand (the design: `docs/proxy.md`; the upstream client:
//! `crate::proxy`).
//!
//! What a pull of a proxied repository does, before the ordinary local read serves it:
//! - **by digest** (manifest or blob): served from the catalog if present; otherwise fetched,
//!   verified against the digest and stored, and from then on never re-checked;
//! - **blob not stored yet**: streamed to the clients that asked while it is fetched, verified
//!   and stored (the tee, [`tee`]: a spool file under `<data_dir>/proxy-spool`); a `Range` is
//!   served from the same tee; a `HEAD` asks the upstream's `HEAD` and fetches nothing;
//! - **manifest by tag**: served from the catalog while it was validated within the upstream's
//!   `tag_ttl`; after that an upstream `HEAD` compares digests, and a moved tag is fetched
//!   again. If the upstream cannot answer (down, rate-limiting, failing), the stale copy is
//!   served, with a warning and `stowage_proxy_stale_serves_total`; a tag never cached gets
//!   the upstream's error. A tag the upstream no longer has is `MANIFEST_UNKNOWN`.
//!
//! Invariants:
//! - Fetched content enters the catalog only through the paths pushes take
//!   ([`Registry::store_whole`] for blobs: staged, verified, published, linked;
//!   [`Registry::store_manifest`] for manifests), so every catalog invariant holds. A manifest
//!   is stored only after everything it references (child manifests, config, layers) has been
//!   stored: the catalog refuses a manifest whose references are missing, so the first pull of
//!   an image fetches the whole image, and of a multi-platform index every platform.
//! - Bytes whose digest does not match are never published (the staged upload is verified
//!   before it is published, and a manifest is hashed before it is parsed).
//! - One fetch at a time per key ([`Flights`]): concurrent requests for one blob, one manifest
//!   digest or one tag's re-validation share one upstream request. A fetch runs as its own
//!   task, so a client that disconnects does not abort a fetch others wait on (or that would
//!   fill the cache for the next one).
//! - A blob streamed from a tee ends cleanly only once it is verified and published; if the
//!   fetch fails, every client's body is cut (see [`tee`]). The fetch alone holds the upstream
//!   permit and the spool, so both are released when it ends, however slow its clients are;
//!   a client still reading then goes on from the stored blob. Only fetches a blob `GET`
//!   started or joined make a tee.
//! - A flight's key is removed by a guard in its task, so a panicking fetch is not joined for
//!   ever; a client joining a flight looks at its outcome before its tee.
//! - In read-only maintenance nothing is fetched: cached content is served as it is (tags
//!   without re-validation), anything else is answered 503 like a write.
//! - Spack: a proxied buildcache's `index.spack` is its upstream's merged with the specs
//!   cached here ([`spack`]); an upstream index is bounded and checked before it is stored.
//!   A hosted buildcache may name proxied repositories as fallbacks ([`merge`]).
//! - Pushes and deletes into a proxied repository are refused with 405 `UNSUPPORTED`
//!   ([`Registry::refuse_if_proxied`]); the access policy applies to pulls as for any
//!   repository (the HTTP layer checks it before the service is called).

pub mod lru;
mod merge;
mod spack;
mod tee;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use super::Registry;
use super::blobs::{BlobBody, ByteRange};
use crate::auth::Overwrite;
use crate::catalog::audit::Actor;
use crate::error::{Error, Internal, Result};
use crate::oci::{Digest, Reference, RepoName, Tag, manifest};
use crate::proxy::{Proxies, Upstream, UpstreamError, UpstreamManifest};
use tee::{SpoolError, Tee, TeeHandle};

pub use tee::sweep_spool_dir;

/// The directory under the data directory where blobs being fetched are spooled for the tee.
pub const SPOOL_DIR: &str = "proxy-spool";

/// Most levels of nested indexes followed below a manifest (an index of image manifests is 1).
const MAX_DEPTH: usize = 4;

/// Tags remembered as validated; beyond it the expired entries are dropped, then all.
const MAX_VALIDATED_TAGS: usize = 100_000;

/// Why a shared fetch failed: cloneable, since every waiter gets the outcome.
#[derive(Debug, Clone)]
enum FetchError {
    /// The upstream does not have it.
    NotFound,
    Upstream(UpstreamError),
    /// Storing failed here (already logged by the fetch).
    Local,
}

impl FetchError {
    fn into_error(self, not_found: impl FnOnce() -> Error) -> Error {
        match self {
            FetchError::NotFound => not_found(),
            FetchError::Upstream(u) => Error::Upstream(u),
            FetchError::Local => Error::Internal(Internal::Other("storing content fetched from the upstream failed")),
        }
    }
}

impl From<UpstreamError> for FetchError {
    fn from(e: UpstreamError) -> Self {
        FetchError::Upstream(e)
    }
}

type FetchResult = std::result::Result<(), FetchError>;
type Flight = Shared<BoxFuture<'static, FetchResult>>;

/// Where a blob fetch publishes its tee once the upstream has answered (`None` until then, and
/// for a fetch that does not tee: a blob linked from another repository, one whose length the
/// upstream did not announce, or one no blob `GET` asked for), and whether a blob `GET` wants
/// one (set by the `GET`s that start or join the fetch; read when the upstream answers).
#[derive(Clone)]
struct TeeSlot {
    tee: tokio::sync::watch::Receiver<Option<TeeHandle>>,
    wanted: Arc<std::sync::atomic::AtomicBool>,
}

/// Fetches in progress by key, each with what its waiters share besides the outcome (`X`);
/// each runs as a spawned task that removes its key when done.
struct Flights<X = ()> {
    running: Arc<Mutex<HashMap<String, (Flight, X)>>>,
}

impl<X> Default for Flights<X> {
    fn default() -> Self {
        Flights {
            running: Arc::default(),
        }
    }
}

impl Flights<()> {
    /// The fetch running for `key`, or `work` started as a new one.
    fn join<F>(&self, key: String, work: F) -> Flight
    where
        F: Future<Output = FetchResult> + Send + 'static,
    {
        self.join_with(key, || (work, ())).0
    }
}

impl<X: Clone + Send + 'static> Flights<X> {
    /// The fetch running for `key` with its shared value, or the work `start` makes started
    /// as a new one (`start` runs only then, under the table's lock).
    fn join_with<F>(&self, key: String, start: impl FnOnce() -> (F, X)) -> (Flight, X)
    where
        F: Future<Output = FetchResult> + Send + 'static,
    {
        let mut running = match self.running.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((flight, shared)) = running.get(&key) {
            return (flight.clone(), shared.clone());
        }
        let (work, shared) = start();
        let table = self.running.clone();
        let done_key = key.clone();
        // Spawned under the table's lock, so its removal cannot come before the insertion.
        // The key goes when the task ends, by a guard, so that a panicking fetch is not
        // joined for ever (and its tee and permit go with it).
        struct Remove<X> {
            table: Arc<Mutex<HashMap<String, (Flight, X)>>>,
            key: String,
        }
        impl<X> Drop for Remove<X> {
            fn drop(&mut self) {
                let mut running = match self.table.lock() {
                    Ok(r) => r,
                    Err(poisoned) => poisoned.into_inner(),
                };
                running.remove(&self.key);
            }
        }
        let task = tokio::spawn(async move {
            let _remove = Remove { table, key: done_key };
            work.await
        });
        let flight = async move {
            task.await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "a pull-through fetch task failed");
                Err(FetchError::Local)
            })
        }
        .boxed()
        .shared();
        running.insert(key, (flight.clone(), shared.clone()));
        (flight, shared)
    }
}

/// The pull-through state of a registry: the upstreams, fetches in flight, and when each
/// proxied tag was last validated.
pub(crate) struct ProxyState {
    proxies: Proxies,
    /// Where the tee spools blobs being fetched (`<data_dir>/proxy-spool`).
    spool_dir: PathBuf,
    blobs: Flights<TeeSlot>,
    manifests: Flights,
    tags: Flights,
    validated: Mutex<HashMap<String, Instant>>,
    /// Pulls served from the local copy, not yet written (see [`lru`]).
    pulls: lru::ProxyPulls,
    /// Upstream `index.spack` manifests refused (`repo@digest`), not checked again (see
    /// [`spack`]).
    rejected_indexes: Mutex<HashSet<String>>,
    /// `[[spack.merge]]`: hosted repositories and their fallbacks (see [`merge`]).
    spack_merge: merge::Fallbacks,
    /// Held while a Spack index is read whole to be checked or merged (see [`spack`]): a
    /// process-wide bound on the memory they take, whatever the number of proxies.
    spack_index_reads: tokio::sync::Semaphore,
}

impl ProxyState {
    pub(crate) fn new(proxies: Proxies, spool_dir: PathBuf) -> ProxyState {
        ProxyState {
            proxies,
            spool_dir,
            blobs: Flights::default(),
            manifests: Flights::default(),
            tags: Flights::default(),
            validated: Mutex::new(HashMap::new()),
            pulls: lru::ProxyPulls::default(),
            rejected_indexes: Mutex::new(HashSet::new()),
            spack_merge: HashMap::new(),
            spack_index_reads: tokio::sync::Semaphore::new(spack::INDEX_READS),
        }
    }

    /// Forgets that tags `tags` of `repo` were validated (they were evicted: the next pull
    /// must go upstream).
    fn forget_validated(&self, repo: &str, tags: &[String]) {
        if let Ok(mut v) = self.validated.lock() {
            for tag in tags {
                v.remove(&format!("{repo}:{tag}"));
            }
        }
    }

    fn is_fresh(&self, key: &str) -> bool {
        self.validated
            .lock()
            .ok()
            .and_then(|v| v.get(key).copied())
            .is_some_and(|until| until > Instant::now())
    }

    fn mark_fresh(&self, key: String, upstream: &Upstream) {
        let Some(until) = Instant::now().checked_add(upstream.tag_ttl()) else {
            return;
        };
        if let Ok(mut v) = self.validated.lock() {
            if v.len() >= MAX_VALIDATED_TAGS {
                let now = Instant::now();
                v.retain(|_, u| *u > now);
                if v.len() >= MAX_VALIDATED_TAGS {
                    v.clear();
                }
            }
            v.insert(key, until);
        }
    }
}

/// What [`Registry::fill_proxied_manifest`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Fill {
    /// Nothing: a hosted repository.
    Hosted,
    /// Nothing: the local copy is served as it is.
    Cached,
    /// Re-validated a tag or fetched: the digest the reference named here before (`None`:
    /// nothing). Serving that same digest is a pull of the local copy; another one was fetched.
    Checked(Option<String>),
}

impl Fill {
    /// Whether serving `digest` after this is a pull of content that was already cached.
    pub(super) fn served_cached(&self, digest: &str) -> bool {
        match self {
            Fill::Hosted => false,
            Fill::Cached => true,
            Fill::Checked(before) => before.as_deref() == Some(digest),
        }
    }
}

/// A proxied repository: the upstream and the repository's name there.
struct Route {
    upstream: Arc<Upstream>,
    name: String,
}

fn actor() -> Actor {
    Actor::system("pull-through cache")
}

impl Registry {
    /// Mirrors the upstreams of `proxies` under their prefixes, spooling blobs being fetched
    /// in `spool_dir` (see `tee`; swept at start-up by [`sweep_spool_dir`]).
    pub fn with_proxies(mut self, proxies: Proxies, spool_dir: &Path) -> Self {
        self.proxy = (!proxies.is_empty()).then(|| Arc::new(ProxyState::new(proxies, spool_dir.to_owned())));
        self
    }

    /// Backs hosted Spack buildcaches with the proxied repositories `[[spack.merge]]` names
    /// (see [`merge`]); after [`Registry::with_proxies`] (the fallbacks are proxied, so a
    /// validated configuration with entries has proxies).
    pub fn with_spack_merge(mut self, entries: &[crate::config::SpackMergeConfig]) -> Result<Self> {
        if entries.is_empty() {
            return Ok(self);
        }
        let fallbacks = merge::fallbacks(entries)?;
        let Some(state) = self.proxy.take() else {
            return Err(Error::Internal(Internal::Other(
                "[[spack.merge]] needs [[proxy]] entries",
            )));
        };
        let mut state = Arc::try_unwrap(state)
            .map_err(|_| Error::Internal(Internal::Other("the pull-through state is shared already")))?;
        state.spack_merge = fallbacks;
        self.proxy = Some(Arc::new(state));
        Ok(self)
    }

    fn route(&self, repo: &RepoName) -> Option<Route> {
        let state = self.proxy.as_ref()?;
        state
            .proxies
            .route(repo)
            .map(|(upstream, name)| Route { upstream, name })
    }

    /// The prefix of the `[[proxy]]` entry mirroring registry `namespace` (containerd's
    /// `?ns=`), if any.
    pub fn mirror_prefix(&self, namespace: &str) -> Option<String> {
        let state = self.proxy.as_ref()?;
        state.proxies.prefix_for_namespace(namespace).map(str::to_owned)
    }

    /// Whether `repo` is a pull-through mirror.
    pub fn is_proxied(&self, repo: &RepoName) -> bool {
        self.route(repo).is_some()
    }

    /// Forgets that tag `reference` of proxied `repo` was re-validated, so that the next fill
    /// asks the upstream (nothing for a digest or a hosted repository).
    pub(super) fn forget_proxied_tag(&self, repo: &RepoName, reference: &Reference) {
        if let (Some(state), Reference::Tag(tag)) = (&self.proxy, reference) {
            state.forget_validated(repo.as_str(), &[tag.to_string()]);
        }
    }

    /// Refuses a write into a proxied repository (405 `UNSUPPORTED`).
    pub(super) fn refuse_if_proxied(&self, repo: &RepoName) -> Result<()> {
        if self.is_proxied(repo) {
            return Err(Error::Unsupported(
                "the repository is a pull-through cache of an upstream registry and is read-only",
            ));
        }
        Ok(())
    }

    /// Makes sure a blob of a proxied repository is stored, fetching it if needed. Returns
    /// whether `repo` is proxied (false: nothing was done).
    pub(super) async fn fill_proxied_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        let Some(route) = self.route(repo) else {
            return Ok(false);
        };
        // Read-only maintenance: nothing is written, so only what is cached is served.
        if self.is_read_only() {
            return Err(Error::ReadOnly);
        }
        self.fetch_blob(&route, repo, digest)
            .await
            .map_err(|e| e.into_error(|| Error::BlobUnknown(Some(digest.clone()))))?;
        Ok(true)
    }

    /// The size of a blob of a proxied repository that is not stored here, as the upstream's
    /// `HEAD` tells it: nothing is fetched (unless the upstream does not say the size, then the
    /// blob is fetched and stored). `Ok(None)` for a hosted repository.
    pub(super) async fn proxied_blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>> {
        let Some(route) = self.route(repo) else {
            return Ok(None);
        };
        if self.is_read_only() {
            return Err(Error::ReadOnly);
        }
        match route.upstream.head_blob(&route.name, digest).await {
            Ok(Some(Some(size))) => Ok(Some(size)),
            Ok(Some(None)) => {
                self.fill_proxied_blob(repo, digest).await?;
                self.catalog.blob_size(repo, digest).await
            }
            Ok(None) => Err(Error::BlobUnknown(Some(digest.clone()))),
            Err(e) => Err(Error::Upstream(e)),
        }
    }

    /// Serves a blob of a proxied repository that is not stored here from the tee of its fetch
    /// (started if none runs), as soon as the upstream has answered. `Ok(None)` when the
    /// caller should read it from the catalog: a hosted repository, or a fetch that ended
    /// without a tee (linked from another repository, or no length announced upstream).
    pub(super) async fn proxied_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobBody>> {
        let Some(route) = self.route(repo) else {
            return Ok(None);
        };
        if self.is_read_only() {
            return Err(Error::ReadOnly);
        }
        let not_found = || Error::BlobUnknown(Some(digest.clone()));
        let Some((flight, slot)) = self
            .blob_flight(&route, repo, digest, true)
            .await
            .map_err(|e| e.into_error(not_found))?
        else {
            return Ok(None);
        };
        let mut tee_rx = slot.tee;
        // The flight first: a fetch that has just failed answers with its error, not with a
        // tee that would cut the response at once.
        let teed = tokio::select! {
            biased;
            outcome = flight.clone() => {
                outcome.map_err(|e| e.into_error(not_found))?;
                None
            }
            tee = tee_rx.wait_for(Option::is_some) => tee.ok().and_then(|t| t.clone()),
        };
        let Some(tee) = teed.filter(|t| !t.failed()) else {
            // The fetch stored the blob without a tee (or ended before one was made), or the
            // tee was cut (the spool failed, or the fetch did): its outcome decides.
            flight.await.map_err(|e| e.into_error(not_found))?;
            return Ok(None);
        };
        let size = tee.size();
        let range = match range {
            None => None,
            Some(r) => Some(r.resolve(size).ok_or(Error::RangeNotSatisfiable { size })?),
        };
        let (start, end) = range.as_ref().map_or((0, size), |r| (r.start, r.end));
        let store = self.store.clone();
        let stored_digest = digest.clone();
        let stored: tee::StoredRead = Box::new(move |from, to| {
            async move {
                store
                    .get(&stored_digest, Some(from..to))
                    .await
                    .map_err(|e| std::io::Error::other(format!("reading the stored blob: {e}")))
            }
            .boxed()
        });
        let body = tee.reader(start, end, stored);
        tracing::debug!(repo = %repo, digest = %digest, start, end, "serving a blob from the tee of its fetch");
        Ok(Some(BlobBody {
            size,
            range,
            body: Box::pin(body),
        }))
    }

    /// Brings the local copy of a proxied manifest up to date before it is served (see the
    /// module doc); does nothing for a hosted repository. Says what it did, so that the caller
    /// records a pull only of content served from the local copy ([`lru`]).
    pub(super) async fn fill_proxied_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<Fill> {
        let Some(route) = self.route(repo) else {
            return Ok(Fill::Hosted);
        };
        // Read-only maintenance: nothing is written, so only what is cached is served (a
        // cached tag as it is, without re-validation).
        if self.is_read_only() {
            return match self.catalog.manifest(repo, reference, false).await? {
                Some(_) => Ok(Fill::Cached),
                None => Err(Error::ReadOnly),
            };
        }
        match reference {
            Reference::Digest(d) => {
                if self.catalog.manifest(repo, reference, false).await?.is_some() {
                    return Ok(Fill::Cached);
                }
                self.fetch_manifest(&route, repo, d, 0)
                    .await
                    .map_err(|e| e.into_error(|| Error::ManifestUnknown))?;
                Ok(Fill::Checked(None))
            }
            Reference::Tag(tag) => self.revalidate_tag(&route, repo, tag).await,
        }
    }

    async fn revalidate_tag(&self, route: &Route, repo: &RepoName, tag: &Tag) -> Result<Fill> {
        let Some(state) = self.proxy.clone() else {
            return Ok(Fill::Hosted);
        };
        let key = format!("{repo}:{tag}");
        if state.is_fresh(&key) {
            return Ok(Fill::Cached);
        }
        // Once per `tag_ttl`: what the tag named here before, to tell a pull of the local copy
        // from a fetch.
        let before = self
            .catalog
            .manifest(repo, &Reference::Tag(tag.clone()), false)
            .await?
            .map(|m| m.digest);
        let flight = {
            let (reg, repo, tag, upstream, name, key) = (
                self.clone(),
                repo.clone(),
                tag.clone(),
                route.upstream.clone(),
                route.name.clone(),
                key.clone(),
            );
            state.tags.join(key.clone(), async move {
                let route = Route { upstream, name };
                reg.refresh_tag(&route, &repo, &tag).await?;
                if let Some(state) = &reg.proxy {
                    state.mark_fresh(key, &route.upstream);
                }
                Ok(())
            })
        };
        match flight.await {
            Ok(()) => Ok(Fill::Checked(before)),
            Err(FetchError::NotFound) => Err(Error::ManifestUnknown),
            Err(e) => {
                let cached = self.catalog.manifest(repo, &Reference::Tag(tag.clone()), false).await?;
                match cached {
                    Some(_) => {
                        let why = e.clone().into_error(|| Error::ManifestUnknown);
                        tracing::warn!(
                            repo = %repo, tag = %tag, upstream = route.upstream.prefix(), error = %why,
                            "serving a stale proxied tag: the upstream could not re-validate it"
                        );
                        crate::metrics::get()
                            .proxy_stale_serves
                            .get_or_create(&crate::metrics::UpstreamOnlyLabels {
                                upstream: route.upstream.prefix().to_owned(),
                            })
                            .inc();
                        Ok(Fill::Checked(before))
                    }
                    None => Err(e.into_error(|| Error::ManifestUnknown)),
                }
            }
        }
    }

    /// Compares the tag's digest here and upstream, and fetches it again if it moved.
    async fn refresh_tag(&self, route: &Route, repo: &RepoName, tag: &Tag) -> FetchResult {
        let reference = Reference::Tag(tag.clone());
        let local = self
            .catalog
            .manifest(repo, &reference, false)
            .await
            .map_err(|e| local_failure(e, repo, "reading the catalog"))?
            .map(|m| m.digest);
        let Some(remote) = route.upstream.head_manifest(&route.name, tag.as_str()).await? else {
            return Err(FetchError::NotFound);
        };
        if let (Some(local), Some(remote)) = (&local, &remote)
            && local.as_str() == remote.to_string()
        {
            return Ok(());
        }
        // The upstream still names a Spack index refused before: not fetched again, and the
        // tag counts as re-validated for `tag_ttl` (its stale copy is served meanwhile), so
        // that every read does not cost the upstream a HEAD and a GET.
        if let (Some(remote), Some(state)) = (&remote, &self.proxy)
            && let Some(refused) = self.refused_spack_index(route, repo, tag, remote)
        {
            state.mark_fresh(format!("{repo}:{tag}"), &route.upstream);
            return Err(refused);
        }
        let fetched = route
            .upstream
            .get_manifest(&route.name, &reference, self.settings.max_manifest_size)
            .await?
            .ok_or(FetchError::NotFound)?;
        if local.as_deref() == Some(fetched.digest.to_string().as_str()) {
            return Ok(());
        }
        tracing::info!(repo = %repo, tag = %tag, digest = %fetched.digest, "proxied tag fetched from the upstream");
        self.store_fetched_manifest(route, repo, fetched, Some(tag.clone()), 0)
            .await
    }

    /// Fetches a manifest by digest (one fetch per repository and digest at a time).
    fn fetch_manifest<'a>(
        &'a self,
        route: &'a Route,
        repo: &'a RepoName,
        digest: &'a Digest,
        depth: usize,
    ) -> BoxFuture<'a, FetchResult> {
        async move {
            let Some(state) = self.proxy.clone() else {
                return Ok(());
            };
            let (reg, repo2, digest2, upstream, name) = (
                self.clone(),
                repo.clone(),
                digest.clone(),
                route.upstream.clone(),
                route.name.clone(),
            );
            state
                .manifests
                .join(format!("{repo}@{digest}"), async move {
                    let route = Route { upstream, name };
                    let reference = Reference::Digest(digest2.clone());
                    let present = reg
                        .catalog
                        .manifest(&repo2, &reference, false)
                        .await
                        .map_err(|e| local_failure(e, &repo2, "reading the catalog"))?;
                    if present.is_some() {
                        return Ok(());
                    }
                    let fetched = route
                        .upstream
                        .get_manifest(&route.name, &reference, reg.settings.max_manifest_size)
                        .await?
                        .ok_or(FetchError::NotFound)?;
                    reg.store_fetched_manifest(&route, &repo2, fetched, None, depth).await
                })
                .await
        }
        .boxed()
    }

    /// Stores a fetched manifest after everything it references.
    async fn store_fetched_manifest(
        &self,
        route: &Route,
        repo: &RepoName,
        fetched: UpstreamManifest,
        tag: Option<Tag>,
        depth: usize,
    ) -> FetchResult {
        let invalid = |reason: String| {
            FetchError::Upstream(UpstreamError::Invalid {
                upstream: route.upstream.url().to_owned(),
                reason,
            })
        };
        if !Upstream::accepts(fetched.content_type.as_deref()) {
            return Err(invalid(format!(
                "manifest {} has the unsupported media type {:?}",
                fetched.digest,
                fetched.content_type.as_deref().unwrap_or_default()
            )));
        }
        let parsed = manifest::parse(&fetched.body, fetched.content_type.as_deref())
            .map_err(|e| invalid(format!("manifest {}: {e}", fetched.digest)))?;
        if !parsed.manifests.is_empty() && depth >= MAX_DEPTH {
            return Err(invalid(format!("manifest {} nests indexes too deeply", fetched.digest)));
        }
        // An upstream Spack index is bounded and checked before it replaces the one cached.
        let spack_index = tag.as_ref().is_some_and(|t| t.as_str() == crate::spack::INDEX_TAG);
        if spack_index {
            self.check_upstream_index(route, repo, &fetched.digest, &parsed, false)
                .await?;
        }
        let children = parsed
            .manifests
            .iter()
            .map(|d| self.fetch_manifest(route, repo, &d.digest, depth + 1));
        let blobs = parsed
            .required_blobs()
            .map(|d| self.fetch_blob(route, repo, &d.digest).boxed());
        futures_util::future::try_join_all(children.chain(blobs))
            .await
            .map_err(|e| match e {
                FetchError::NotFound => invalid(format!(
                    "manifest {} references content the upstream does not have",
                    fetched.digest
                )),
                other => other,
            })?;
        if spack_index {
            self.check_upstream_index(route, repo, &fetched.digest, &parsed, true)
                .await?;
        }
        let reference = match tag {
            Some(t) => Reference::Tag(t),
            None => Reference::Digest(fetched.digest.clone()),
        };
        let overwrite = Overwrite::Allowed {
            by: "pull-through cache".to_owned(),
        };
        match self
            .store_manifest(repo, reference, fetched.content_type, fetched.body, overwrite, &actor())
            .await
        {
            Ok(_) => Ok(()),
            Err(e @ (Error::ManifestInvalid(_) | Error::ManifestBlobUnknown(_) | Error::DigestMismatch { .. })) => {
                Err(invalid(e.to_string()))
            }
            Err(e) => Err(local_failure(e, repo, "storing a manifest")),
        }
    }

    /// Fetches a blob into `repo` unless it is there (one fetch per digest at a time).
    async fn fetch_blob(&self, route: &Route, repo: &RepoName, digest: &Digest) -> FetchResult {
        match self.blob_flight(route, repo, digest, false).await? {
            Some((flight, _)) => flight.await,
            None => Ok(()),
        }
    }

    /// The fetch of a blob into `repo` (joined, or started), with the slot where it publishes
    /// its tee; `None` if the blob is stored already. `want_tee`: a blob `GET` asks (a fetch
    /// only a manifest needs makes no tee).
    async fn blob_flight(
        &self,
        route: &Route,
        repo: &RepoName,
        digest: &Digest,
        want_tee: bool,
    ) -> std::result::Result<Option<(Flight, TeeSlot)>, FetchError> {
        let Some(state) = self.proxy.clone() else {
            return Ok(None);
        };
        if self
            .catalog
            .blob_size(repo, digest)
            .await
            .map_err(|e| local_failure(e, repo, "reading the catalog"))?
            .is_some()
        {
            return Ok(None);
        }
        let (reg, repo, digest, upstream, name, spool_dir) = (
            self.clone(),
            repo.clone(),
            digest.clone(),
            route.upstream.clone(),
            route.name.clone(),
            state.spool_dir.clone(),
        );
        let key = format!("{repo}@{digest}");
        let joined = state.blobs.join_with(key, move || {
            let (tee_tx, tee_rx) = tokio::sync::watch::channel(None);
            let wanted = Arc::new(std::sync::atomic::AtomicBool::new(want_tee));
            let slot = TeeSlot {
                tee: tee_rx,
                wanted: wanted.clone(),
            };
            let work = async move {
                // Stored for another repository already: linked, not fetched again.
                if reg
                    .catalog
                    .mount_blob(&repo, &digest, None)
                    .await
                    .map_err(|e| local_failure(e, &repo, "linking a blob"))?
                    .is_some()
                {
                    return Ok(());
                }
                let started = Instant::now();
                let blob = upstream.get_blob(&name, &digest).await?.ok_or(FetchError::NotFound)?;
                let wanted = wanted.load(std::sync::atomic::Ordering::SeqCst);
                // Unknown length: stored, then served (no Content-Length to promise). No GET
                // waiting: stored only. A spool that cannot be made: stored, then served
                // from the store (the store is what matters).
                let spooled = match blob.length {
                    Some(length) if wanted => match Tee::create(&spool_dir, length).await {
                        Ok(spooled) => Some(spooled),
                        Err(e) => {
                            tracing::warn!(
                                repo = %repo, digest = %digest, error = %e,
                                "creating a proxy spool file failed; the blob is stored, then served"
                            );
                            None
                        }
                    },
                    _ => None,
                };
                let stored = match spooled {
                    Some((tee, handle, writer)) => {
                        // The fetch task owns the tee: the spool goes when the fetch ends, as
                        // the upstream permit (held by `blob`) does, whatever readers do.
                        tee_tx.send_replace(Some(handle));
                        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                        let stored = reg.store_whole(&repo, &digest, writer.wrap(blob.body, done_tx)).await;
                        // The wrapped body is dropped by now, and handed the writer back.
                        let (writer, spool_error) = done_rx.await.map_err(|_| {
                            local_failure(
                                Error::Internal(Internal::Other("the tee writer was lost")),
                                &repo,
                                "teeing a blob",
                            )
                        })?;
                        if let Some(SpoolError(e)) = spool_error {
                            tracing::warn!(
                                repo = %repo, digest = %digest, error = %e,
                                "the tee's spool failed: its clients were cut, the blob was still stored"
                            );
                        }
                        match &stored {
                            Ok(()) => writer.verified(),
                            Err(_) => writer.failed(),
                        }
                        drop(tee);
                        stored
                    }
                    None => reg.store_whole(&repo, &digest, blob.body).await,
                };
                match stored {
                    Ok(()) => {
                        tracing::info!(
                            repo = %repo, digest = %digest, upstream = upstream.prefix(),
                            duration_ms = started.elapsed().as_millis() as u64,
                            "blob fetched from the upstream"
                        );
                        Ok(())
                    }
                    Err(Error::DigestMismatch { actual, .. }) => {
                        tracing::warn!(
                            repo = %repo, digest = %digest, actual = %actual, upstream = upstream.prefix(),
                            "the upstream served a blob that does not match its digest; not stored"
                        );
                        Err(FetchError::Upstream(UpstreamError::DigestMismatch {
                            upstream: upstream.url().to_owned(),
                            expected: digest.clone(),
                        }))
                    }
                    Err(Error::BodyRead(reason)) => Err(FetchError::Upstream(UpstreamError::Unreachable {
                        upstream: upstream.url().to_owned(),
                        reason,
                    })),
                    Err(e) => Err(local_failure(e, &repo, "storing a blob")),
                }
            };
            (work, slot)
        });
        if want_tee {
            joined.1.wanted.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(Some(joined))
    }
}

/// Logs a local failure of a shared fetch once; its waiters get a generic internal error.
fn local_failure(e: Error, repo: &RepoName, what: &str) -> FetchError {
    tracing::error!(repo = %repo, error = %e, "pull-through cache: {what} failed");
    FetchError::Local
}
