//! The registry's side of `/metrics`: gauges read from its state when scraped.

use super::Registry;
use crate::metrics::{self, RepoLabels};

/// Name of the series that sums the Spack caches beyond `metrics.max_repository_series`.
const OTHER: &str = "_other";

impl Registry {
    /// The metrics exposition, with the state gauges brought up to date first: open upload
    /// sessions on every scrape, catalog counts at most once per `metrics::STATE_MAX_AGE`
    /// (a failed read keeps the previous values and is logged). At most `max_repositories`
    /// Spack caches get series of their own.
    pub async fn metrics_exposition(&self, max_repositories: usize) -> String {
        let m = metrics::get();
        m.upload_sessions
            .set(i64::try_from(self.uploads.len()).unwrap_or(i64::MAX));
        if m.claim_state_refresh() {
            match self.catalog.stats().await {
                Ok(stats) => {
                    m.repositories.set(stats.repositories);
                    m.blobs.set(stats.blobs);
                    m.stored_bytes.set(stats.stored_bytes);
                    m.manifests.set(stats.manifests);
                    m.spack_specs.clear();
                    m.spack_lag.clear();
                    for (i, (name, specs, lag)) in stats.spack.into_iter().enumerate() {
                        let repository = if i < max_repositories { name } else { OTHER.to_owned() };
                        let labels = RepoLabels { repository };
                        m.spack_specs.get_or_create(&labels).inc_by(specs);
                        m.spack_lag.get_or_create(&labels).inc_by(lag.max(0));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading catalog counts for /metrics failed"),
            }
        }
        m.encode()
    }
}
