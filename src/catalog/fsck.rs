//! The catalog's side of `stowage fsck` (see `admin::fsck`): listing every recorded blob, and
//! forgetting one whose object is missing or corrupt.
//!
//! Forgetting a blob removes its row and its repository links, nothing else: manifests keep
//! their references (`manifest_refs.digest` has no foreign key to `blobs`), so every manifest
//! stays readable, while the blob answers `BLOB_UNKNOWN` until it is pushed again. Since
//! deduplication trusts only recorded blobs whose object exists, that next push stores fresh,
//! verified bytes. A Spack index whose manifest lists the blob is marked stale, so that the
//! next read of `index.spack` rebuilds (and stores again) the index blob.

use rusqlite::params;

use super::Catalog;
use crate::error::Result;

impl Catalog {
    /// Up to `limit` recorded blobs (digest, recorded size) whose digest sorts after `after`,
    /// in digest order: page through every blob by passing the last digest of a page.
    pub async fn blobs_after(&self, after: Option<String>, limit: usize) -> Result<Vec<(String, u64)>> {
        self.read(move |c| {
            let mut stmt =
                c.prepare_cached("SELECT digest, size FROM blobs WHERE digest > ?1 ORDER BY digest LIMIT ?2")?;
            let rows = stmt.query_map(params![after.unwrap_or_default(), limit as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Forgets blob `digest` (see the module doc), in one transaction. Returns the number of
    /// repositories it was linked to, or `None` when the catalog did not record it.
    pub async fn forget_blob(&self, digest: &str) -> Result<Option<u64>> {
        let digest = digest.to_owned();
        self.write(move |c| {
            c.execute(
                "UPDATE spack_index SET built_generation = NULL
                  WHERE manifest_digest IN (
                        SELECT m.digest FROM manifest_refs r JOIN manifests m ON m.id = r.manifest_id
                         WHERE r.digest = ?1 AND m.repo_id = spack_index.repo_id)",
                [&digest],
            )?;
            let links = c.execute("DELETE FROM repo_blobs WHERE digest = ?1", [&digest])?;
            let rows = c.execute("DELETE FROM blobs WHERE digest = ?1", [&digest])?;
            Ok((rows > 0).then_some(links as u64))
        })
        .await
    }
}
