//! The catalog's side of garbage collection (see `registry::gc`).

use rusqlite::{OptionalExtension, params};

use super::Catalog;
use crate::error::Result;

impl Catalog {
    /// Removes every blob link linked (or last touched) before `cutoff` (unix seconds) that no
    /// manifest of its repository references. Returns how many.
    pub async fn gc_unlink_unreferenced(&self, cutoff: i64) -> Result<u64> {
        self.write(move |c| {
            let n = c.execute(
                "DELETE FROM repo_blobs
                  WHERE linked_at < ?1
                    AND NOT EXISTS (SELECT 1 FROM manifest_refs r JOIN manifests m ON m.id = r.manifest_id
                                     WHERE r.digest = repo_blobs.digest AND m.repo_id = repo_blobs.repo_id
                                       AND r.kind IN ('config', 'layer'))",
                params![cutoff],
            )?;
            Ok(n as u64)
        })
        .await
    }

    /// Up to `limit` blobs (digest, size) that no repository links.
    pub async fn gc_unlinked_blobs(&self, limit: usize) -> Result<Vec<(String, u64)>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT digest, size FROM blobs b
                  WHERE NOT EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = b.digest)
                  LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Forgets blob `digest` if no repository links it (any more). Returns whether it did.
    pub async fn gc_forget_blob(&self, digest: &str) -> Result<bool> {
        let digest = digest.to_owned();
        self.write(move |c| {
            let n = c.execute(
                "DELETE FROM blobs WHERE digest = ?1
                    AND NOT EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = blobs.digest)",
                [digest],
            )?;
            Ok(n > 0)
        })
        .await
    }

    /// Whether the catalog records blob `digest` at all.
    pub async fn blob_known(&self, digest: &str) -> Result<bool> {
        let digest = digest.to_owned();
        self.read(move |c| {
            Ok(
                c.query_row("SELECT 1 FROM blobs WHERE digest = ?1", [digest], |_| Ok(()))
                    .optional()?
                    .is_some(),
            )
        })
        .await
    }
}
