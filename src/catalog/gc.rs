//! The catalog's side of garbage collection (see `registry::gc`).

use rusqlite::{OptionalExtension, params};

use super::Catalog;
use crate::error::Result;

impl Catalog {
    /// Removes up to `limit` blob links linked (or last touched) before `cutoff` (unix seconds)
    /// that no manifest of their repository references. Returns how many; the caller repeats
    /// while that is `limit`, so that each write transaction stays short and pushes are not held
    /// up behind one large deletion.
    pub async fn gc_unlink_unreferenced(&self, cutoff: i64, limit: usize) -> Result<u64> {
        self.write(move |c| {
            let n = c.execute(
                "DELETE FROM repo_blobs
                  WHERE (repo_id, digest) IN (
                        SELECT rb.repo_id, rb.digest FROM repo_blobs rb
                         WHERE rb.linked_at < ?1
                           AND NOT EXISTS (SELECT 1 FROM manifest_refs r JOIN manifests m ON m.id = r.manifest_id
                                            WHERE r.digest = rb.digest AND m.repo_id = rb.repo_id
                                              AND r.kind IN ('config', 'layer'))
                         LIMIT ?2)",
                params![cutoff, limit as i64],
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

    /// Forgets those of `digests` that no repository links (any more), in one transaction.
    /// Returns the ones it forgot.
    pub async fn gc_forget_blobs(&self, digests: Vec<String>) -> Result<Vec<String>> {
        self.write(move |c| {
            let mut stmt = c.prepare_cached(
                "DELETE FROM blobs WHERE digest = ?1
                    AND NOT EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = blobs.digest)",
            )?;
            let mut forgotten = Vec::new();
            for digest in digests {
                if stmt.execute([&digest])? > 0 {
                    forgotten.push(digest);
                }
            }
            Ok(forgotten)
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
