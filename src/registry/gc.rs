//! Garbage collection: removes the manifests nothing needs, the blob links no manifest needs,
//! and the blobs no repository links. Runs inside the server (see `server.rs`), because
//! deleting a blob object must not interleave with an upload publishing the same digest: both
//! hold the digest's lock in [`Registry::blob_locks`] (across replicas on PostgreSQL: see
//! "Replicas").
//!
//! # What stays
//!
//! A manifest stays while any of these holds; otherwise it is removed once it has been
//! unneeded for the grace period (`gc.grace_secs`, counted from `manifests.touched_at`: its
//! push, a re-push, or the moment a tag left it):
//! - a tag names it;
//! - it is a child of a manifest (an index) of its repository that stays;
//! - it is a referrer (it has a `subject`) whose subject stays: a signature, SBOM or
//!   attestation lives as long as what it describes, and goes with it;
//! - it is the current index of a Spack build cache (that manifest is never tagged).
//!
//! Each rule is local (it looks at one manifest and its direct neighbours), so the collector
//! needs no global mark phase: it removes the manifests that meet none of them, which frees
//! their children and referrers, and repeats until a round removes nothing. An index and its
//! children, or a chain of referrers, therefore go in one pass, a level per round.
//! `gc.untagged_manifests = false` turns this part off (manifests then go only when a client
//! deletes them).
//!
//! A blob link (repository, blob) stays while a manifest of that repository references the
//! blob as config or layer, and for the grace period after it was last linked or last
//! referenced (`repo_blobs.linked_at`, which the deletion of a referencing manifest resets). A
//! client that saw a blob (a `HEAD` before a push, a manifest before a pull) therefore has a
//! whole grace period to use it; the blobs of a collected manifest go one grace period after
//! the manifest. A blob that no repository links is deleted from the catalog and then from
//! storage, under its digest's lock, so an upload of the same digest either linked it first
//! (it stays) or publishes it afresh afterwards.
//!
//! A superseded Spack index is the exception to that second grace period: a build cache
//! rebuilds its index after every change, and each old index blob would otherwise stay a day.
//! Its blobs are recorded in `gc_superseded` when the new index is published and unlinked
//! `gc.spack_index_grace_secs` later (long enough for a reader given the old index manifest
//! to fetch it) by [`Registry::collect_superseded_indexes`], which the server runs often.
//!
//! # Size caps of the pull-through cache
//!
//! Each pass starts (after retention) with [`Registry::evict_proxied`] (`proxy::lru`): for each
//! `[[proxy]]` prefix with `max_size`, the least recently pulled cached manifests are deleted,
//! as a client delete by digest would delete them, until the prefix's content fits. Their blobs
//! are then unlinked and deleted by the steps below like any other unreferenced blob, once past
//! the grace period. A dry run lists them as `evict` lines.
//!
//! # Never stalling writers
//!
//! Every step scans on the catalog's reader connections, a bounded slice at a time, and
//! deletes in short write jobs that re-check each candidate's condition in the write
//! transaction (see `catalog::gc`). A push that revives a candidate between scan and delete
//! (tags it, references it, links it again) therefore wins, and no write job is longer than
//! [`WRITE_BATCH`] indexed deletions; a manifest job, whose deletions cascade, also stops
//! after [`WRITE_BUDGET`].
//!
//! # Orphans
//!
//! An object under `blobs/` that the catalog does not record (left by a crash between
//! publishing and linking, or between a blob's two deletions), older than the grace period, is
//! deleted, again under the digest's lock. Listing storage is slow and, on S3, billed, so this
//! step runs on its own schedule (`gc.orphan_interval_secs`), remembered across restarts.
//!
//! A pass cut short (a stop, an error) leaves nothing inconsistent: every step is safe to
//! repeat.
//!
//! # Replicas
//!
//! With a PostgreSQL catalog, several replicas share the catalog and the bucket. The digest
//! locks above are then database locks too (`registry::locks::SharedLocks`, `catalog::locks`),
//! so an upload on one replica and a deletion on another exclude each other as two tasks of one
//! process do. One replica collects at a time: before each scheduled pass the server takes
//! garbage-collection leadership ([`Registry::lead_gc`], a session-level advisory lock held for
//! the pass); a replica that does not get it skips that pass and tries again at its next tick.
//! Leadership only spares duplicate work: two passes side by side (leadership lost with its
//! connection) stay correct, since every step re-checks its candidates in its write
//! transaction and deletes objects under the digests' locks. A pass whose digest locks were
//! lost meanwhile deletes no object (those become orphans, removed later under the lock). The
//! superseded Spack index collection runs on every replica: it is short and safe side by side
//! for the same reasons.
//!
//! # Status
//!
//! The server's passes ([`Registry::collect_garbage`]) leave their state in the registry
//! ([`GcStatus`], read by the web UI's admin page): the schedule ([`Registry::schedule_gc`],
//! set by the server when collection is on), whether a pass is running and since when, and the
//! last pass's start, duration and outcome. It lives in memory: a restarted server shows no
//! last pass until it has run one (the metrics' `stowage_gc_last_pass_timestamp_seconds`
//! likewise).
//!
//! # One-off passes and dry runs
//!
//! `stowage gc` runs [`Registry::collect_listed`] once, with the server stopped (it holds the
//! data directory's lock: on SQLite the digest locks above are in-process and cannot cover
//! another process's uploads; with PostgreSQL it refuses to run, the replicas collect).
//! `stowage gc --dry-run` runs the very same code on a snapshot copy of the
//! catalog with [`GcOptions::dry_run`] set: the copy's rows are deleted as in a real pass, so
//! every later step sees what a real pass would, but no object is deleted from storage (and
//! the objects it would have deleted are not taken for orphans). It lists, as [`Removed`]
//! items, exactly what a real pass started from the same catalog state would remove.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};

use super::Registry;
use crate::catalog::now;
use crate::error::Result;
use crate::oci::Digest;

/// Rows a scan examines per read (one slice of a table).
const SCAN_SLICE: usize = 2000;

/// Candidates removed per write job.
const WRITE_BATCH: usize = 100;

/// Longest a manifest-removal write job runs before it commits and leaves the rest to the
/// next job, so that writes queued behind it wait at most about this long.
const WRITE_BUDGET: Duration = Duration::from_millis(5);

/// After each write job the collector waits this many times as long as the job took (its wait
/// in the writer's queue and its commit included) before the next: it then holds the writer at
/// most half the time, and dirties catalog pages no faster than the checkpointer writes them
/// back, so a commit beside it does not wait on a large checkpoint's fsync. Doubles a pass's
/// time (see the GC benchmark in the README).
pub const WRITE_PAUSE: f64 = 1.0;

/// Waits after a write job that started at `started` (see [`WRITE_PAUSE`]).
pub(crate) async fn pause_after(started: std::time::Instant, factor: f64) {
    if factor > 0.0 {
        tokio::time::sleep(started.elapsed().mul_f64(factor)).await;
    }
}

/// Object deletions in flight at once (S3 answers each in a round trip).
const PARALLEL_DELETES: usize = 8;

/// Rounds of manifest removal per pass: each frees one more level of children and referrers.
const MAX_MANIFEST_ROUNDS: usize = 16;

/// Orphans listed before they are checked against the catalog and deleted.
const ORPHAN_BATCH: usize = 1000;

/// `gc_state` key: when storage was last listed for orphans (unix seconds).
const ORPHANS_LISTED_AT: &str = "orphans_listed_at";

/// What one pass is to do.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// How long an unneeded manifest or blob link is kept.
    pub grace: Duration,
    /// Collect manifests that no tag names and nothing else needs.
    pub untagged_manifests: bool,
    /// List storage for orphans when it was last listed this long ago (or never).
    pub orphan_interval: Duration,
    /// Delete nothing from storage (run on a copy of the catalog: see the module doc).
    pub dry_run: bool,
    /// After each write job, wait this many times as long as the job took ([`WRITE_PAUSE`]).
    pub write_pause: f64,
}

/// One thing a pass removed (or, in a dry run, would remove).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removed {
    /// A tag a retention rule deleted.
    RetentionTag {
        repo: String,
        tag: String,
        digest: String,
        why: String,
    },
    /// An unneeded manifest.
    Manifest { repo: String, digest: String },
    /// A blob no repository links any more (catalog row and object).
    Blob { digest: String, bytes: u64 },
    /// A blob of a superseded Spack index.
    SpackIndexBlob { digest: String, bytes: u64 },
    /// An object the catalog did not record.
    Orphan { digest: String },
    /// A cached manifest of a proxied repository evicted to keep its prefix under `max_size`
    /// (with the bytes that frees from the prefix's figure; 0 for the children and referrers
    /// that went with it, whose bytes the first line counts).
    Evicted { repo: String, digest: String, bytes: u64 },
}

impl std::fmt::Display for Removed {
    /// One tab-separated line: the kind, then what identifies the item.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Removed::RetentionTag { repo, tag, digest, why } => write!(f, "retention\t{repo}\t{tag}\t{digest}\t{why}"),
            Removed::Manifest { repo, digest } => write!(f, "manifest\t{repo}\t{digest}"),
            Removed::Blob { digest, bytes } => write!(f, "blob\t{digest}\t{bytes}"),
            Removed::SpackIndexBlob { digest, bytes } => write!(f, "spack-index-blob\t{digest}\t{bytes}"),
            Removed::Orphan { digest } => write!(f, "orphan\t{digest}"),
            Removed::Evicted { repo, digest, bytes } => write!(f, "evict\t{repo}\t{digest}\t{bytes}"),
        }
    }
}

/// Where a pass reports each [`Removed`] item.
pub type Listing<'a> = &'a mut (dyn FnMut(Removed) + Send);

/// What one pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Manifests removed.
    pub manifests: u64,
    /// Blob links removed.
    pub links: u64,
    /// Blobs deleted (catalog row and object).
    pub blobs: u64,
    /// Bytes those blobs held.
    pub bytes: u64,
    /// Objects deleted that the catalog did not record.
    pub orphans: u64,
    /// Cached manifests of proxied repositories evicted (`[[proxy]] max_size`).
    pub evicted: u64,
}

impl GcReport {
    pub fn is_empty(&self) -> bool {
        *self == GcReport::default()
    }

    /// Adds this report to the metrics: its blobs counted as `blobs` (orphans as `orphan`).
    fn count(&self, blobs: &'static str, manifests: &'static str) {
        let m = crate::metrics::get();
        m.deleted(blobs, self.blobs);
        m.deleted(manifests, self.manifests);
        m.deleted("orphan", self.orphans);
        m.gc_freed_bytes.inc_by(self.bytes);
    }
}

/// What garbage collection is doing and last did (see the module doc's "Status").
#[derive(Debug, Clone, Default)]
pub struct GcStatus {
    /// How often the server runs a pass, and the grace period; `None` when it runs none.
    pub schedule: Option<GcSchedule>,
    /// When the running pass started (unix seconds), if one is running.
    pub running_since: Option<i64>,
    /// The last pass that finished.
    pub last: Option<GcPass>,
    /// When the next pass is due (unix seconds).
    pub next_at: Option<i64>,
}

/// The server's collection schedule.
#[derive(Debug, Clone, Copy)]
pub struct GcSchedule {
    pub interval: Duration,
    pub grace: Duration,
}

/// A finished pass.
#[derive(Debug, Clone)]
pub struct GcPass {
    /// Unix seconds.
    pub started_at: i64,
    pub duration: Duration,
    /// What it removed, or why it failed.
    pub outcome: std::result::Result<GcReport, String>,
}

/// Garbage-collection leadership, held for one pass (see the module doc's "Replicas");
/// released when dropped.
pub struct GcLeadership {
    _held: Option<crate::catalog::locks::LockGuard>,
}

impl Registry {
    /// Takes garbage-collection leadership for a pass: always granted on SQLite (one process);
    /// with PostgreSQL, `None` while another replica (or another pass of this one) holds it,
    /// and the schedule's next pass then moves on by an interval.
    pub async fn lead_gc(&self) -> Result<Option<GcLeadership>> {
        let Some(locks) = self.catalog.locks() else {
            return Ok(Some(GcLeadership { _held: None }));
        };
        let held = locks.try_acquire(crate::catalog::locks::GC_LEADER_KEY).await?;
        if held.is_none() {
            let mut s = self.gc_status.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(schedule) = s.schedule {
                s.next_at = Some(now().saturating_add(schedule.interval.as_secs() as i64));
            }
        }
        Ok(held.map(|g| GcLeadership { _held: Some(g) }))
    }

    /// Records that the server runs a pass every `interval` (the first one `interval` from now).
    pub fn schedule_gc(&self, interval: Duration, grace: Duration) {
        let mut s = self.gc_status.lock().unwrap_or_else(|p| p.into_inner());
        s.schedule = Some(GcSchedule { interval, grace });
        s.next_at = Some(now().saturating_add(interval.as_secs() as i64));
    }

    /// What garbage collection is doing and last did.
    pub fn gc_status(&self) -> GcStatus {
        self.gc_status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs one garbage collection pass, counted in the `stowage_gc_*` metrics and kept as the
    /// last pass of [`Registry::gc_status`].
    pub async fn collect_garbage(&self, opts: GcOptions) -> Result<GcReport> {
        let started = std::time::Instant::now();
        let started_at = now();
        self.gc_status.lock().unwrap_or_else(|p| p.into_inner()).running_since = Some(started_at);
        let result = self.collect_garbage_listed(opts, &mut |_| {}).await;
        {
            let mut s = self.gc_status.lock().unwrap_or_else(|p| p.into_inner());
            s.running_since = None;
            s.last = Some(GcPass {
                started_at,
                duration: started.elapsed(),
                outcome: result.as_ref().map(|r| *r).map_err(|e| e.to_string()),
            });
            // The server's ticks are `interval` apart, or `interval` after a pass that overran.
            if let Some(schedule) = s.schedule {
                s.next_at = Some(started_at.saturating_add(schedule.interval.as_secs() as i64).max(now()));
            }
        }
        let m = crate::metrics::get();
        m.gc_duration.observe(started.elapsed().as_secs_f64());
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        m.gc_passes
            .get_or_create(&crate::metrics::KindLabels { kind: outcome })
            .inc();
        if let Ok(r) = &result {
            r.count("blob", "manifest");
            m.gc_last_pass.set(now());
        }
        result
    }

    /// Runs one garbage collection pass, reporting each item removed to `listing`.
    pub async fn collect_garbage_listed(&self, opts: GcOptions, listing: Listing<'_>) -> Result<GcReport> {
        self.pass(opts, listing, HashSet::new()).await
    }

    /// One pass; `gone` holds the digests of blobs already forgotten before it (their objects
    /// are still there in a dry run, and are not orphans).
    async fn pass(&self, opts: GcOptions, listing: Listing<'_>, mut gone: HashSet<String>) -> Result<GcReport> {
        // Retention deletes tags; the manifests they leave untagged go a grace period later.
        self.apply_retention(|r| {
            listing(Removed::RetentionTag {
                repo: r.repo.clone(),
                tag: r.tag.clone(),
                digest: r.digest.clone(),
                why: format!("rule {}: {}", r.rule, r.why),
            })
        })
        .await;
        // Size caps of the pull-through cache: evicted manifests' blobs are then unlinked and
        // deleted below like any other's, once past the grace period (see `proxy::lru`).
        // A failed eviction is logged and the pass goes on: the steps below are what free disk.
        let evicted = match self.evict_proxied(opts.write_pause, listing).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "gc: evicting pull-through content over max_size failed; the pass goes on");
                0
            }
        };
        let mut report = GcReport {
            evicted,
            ..GcReport::default()
        };
        let cutoff = now() - opts.grace.as_secs() as i64;
        if opts.untagged_manifests {
            report.manifests = self.collect_manifests(cutoff, opts.write_pause, listing).await?;
        }
        report.links = self.collect_links(cutoff, opts.write_pause).await?;
        // In a dry run, the objects of the blobs "deleted" are still there: not orphans.
        let (blobs, bytes) = self
            .collect_blobs(opts.dry_run, opts.write_pause, &mut |r| {
                if let Removed::Blob { digest, .. } = &r {
                    gone.insert(digest.clone());
                }
                listing(r)
            })
            .await?;
        report.blobs = blobs;
        report.bytes = bytes;

        let listed = self.catalog.gc_state(ORPHANS_LISTED_AT).await?;
        if listed.is_none_or(|at| now() - at >= opts.orphan_interval.as_secs() as i64) {
            let started = now();
            report.orphans = self.collect_orphans(cutoff, opts.dry_run, &gone, listing).await?;
            self.catalog.set_gc_state(ORPHANS_LISTED_AT, started).await?;
        }
        Ok(report)
    }

    /// `stowage gc`: the superseded Spack index blobs past `spack_index_grace` (first, so that
    /// they are reported as such rather than as blobs the pass found unlinked), then one pass;
    /// each item is reported to `listing`.
    pub async fn collect_listed(
        &self,
        opts: GcOptions,
        spack_index_grace: Duration,
        listing: Listing<'_>,
    ) -> Result<GcReport> {
        let mut gone = HashSet::new();
        let index = self
            .superseded_indexes(spack_index_grace, opts.dry_run, &mut |r| {
                if let Removed::SpackIndexBlob { digest, .. } = &r {
                    gone.insert(digest.clone());
                }
                listing(r)
            })
            .await?;
        let mut report = self.pass(opts, listing, gone).await?;
        report.links += index.links;
        report.blobs += index.blobs;
        report.bytes += index.bytes;
        Ok(report)
    }

    /// Unlinks the blobs of Spack indexes superseded more than `grace` ago, and deletes those
    /// no repository links any more.
    pub async fn collect_superseded_indexes(&self, grace: Duration) -> Result<GcReport> {
        let result = self.superseded_indexes(grace, false, &mut |_| {}).await;
        if let Ok(r) = &result {
            r.count("spack_index", "manifest");
        }
        result
    }

    async fn superseded_indexes(&self, grace: Duration, dry_run: bool, listing: Listing<'_>) -> Result<GcReport> {
        let before = now() - grace.as_secs() as i64;
        let mut report = GcReport::default();
        loop {
            let due = self.catalog.gc_superseded_due(before, WRITE_BATCH).await?;
            if due.is_empty() {
                break;
            }
            let digests: Vec<String> = due.iter().map(|(_, d)| d.clone()).collect();
            let n = due.len();
            report.links += self.catalog.gc_unlink_superseded(due, before).await?;
            let sizes = self.catalog.blob_sizes_if_unlinked(digests).await?;
            for (digest, bytes) in self.delete_unlinked(sizes, dry_run).await? {
                report.blobs += 1;
                report.bytes += bytes;
                listing(Removed::SpackIndexBlob { digest, bytes });
            }
            if n < WRITE_BATCH {
                break;
            }
        }
        Ok(report)
    }

    /// Removes unneeded manifests touched before `cutoff`, a level per round. Returns how many.
    async fn collect_manifests(&self, cutoff: i64, pause: f64, listing: Listing<'_>) -> Result<u64> {
        let mut total = 0;
        for _round in 0..MAX_MANIFEST_ROUNDS {
            let mut removed_this_round = 0;
            let mut after = None;
            loop {
                let slice = self.catalog.gc_scan_manifests(cutoff, after, SCAN_SLICE).await?;
                let mut pending = slice.candidates.as_slice();
                while !pending.is_empty() {
                    let batch = pending[..pending.len().min(WRITE_BATCH)].to_vec();
                    let started = std::time::Instant::now();
                    let (removed, examined) = self.catalog.gc_delete_manifests(batch, cutoff, WRITE_BUDGET).await?;
                    pause_after(started, pause).await;
                    for m in removed.iter().cloned() {
                        tracing::info!(repo = %m.repo, digest = %m.digest, "garbage collection removed an unneeded manifest");
                        listing(Removed::Manifest {
                            repo: m.repo,
                            digest: m.digest,
                        });
                    }
                    removed_this_round += removed.len() as u64;
                    pending = &pending[examined.max(1).min(pending.len())..];
                }
                match slice.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            total += removed_this_round;
            if removed_this_round == 0 {
                break;
            }
        }
        Ok(total)
    }

    /// Removes unreferenced blob links last linked before `cutoff`. Returns how many.
    async fn collect_links(&self, cutoff: i64, pause: f64) -> Result<u64> {
        let mut total = 0;
        let mut after = None;
        loop {
            let slice = self.catalog.gc_scan_links(cutoff, after, SCAN_SLICE).await?;
            for links in slice.candidates.chunks(WRITE_BATCH) {
                let started = std::time::Instant::now();
                total += self.catalog.gc_unlink(links.to_vec(), Some(cutoff)).await?;
                pause_after(started, pause).await;
            }
            match slice.next {
                Some(next) => after = Some(next),
                None => return Ok(total),
            }
        }
    }

    /// Deletes every blob no repository links. Returns how many, and their bytes.
    async fn collect_blobs(&self, dry_run: bool, pause: f64, listing: Listing<'_>) -> Result<(u64, u64)> {
        let (mut blobs, mut bytes) = (0, 0);
        let mut after = None;
        loop {
            let slice = self.catalog.gc_scan_blobs(after, SCAN_SLICE).await?;
            for batch in slice.candidates.chunks(WRITE_BATCH) {
                let started = std::time::Instant::now();
                let deleted = self.delete_unlinked(batch.iter().cloned().collect(), dry_run).await?;
                pause_after(started, pause).await;
                for (digest, size) in deleted {
                    blobs += 1;
                    bytes += size;
                    listing(Removed::Blob { digest, bytes: size });
                }
            }
            match slice.next {
                Some(next) => after = Some(next),
                None => return Ok((blobs, bytes)),
            }
        }
    }

    /// Forgets and deletes those of the blobs `sizes` (digest → size) that no repository links,
    /// under their digests' locks (objects stay in a dry run). Returns those that went, with
    /// their sizes, in digest order.
    async fn delete_unlinked(&self, sizes: HashMap<String, u64>, dry_run: bool) -> Result<Vec<(String, u64)>> {
        if sizes.is_empty() {
            return Ok(Vec::new());
        }
        // Every digest's lock, in one order (an upload holds at most one, so this cannot
        // deadlock; see `locks`), then one transaction forgets those still unlinked.
        let mut digests: Vec<String> = sizes.keys().cloned().collect();
        digests.sort();
        let locks = self.blob_locks.lock_all(&digests).await?;
        let mut forgotten = self.catalog.gc_forget_blobs(digests).await?;
        forgotten.sort();
        let gone = forgotten
            .iter()
            .map(|d| (d.clone(), sizes.get(d).copied().unwrap_or(0)))
            .collect();
        if dry_run {
            return Ok(gone);
        }
        // A lost database lock (PostgreSQL, its connection broke) no longer keeps another
        // replica's upload from publishing one of these digests afresh: their objects are left
        // for the orphan sweep, which takes the locks again.
        if locks.is_lost() {
            tracing::warn!(
                blobs = forgotten.len(),
                "garbage collection lost its blob locks; the objects of the blobs it forgot are left to the orphan sweep"
            );
            return Ok(gone);
        }
        futures_util::stream::iter(forgotten.iter().cloned())
            .map(|digest| {
                let store = self.store.clone();
                async move {
                    match digest.parse::<Digest>() {
                        // A failed delete leaves an orphan, which the orphan step removes.
                        Ok(d) => {
                            if let Err(e) = store.delete_blob(&d).await {
                                tracing::warn!(digest = %digest, error = %e, "deleting a blob object failed");
                            }
                        }
                        Err(_) => tracing::warn!(digest = %digest, "forgot a blob row with an invalid digest"),
                    }
                }
            })
            .buffer_unordered(PARALLEL_DELETES)
            .collect::<Vec<()>>()
            .await;
        drop(locks);
        Ok(gone)
    }

    /// Deletes objects under `blobs/` that the catalog does not record and that were written
    /// before `cutoff`. Returns how many.
    /// In a dry run nothing is deleted, and `gone` (objects of blobs the pass forgot) are not
    /// orphans.
    async fn collect_orphans(
        &self,
        cutoff: i64,
        dry_run: bool,
        gone: &HashSet<String>,
        listing: Listing<'_>,
    ) -> Result<u64> {
        // Listed first and deleted after: deleting while the listing walks the same folders
        // (on local disk, emptied folders are removed) would upset the walk. Orphans are rare,
        // so only they are kept; the objects are checked against the catalog in batches.
        let mut orphans = Vec::new();
        let mut batch = Vec::with_capacity(ORPHAN_BATCH);
        let mut objects = std::pin::pin!(self.store.blob_objects());
        loop {
            let next = objects.try_next().await?;
            let end = next.is_none();
            if let Some((digest, modified)) = next
                && modified < cutoff
            {
                batch.push(digest);
            }
            if batch.len() >= ORPHAN_BATCH || (end && !batch.is_empty()) {
                let known = self
                    .catalog
                    .blobs_known(batch.iter().map(|d| d.to_string()).collect())
                    .await?;
                orphans.extend(batch.drain(..).filter(|d| {
                    let key = d.to_string();
                    let forgotten_here = dry_run && gone.contains(&key);
                    !known.contains(&key) && !forgotten_here
                }));
            }
            if end {
                break;
            }
        }
        let mut removed = 0;
        for digest in orphans {
            let key = digest.to_string();
            let lock = self.blob_locks.lock(&key).await?;
            if self.catalog.blob_known(&key).await? {
                continue; // published and linked meanwhile
            }
            if lock.is_lost() {
                continue; // another replica may be publishing it now: left for the next sweep
            }
            if !dry_run {
                self.store.delete_blob(&digest).await?;
                tracing::info!(digest = %key, "garbage collection removed an object the catalog did not record");
            }
            listing(Removed::Orphan { digest: key });
            removed += 1;
        }
        Ok(removed)
    }
}
