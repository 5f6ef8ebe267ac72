//! Size caps of the pull-through cache: recording when cached content is pulled, and evicting
//! the least recently pulled manifests of a `[[proxy]]` prefix whose `max_size` its content
//! exceeds (the design: `docs/proxy.md`, "Size cap").
//!
//! # Recording pulls
//!
//! A manifest `GET`/`HEAD` (by tag or digest) or a blob `GET` of a proxied repository that the
//! local copy serves calls [`ProxyPulls::record`]: one `HashMap` insert under a short mutex,
//! no I/O. The request that fetched the content does not count (its fetch time is the
//! manifest's `created_at`); hosted repositories never get here (the caller checks the route
//! first, a prefix comparison per `[[proxy]]` entry). A key written to the catalog within
//! [`GRANULARITY`] is not recorded again, so a hot manifest costs the catalog at most one
//! update a minute; the map holds at most [`MAX_PENDING`] keys: when it fills, the flusher is
//! woken at once, and new keys that arrive before it has taken the map are dropped. The server flushes it every [`FLUSH_EVERY`] in write jobs of at most [`FLUSH_BATCH`]
//! updates, at graceful stop, and at the start of each eviction step; a crash loses at most
//! [`FLUSH_EVERY`] of pulls. A stored time only moves forward. A manifest pull also counts for
//! the manifests of its repository that list it as a child, so that an index whose platform
//! manifest is pulled by digest (the eviction candidate is the index) looks used: every index
//! listing it, not only the one the client resolved (a pull by digest does not say), as a blob
//! pull counts for every manifest of the repository referencing the blob.
//!
//! # Evicting
//!
//! Each collection pass, before its normal sweep, runs [`Registry::evict_proxied`]: for each
//! prefix with `max_size`, the cached bytes are computed
//! ([`crate::catalog::Catalog::proxy_cached_bytes`]: distinct blobs referenced by the prefix's
//! manifests, counted once, plus the manifests' sizes), and while they exceed the cap the least
//! recently used manifest (the later of its fetch and its last pull; never-pulled first among
//! equals, then by fetch time; an index's children are not candidates of their own) is
//! deleted as a client `DELETE` by digest would delete it, with its tags, its untagged children
//! and referrers, each audited as `proxy.evict` by actor `gc`. The bytes it frees from the
//! figure are its manifests' sizes and the blobs no remaining manifest of the prefix
//! references. Its blobs are then collected by the same pass rules as any other unreferenced
//! link: they wait out `gc.grace_secs` (a client that was just given the manifest can still
//! fetch them), so the store holds up to `max_size` plus the evicted bytes still in their grace
//! period; the cap counts only what stays.
//!
//! Invariants:
//! - Eviction deletes catalog rows only through the same `DELETE FROM manifests` a client
//!   delete runs, in one write job per evicted manifest, so every trigger (repository figures,
//!   content epochs, link touch) and foreign key holds; it deletes no blob or link itself.
//! - An eviction deletes only the manifest its scan chose: the write job re-checks the row's
//!   repository and digest, since a row id freed and reused in between names another one.
//! - It deletes it only while it is still as recently used as the scan saw it: the write job
//!   re-checks its last use (`max(created_at, proxy_pulled_at)`), so a pull the flusher wrote
//!   during the pass saves it (a later scan orders it anew; a batch of candidates all skipped
//!   ends this prefix's step, and the next pass goes on). A pull still in the in-memory map,
//!   recorded after this step's flush, is not seen: it can be evicted within [`FLUSH_EVERY`]
//!   of its last pull, and is fetched again on its next one.
//! - Hosted repositories are never candidates: only repositories whose names start with a
//!   capped prefix are read.
//! - An evicted tag's "validated" mark is forgotten, so the next pull of it goes upstream
//!   instead of answering 404 from a fresh mark.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::super::Registry;
use super::super::gc::{Listing, Removed};
use crate::catalog::{Catalog, ProxyPull};
use crate::error::Result;
use crate::oci::RepoName;

/// A pull of a key written this recently is not recorded again.
pub const GRANULARITY: i64 = 60;
/// How often the server flushes recorded pulls.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// Most keys waiting for a flush; further new keys are dropped until the next one.
pub const MAX_PENDING: usize = 100_000;
/// Updates per write job.
pub const FLUSH_BATCH: usize = 1000;
/// Most keys remembered as written within [`GRANULARITY`].
const MAX_WRITTEN: usize = 200_000;
/// Candidates read per scan.
const CANDIDATES: usize = 100;

/// Pulls of proxied content not yet written to the catalog (see the module doc).
#[derive(Debug, Default)]
pub struct ProxyPulls {
    state: Mutex<PullState>,
    /// Woken when the map fills.
    full: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct PullState {
    /// Key -> the last time it was pulled, not yet written.
    pending: HashMap<ProxyPull, i64>,
    /// Key -> when this process last wrote it.
    written: HashMap<ProxyPull, i64>,
}

impl ProxyPulls {
    /// Notes a pull at unix second `now`: one short lock, no I/O.
    pub fn record(&self, pull: ProxyPull, now: i64) {
        let Ok(mut state) = self.state.lock() else { return };
        if state.written.get(&pull).is_some_and(|&at| now - at < GRANULARITY) {
            return;
        }
        if state.pending.len() >= MAX_PENDING && !state.pending.contains_key(&pull) {
            return;
        }
        state.pending.insert(pull, now);
        if state.pending.len() == MAX_PENDING {
            self.full.notify_one();
        }
    }

    /// Writes the pending pulls; returns how many rows changed. Pulls whose write failed stay
    /// pending for the next flush.
    pub async fn flush(&self, catalog: &Catalog) -> Result<u64> {
        let pending: Vec<(ProxyPull, i64)> = match self.state.lock() {
            Ok(mut state) => state.pending.drain().collect(),
            Err(_) => return Ok(0),
        };
        let mut written = 0;
        let mut chunks = pending.chunks(FLUSH_BATCH);
        while let Some(batch) = chunks.next() {
            match catalog.record_proxy_pulls(batch.to_vec()).await {
                Ok(n) => {
                    written += n;
                    if let Ok(mut state) = self.state.lock() {
                        if state.written.len() + batch.len() > MAX_WRITTEN {
                            let now = crate::catalog::now();
                            state.written.retain(|_, at| now - *at < GRANULARITY);
                            if state.written.len() + batch.len() > MAX_WRITTEN {
                                state.written.clear();
                            }
                        }
                        state.written.extend(batch.iter().cloned());
                    }
                }
                Err(e) => {
                    if let Ok(mut state) = self.state.lock() {
                        for (pull, at) in batch.iter().cloned().chain(chunks.flatten().cloned()) {
                            let entry = state.pending.entry(pull).or_insert(at);
                            *entry = (*entry).max(at);
                        }
                    }
                    return Err(e);
                }
            }
        }
        if let Ok(mut state) = self.state.lock() {
            let now = crate::catalog::now();
            state.written.retain(|_, at| now - *at < GRANULARITY);
        }
        Ok(written)
    }

    /// Keys waiting for a flush.
    pub fn pending(&self) -> usize {
        self.state.lock().map(|s| s.pending.len()).unwrap_or(0)
    }
}

impl Registry {
    /// Notes that the local copy of a proxied manifest was served; nothing for a hosted
    /// repository.
    pub(crate) fn record_proxy_manifest_pull(&self, repo: &RepoName, digest: &str) {
        if let Some(state) = &self.proxy
            && state.proxies.route(repo).is_some()
        {
            let pull = ProxyPull::Manifest {
                repo: repo.to_string(),
                digest: digest.to_owned(),
            };
            state.pulls.record(pull, crate::catalog::now());
        }
    }

    /// Notes that a stored blob of a proxied repository was served; nothing for a hosted
    /// repository.
    pub(crate) fn record_proxy_blob_pull(&self, repo: &RepoName, digest: &crate::oci::Digest) {
        if let Some(state) = &self.proxy
            && state.proxies.route(repo).is_some()
        {
            let pull = ProxyPull::Blob {
                repo: repo.to_string(),
                digest: digest.to_string(),
            };
            state.pulls.record(pull, crate::catalog::now());
        }
    }

    /// Writes the proxied pulls recorded since the last flush (see the module doc).
    pub async fn flush_proxy_pulls(&self) {
        let Some(state) = &self.proxy else { return };
        match state.pulls.flush(&self.catalog).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(manifests = n, "recorded pulls of proxied content"),
            Err(e) => {
                tracing::warn!(error = %e, "recording pulls of proxied content failed; retrying at the next flush")
            }
        }
    }

    /// Returns once the map of recorded proxied pulls has filled (never without upstreams):
    /// the server's flusher then flushes at once.
    pub async fn proxy_pulls_filled(&self) {
        match &self.proxy {
            Some(state) => state.pulls.full.notified().await,
            None => std::future::pending().await,
        }
    }

    /// The eviction step of a collection pass (see the module doc): for each `[[proxy]]`
    /// prefix with `max_size`, evicts least recently pulled manifests until the prefix's cached
    /// content fits. Each evicted manifest is reported to `listing`; returns how many went.
    /// Sets `stowage_proxy_cached_bytes` for each capped prefix.
    pub(crate) async fn evict_proxied(&self, write_pause: f64, listing: Listing<'_>) -> Result<u64> {
        if self.settings.proxy_caps.is_empty() {
            return Ok(0);
        }
        self.flush_proxy_pulls().await;
        let mut evicted = 0;
        for (prefix, cap) in self.settings.proxy_caps.clone() {
            let mut bytes = self.catalog.proxy_cached_bytes(&prefix).await?;
            let before = bytes;
            'scan: while bytes > cap {
                let candidates = self.catalog.proxy_evict_candidates(&prefix, CANDIDATES).await?;
                if candidates.is_empty() {
                    break;
                }
                let mut progress = false;
                for candidate in candidates {
                    if bytes <= cap {
                        break 'scan;
                    }
                    // Paced like every other write of a pass (`gc.write_pause`).
                    let started = std::time::Instant::now();
                    let eviction = self.catalog.proxy_evict(&prefix, &candidate).await?;
                    super::super::gc::pause_after(started, write_pause).await;
                    let Some(((repo, digest), rest)) = eviction.manifests.split_first() else {
                        continue;
                    };
                    progress = true;
                    evicted += eviction.manifests.len() as u64;
                    bytes = bytes.saturating_sub(eviction.bytes);
                    tracing::info!(
                        repo = %repo, digest = %digest, bytes = eviction.bytes, tags = ?eviction.tags,
                        with_children_and_referrers = rest.len(),
                        "evicted a cached manifest of a proxied repository (least recently pulled, over max_size)"
                    );
                    crate::metrics::get()
                        .proxy_evictions
                        .inc_by(eviction.manifests.len() as u64);
                    listing(Removed::Evicted {
                        repo: repo.clone(),
                        digest: digest.clone(),
                        bytes: eviction.bytes,
                    });
                    for (repo, digest) in rest {
                        listing(Removed::Evicted {
                            repo: repo.clone(),
                            digest: digest.clone(),
                            bytes: 0,
                        });
                    }
                    if let Some(state) = &self.proxy {
                        state.forget_validated(repo, &eviction.tags);
                    }
                }
                if !progress {
                    break;
                }
            }
            if before > cap {
                tracing::info!(
                    prefix = %prefix, cap_bytes = cap, before_bytes = before, after_bytes = bytes,
                    "proxied prefix over max_size: least recently pulled manifests evicted"
                );
            }
            crate::metrics::get()
                .proxy_cached_bytes
                .get_or_create(&crate::metrics::PrefixLabels { prefix: prefix.clone() })
                .set(bytes.min(i64::MAX as u64) as i64);
        }
        Ok(evicted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pull(digest: &str) -> ProxyPull {
        ProxyPull::Manifest {
            repo: "hub/a".into(),
            digest: digest.into(),
        }
    }

    #[test]
    fn a_key_keeps_its_latest_pull_and_the_map_is_bounded() {
        let pulls = ProxyPulls::default();
        pulls.record(pull("x"), 100);
        pulls.record(pull("x"), 130);
        {
            let state = pulls.state.lock().unwrap();
            assert_eq!(state.pending.get(&pull("x")), Some(&130));
        }
        for i in 0..MAX_PENDING + 10 {
            pulls.record(pull(&i.to_string()), 200);
        }
        assert_eq!(pulls.pending(), MAX_PENDING);
        // A key already pending is still updated when the map is full.
        pulls.record(pull("x"), 300);
        assert_eq!(pulls.state.lock().unwrap().pending.get(&pull("x")), Some(&300));
    }

    #[test]
    fn a_key_written_within_the_granularity_is_not_recorded_again() {
        let pulls = ProxyPulls::default();
        pulls.state.lock().unwrap().written.insert(pull("x"), 1000);
        pulls.record(pull("x"), 1000 + GRANULARITY - 1);
        assert_eq!(pulls.pending(), 0);
        pulls.record(pull("x"), 1000 + GRANULARITY);
        assert_eq!(pulls.pending(), 1);
    }
}
