//! The registry's services: what each OCI operation does, independent of HTTP.
//!
//! A [`Registry`] owns the catalog and the blob store; the HTTP layer calls one method per
//! request and maps the result. Nothing here sees actix types: request bodies arrive as
//! `Stream<Item = io::Result<Bytes>>`, responses leave as plain values.

pub mod blobs;
mod gc;
mod locks;
mod manifests;
mod spack;
mod uploads;

use std::sync::Arc;
use std::time::Duration;

pub use gc::GcReport;
pub use manifests::PutOutcome;
pub use uploads::{Chunk, ChunkRange, SessionLimits, Uploads};

use crate::catalog::Catalog;
use crate::storage::BlobStore;

/// Registry behaviour settings (the `[registry]` config section, resolved).
#[derive(Debug, Clone)]
pub struct Settings {
    pub delete_enabled: bool,
    pub max_manifest_size: usize,
    pub upload_timeout: Duration,
    pub catalog_page_size: u64,
    /// Upload sessions held at once.
    pub upload_sessions: SessionLimits,
}

/// Shared handle to the registry's state; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    pub(crate) catalog: Catalog,
    pub(crate) store: BlobStore,
    pub(crate) uploads: Arc<Uploads>,
    pub(crate) settings: Arc<Settings>,
    /// One index build at a time per repository.
    pub(crate) spack_builds: Arc<locks::KeyedLocks>,
    /// Held (per digest) while a blob is published and linked, and while garbage collection
    /// deletes it, so that neither sees the other half done.
    pub(crate) blob_locks: Arc<locks::KeyedLocks>,
}

impl Registry {
    pub fn new(catalog: Catalog, store: BlobStore, settings: Settings) -> Self {
        Registry {
            catalog,
            store,
            uploads: Arc::new(Uploads::new(settings.upload_sessions)),
            settings: Arc::new(settings),
            spack_builds: Arc::new(locks::KeyedLocks::default()),
            blob_locks: Arc::new(locks::KeyedLocks::default()),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Removes upload sessions idle for longer than the configured timeout, with their data.
    /// Sessions this process holds are timed by their last request; sessions recorded in the
    /// catalog but not held (opened before a restart and not resumed since) by their last
    /// checkpoint.
    pub async fn expire_uploads(&self) {
        self.expire_held_uploads().await;
        let timeout = i64::try_from(self.settings.upload_timeout.as_secs()).unwrap_or(i64::MAX);
        let before = crate::catalog::now().saturating_sub(timeout);
        match self.catalog.idle_uploads(before, 1000).await {
            Ok(idle) => {
                for rec in idle.into_iter().filter(|r| !self.uploads.holds(r.id)) {
                    self.forget_session(rec.id, Some(&rec.staging)).await;
                    tracing::info!(upload = %rec.id, "expired an upload session left by a previous run");
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing idle upload sessions failed"),
        }
    }
}
