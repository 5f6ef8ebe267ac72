//! Garbage collection: removes blob links no manifest needs and deletes the blobs no repository
//! links. Runs inside the server (see `server.rs`), because deleting a blob object must not
//! interleave with an upload publishing the same digest: both hold the digest's lock in
//! [`Registry::blob_locks`].
//!
//! One pass, in order:
//! 1. **Links.** A link (repository, blob) that no manifest of that repository references as
//!    config or layer, and that is older than the grace period (`repo_blobs.linked_at`, reset
//!    by a re-upload or mount, and by the deletion of a manifest that referenced it), is
//!    removed. The grace period covers pushes in progress, whose blobs arrive before their
//!    manifest, and pulls that read a manifest just before it was deleted.
//! 2. **Blobs.** A blob no repository links is forgotten by the catalog, then its object is
//!    deleted: under the digest's lock, so an upload of the same digest either finished
//!    linking it first (the blob stays) or publishes it afresh afterwards.
//! 3. **Orphans.** An object under `blobs/` that the catalog does not record (left by a crash
//!    between publishing and linking, or between steps 2's two halves), older than the grace
//!    period, is deleted, again under the digest's lock.
//!
//! A pass cut short (a stop, an error) leaves nothing inconsistent: every step is safe to
//! repeat, and orphans are picked up by the next pass.

use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};

use super::Registry;
use crate::error::Result;
use crate::oci::Digest;

/// Links removed, and unlinked blobs looked up, per catalog query.
const BATCH: usize = 500;

/// Object deletions in flight at once (S3 answers each in a round trip).
const PARALLEL_DELETES: usize = 8;

/// What one pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blob links removed.
    pub links: u64,
    /// Blobs deleted (catalog row and object).
    pub blobs: u64,
    /// Bytes those blobs held.
    pub bytes: u64,
    /// Objects deleted that the catalog did not record.
    pub orphans: u64,
}

impl GcReport {
    pub fn is_empty(&self) -> bool {
        *self == GcReport::default()
    }
}

impl Registry {
    /// Runs one garbage collection pass with the given grace period.
    pub async fn collect_garbage(&self, grace: Duration) -> Result<GcReport> {
        self.apply_retention().await;
        let cutoff = crate::catalog::now() - grace.as_secs() as i64;
        let mut report = GcReport::default();
        loop {
            let n = self.catalog.gc_unlink_unreferenced(cutoff, BATCH).await?;
            report.links += n;
            if n < BATCH as u64 {
                break;
            }
        }

        loop {
            let batch = self.catalog.gc_unlinked_blobs(BATCH).await?;
            if batch.is_empty() {
                break;
            }
            // Every digest's lock, in one order (an upload holds at most one, so this cannot
            // deadlock), then one transaction forgets those still unlinked.
            let mut digests: Vec<String> = batch.iter().map(|(d, _)| d.clone()).collect();
            digests.sort();
            let mut locks = Vec::with_capacity(digests.len());
            for d in &digests {
                locks.push(self.blob_locks.lock(d).await);
            }
            let forgotten = self.catalog.gc_forget_blobs(digests).await?;
            let sizes: std::collections::HashMap<&str, u64> = batch.iter().map(|(d, s)| (d.as_str(), *s)).collect();
            report.blobs += forgotten.len() as u64;
            report.bytes += forgotten.iter().filter_map(|d| sizes.get(d.as_str())).sum::<u64>();
            let deletes = futures_util::stream::iter(forgotten.clone())
                .map(|digest| {
                    let store = self.store.clone();
                    async move {
                        match digest.parse::<Digest>() {
                            // A failed delete leaves an orphan: the next pass's step 3 retries it.
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
                .collect::<Vec<()>>();
            deletes.await;
            drop(locks);
            if batch.len() < BATCH || forgotten.is_empty() {
                break;
            }
        }

        // Listed first and deleted after: deleting while the listing walks the same folders
        // (on local disk, emptied folders are removed) would upset the walk. Orphans are rare.
        let mut orphans = Vec::new();
        let mut objects = std::pin::pin!(self.store.blob_objects());
        while let Some((digest, modified)) = objects.try_next().await? {
            if modified < cutoff && !self.catalog.blob_known(&digest.to_string()).await? {
                orphans.push(digest);
            }
        }
        for digest in orphans {
            let key = digest.to_string();
            let _lock = self.blob_locks.lock(&key).await;
            if self.catalog.blob_known(&key).await? {
                continue; // published and linked meanwhile
            }
            self.store.delete_blob(&digest).await?;
            report.orphans += 1;
        }
        Ok(report)
    }
}
