//! Counts of what the catalog holds, for the metrics gauges (`crate::metrics`). One read job,
//! run at most once per `metrics::STATE_MAX_AGE`: each count is a scan of an index, a few
//! milliseconds per hundred thousand rows.

use super::db::{self, Connection};

use super::Catalog;
use crate::error::Result;

/// What the catalog holds.
#[derive(Debug, Clone, Default)]
pub struct CatalogStats {
    pub repositories: i64,
    pub blobs: i64,
    pub stored_bytes: i64,
    pub manifests: i64,
    /// Spack build caches by repository name: (name, spec tags, generations not yet built).
    pub spack: Vec<(String, i64, i64)>,
}

impl Catalog {
    /// Counts repositories, blobs, stored bytes, manifests and each Spack cache's specs.
    pub async fn stats(&self) -> Result<CatalogStats> {
        self.read(stats).await
    }
}

fn stats(c: &Connection) -> Result<CatalogStats> {
    let one = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0));
    let repositories = one("SELECT COUNT(*) FROM repositories")?;
    let (blobs, stored_bytes) = c.query_row(
        // A composite blob's bytes are stored once, in the blobs it names (migration 0018).
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN composite = 0 THEN size ELSE 0 END), 0) FROM blobs",
        [],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
    )?;
    let manifests = one("SELECT COUNT(*) FROM manifests")?;
    let mut stmt = c.prepare_cached(
        "SELECT r.name,
                (SELECT COUNT(*) FROM spack_specs s WHERE s.repo_id = i.repo_id),
                i.generation - COALESCE(i.built_generation, 0)
           FROM spack_index i JOIN repositories r ON r.id = i.repo_id
          ORDER BY r.name",
    )?;
    let spack = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<db::Result<Vec<_>>>()?;
    Ok(CatalogStats {
        repositories,
        blobs,
        stored_bytes,
        manifests,
        spack,
    })
}
