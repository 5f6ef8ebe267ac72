//! The registry's services: what each OCI operation does, independent of HTTP.
//!
//! A [`Registry`] owns the catalog and the blob store; the HTTP layer calls one method per
//! request and maps the result. Nothing here sees actix types: request bodies arrive as
//! `Stream<Item = io::Result<Bytes>>`, responses leave as plain values.

pub mod blobs;
mod gc;
mod locks;
mod maintenance;
mod manifest_cache;
mod manifests;
mod metrics;
mod proxy;
pub mod retention;
mod spack;
mod uploads;

use std::sync::Arc;
use std::time::Duration;

pub use gc::{GcLeadership, GcOptions, GcPass, GcReport, GcSchedule, GcStatus, Removed, WRITE_PAUSE};
pub use manifests::PutOutcome;
pub use proxy::lru as proxy_lru;
pub use proxy::{SPOOL_DIR, sweep_spool_dir};
pub use uploads::{Chunk, ChunkRange, SessionLimits, Uploads};

use crate::catalog::Catalog;
use crate::error::Result;
use crate::storage::BlobStore;

/// How long a session sits idle before the bytes it buffers past its last part (S3) are moved
/// out of memory.
const SPILL_IDLE_AFTER: Duration = Duration::from_secs(30);

/// Registry behaviour settings (the `[registry]` config section, resolved).
#[derive(Debug, Clone)]
pub struct Settings {
    pub delete_enabled: bool,
    pub max_manifest_size: usize,
    pub upload_timeout: Duration,
    pub catalog_page_size: u64,
    /// Upload sessions held at once.
    pub upload_sessions: SessionLimits,
    /// The `[[immutable_tags]]` rules.
    pub immutable_tags: crate::auth::ImmutableTags,
    /// Retention rules (`gc.retention`), applied by each collection pass.
    pub retention: Vec<crate::config::RetentionRule>,
    /// Longest a Spack keep-list may live (`gc.keep_list_max_secs`).
    pub keep_list_max: Duration,
    /// `[[proxy]]` prefixes with a `max_size`, and that size in bytes (see `proxy::lru`).
    pub proxy_caps: Vec<(String, u64)>,
}

/// Shared handle to the registry's state; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    pub(crate) catalog: Catalog,
    pub(crate) store: BlobStore,
    pub(crate) uploads: Arc<Uploads>,
    pub(crate) settings: Arc<Settings>,
    /// One index build at a time per repository (across replicas on PostgreSQL).
    pub(crate) spack_builds: Arc<locks::SharedLocks>,
    /// Held (per digest) while a blob is published and linked, and while garbage collection
    /// deletes it, so that neither sees the other half done (across replicas on PostgreSQL).
    pub(crate) blob_locks: Arc<locks::SharedLocks>,
    /// Read-only mode, draining, readiness.
    pub(crate) maintenance: Arc<maintenance::Maintenance>,
    /// Manifest pulls not yet written to the catalog (see `retention`).
    pub(crate) pulls: Arc<retention::PullRecorder>,
    /// Manifest lookups remembered under the catalog's content generation.
    pub(crate) manifests: Arc<manifest_cache::ManifestCache>,
    /// What garbage collection is doing and last did (see `gc`).
    pub(crate) gc_status: Arc<std::sync::Mutex<gc::GcStatus>>,
    /// Pull-through caching of `[[proxy]]` upstreams (see `proxy`); `None` without any.
    pub(crate) proxy: Option<Arc<proxy::ProxyState>>,
}

impl Registry {
    pub fn new(catalog: Catalog, store: BlobStore, settings: Settings) -> Self {
        let db_locks = catalog.locks().cloned();
        Registry {
            spack_builds: Arc::new(locks::SharedLocks::new(
                db_locks.clone(),
                crate::catalog::locks::spack_key,
            )),
            blob_locks: Arc::new(locks::SharedLocks::new(db_locks, crate::catalog::locks::blob_key)),
            catalog,
            store,
            uploads: Arc::new(Uploads::new(settings.upload_sessions)),
            settings: Arc::new(settings),
            maintenance: Arc::new(maintenance::Maintenance::default()),
            pulls: Arc::new(retention::PullRecorder::default()),
            manifests: Arc::new(manifest_cache::ManifestCache::new()),
            gc_status: Arc::default(),
            proxy: None,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Clears what a previous process left of upload sessions, before serving: sessions
    /// expired meanwhile or whose staged data is gone (their catalog rows would otherwise stay
    /// until expiry, or forever for a crash between creating a row and its data), with their
    /// data; then staged data and empty `uploads/<id>/` directories that no remaining session
    /// names (single-request uploads cut short, crashes mid-cleanup). What remains can resume.
    pub async fn clean_up_uploads_at_start(&self) -> Result<()> {
        let timeout = i64::try_from(self.settings.upload_timeout.as_secs()).unwrap_or(i64::MAX);
        let expired_before = crate::catalog::now().saturating_sub(timeout);
        let mut keep = std::collections::HashSet::new();
        let (mut expired, mut gone) = (0usize, 0usize);
        let shared = self.shared_sessions();
        for (rec, last_used) in self.catalog.uploads_with_last_use().await? {
            if let Some(locks) = shared {
                // Another replica may be using the session, or have used it since the listing:
                // expired only if neither (and its data kept from the sweep below otherwise).
                if last_used <= expired_before && self.expire_shared_upload(locks, &rec, expired_before).await? {
                    expired += 1;
                } else {
                    keep.insert(rec.id);
                }
                continue;
            }
            if last_used <= expired_before {
                expired += 1;
            } else if !self.store.staged_data_present(rec.id, &rec.staging, rec.offset).await? {
                gone += 1;
            } else {
                keep.insert(rec.id);
                continue;
            }
            self.forget_session(rec.id, Some(&rec.staging)).await;
        }
        // Other replicas' uploads in progress are not this start's to clean up: only what is
        // older than any live session can be is left behind.
        let younger_kept = shared.map(|_| self.settings.upload_timeout);
        let stale = self.store.discard_uploads_except(&keep, younger_kept).await?;
        if expired + gone + stale > 0 {
            tracing::info!(
                expired_sessions = expired,
                sessions_without_data = gone,
                stale_uploads = stale,
                resumable_sessions = keep.len(),
                "removed upload sessions and data left by a previous run"
            );
        }
        Ok(())
    }

    /// Removes upload sessions idle for longer than the configured timeout, with their data.
    /// Sessions this process holds are timed by their last request; sessions recorded in the
    /// catalog but not held (opened before a restart and not resumed since) by their last
    /// checkpoint.
    pub async fn expire_uploads(&self) {
        // Expiry and spilling write to storage and the catalog: not while they are being copied.
        if self.is_read_only() {
            return;
        }
        self.expire_held_uploads().await;
        self.spill_idle_uploads(SPILL_IDLE_AFTER).await;
        let timeout = i64::try_from(self.settings.upload_timeout.as_secs()).unwrap_or(i64::MAX);
        let before = crate::catalog::now().saturating_sub(timeout);
        match self.catalog.idle_uploads(before, 1000).await {
            Ok(idle) => match self.shared_sessions() {
                None => {
                    for rec in idle.into_iter().filter(|r| !self.uploads.holds(r.id)) {
                        self.forget_session(rec.id, Some(&rec.staging)).await;
                        tracing::info!(upload = %rec.id, "expired an upload session left by a previous run");
                    }
                }
                Some(locks) => {
                    for rec in idle {
                        if let Err(e) = self.expire_shared_upload(locks, &rec, before).await {
                            tracing::warn!(upload = %rec.id, error = %e, "expiring an upload session failed");
                        }
                    }
                }
            },
            Err(e) => tracing::warn!(error = %e, "listing idle upload sessions failed"),
        }
    }
}
