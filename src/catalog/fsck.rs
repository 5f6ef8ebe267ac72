//! The catalog's side of `stowage fsck` (see `admin::fsck`): listing every recorded blob, and
//! forgetting one whose object is missing or corrupt.
//!
//! Forgetting a blob removes its row and its repository links, nothing else: manifests keep
//! their references (`manifest_refs.digest` has no foreign key to `blobs`), so every manifest
//! stays readable, while the blob answers `BLOB_UNKNOWN` until it is pushed again. Since
//! deduplication trusts only recorded blobs whose object exists, that next push stores fresh,
//! verified bytes. A Spack index whose manifest lists the blob is marked stale, so that the
//! next read of `index.spack` rebuilds (and stores again) the index blob.
//!
//! It also recounts the figures the catalog keeps per repository for the web UI (tag count,
//! bytes of the blobs it links, bytes of its manifests: the invariant is written in
//! `migrations/0013_repo_stats.sql`) and compares them with the kept ones, a page of
//! repositories per query: each query reads the kept figures and the recount from one snapshot,
//! so a live server's concurrent pushes never show as a mismatch. The repair sets a repository's
//! figures to a recount made inside the write transaction.
//!
//! Likewise for the figures the Spack index is built from (per node: closure, spec and
//! dependent counts; per repository: spec counts; the invariant is written in
//! `migrations/0015_spack_fragments.sql`): [`Catalog::check_spack_figures`] recounts them one
//! repository per snapshot, [`Catalog::repair_spack_figures`] sets them to a recount in one write
//! transaction and marks the repository's index stale, so that the next read of `index.spack`
//! rebuilds it from the repaired figures.

use super::db::{self, params};

use super::Catalog;
use crate::error::Result;

/// A repository's figures for the web UI (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepoFigures {
    pub tags: i64,
    pub blob_bytes: i64,
    pub manifest_bytes: i64,
}

/// A repository whose kept figures differ from a recount.
#[derive(Debug, Clone)]
pub struct RepoFiguresMismatch {
    pub repo: String,
    pub kept: RepoFigures,
    pub counted: RepoFigures,
}

/// A page of [`Catalog::check_repo_figures`].
#[derive(Debug, Clone)]
pub struct RepoFiguresPage {
    /// Repositories examined.
    pub checked: u64,
    pub mismatches: Vec<RepoFiguresMismatch>,
    /// Pass it as `after` for the next page; `None` after the last.
    pub next: Option<i64>,
}

/// The recount of repository `?1`'s figures, in the order of [`RepoFigures`].
const RECOUNT: &str = "(SELECT count(*) FROM tags WHERE repo_id = ?1),
     (SELECT coalesce(sum(b.size), 0) FROM repo_blobs rb JOIN blobs b ON b.digest = rb.digest WHERE rb.repo_id = ?1),
     (SELECT coalesce(sum(size), 0) FROM manifests WHERE repo_id = ?1)";

/// A Spack build cache whose kept index figures differ from a recount.
#[derive(Debug, Clone)]
pub struct SpackFiguresMismatch {
    pub repo: String,
    /// Nodes with a closure, spec or dependent count that differs from the recount.
    pub nodes_wrong: i64,
    /// Spec count and old-layout spec count, kept and recounted.
    pub specs_kept: (i64, i64),
    pub specs_counted: (i64, i64),
}

/// A page of [`Catalog::check_spack_figures`].
#[derive(Debug, Clone)]
pub struct SpackFiguresPage {
    /// Build caches examined.
    pub checked: u64,
    pub mismatches: Vec<SpackFiguresMismatch>,
    /// Pass it as `after` for the next page; `None` after the last.
    pub next: Option<i64>,
}

/// Recounts of node `n`'s figures (see `migrations/0015_spack_fragments.sql`), in the order
/// closure_refs, spec_refs, ref_count. The dependents are counted through `spack_closure`, not
/// through the kept `closure_refs` under check.
const SPACK_NODE_RECOUNT: &str =
    "(SELECT count(*) FROM spack_closure c WHERE c.repo_id = n.repo_id AND c.hash = n.hash),
     (SELECT count(*) FROM spack_specs s WHERE s.repo_id = n.repo_id AND s.hash = n.hash),
     (SELECT count(*) FROM spack_deps d WHERE d.repo_id = n.repo_id AND d.dep_hash = n.hash
         AND EXISTS (SELECT 1 FROM spack_closure c2 WHERE c2.repo_id = d.repo_id AND c2.hash = d.hash))";

/// Recount of build cache `?1`'s spec counts: specs, specs with layout_version < 3.
const SPACK_SPECS_RECOUNT: &str = "(SELECT count(*) FROM spack_specs WHERE repo_id = ?1),
     (SELECT count(*) FROM spack_specs WHERE repo_id = ?1 AND layout_version < 3)";

impl Catalog {
    /// Recounts the Spack index figures of up to `limit` build caches whose repository id is
    /// above `after` (in id order), each from one snapshot, and returns those that differ.
    pub async fn check_spack_figures(&self, after: i64, limit: usize) -> Result<SpackFiguresPage> {
        self.read(move |c| {
            let mut ids = c.prepare_cached(
                "SELECT i.repo_id, r.name FROM spack_index i JOIN repositories r ON r.id = i.repo_id
                  WHERE i.repo_id > ?1 ORDER BY i.repo_id LIMIT ?2",
            )?;
            let ids = ids
                .query_map(params![after, limit as i64], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?
                .collect::<db::Result<Vec<_>>>()?;
            let mut mismatches = Vec::new();
            for (id, repo) in &ids {
                let tx = c.unchecked_transaction()?;
                let nodes_wrong: i64 = tx.query_row(
                    &format!(
                        "SELECT count(*) FROM spack_nodes n
                          WHERE n.repo_id = ?1 AND (n.closure_refs, n.spec_refs, n.ref_count) <> (SELECT {SPACK_NODE_RECOUNT})"
                    ),
                    [id],
                    |r| r.get(0),
                )?;
                let (specs_kept, specs_counted) = tx.query_row(
                    &format!("SELECT specs, old_layout_specs, {SPACK_SPECS_RECOUNT} FROM spack_index WHERE repo_id = ?1"),
                    [id],
                    |r| Ok(((r.get(0)?, r.get(1)?), (r.get(2)?, r.get(3)?))),
                )?;
                tx.commit()?;
                if nodes_wrong > 0 || specs_kept != specs_counted {
                    mismatches.push(SpackFiguresMismatch {
                        repo: repo.clone(),
                        nodes_wrong,
                        specs_kept,
                        specs_counted,
                    });
                }
            }
            Ok(SpackFiguresPage {
                checked: ids.len() as u64,
                mismatches,
                next: (ids.len() >= limit).then(|| ids.last().map(|(id, _)| *id)).flatten(),
            })
        })
        .await
    }

    /// Sets build cache `repo`'s Spack index figures to a recount and marks its index stale,
    /// in one transaction. Returns the number of node rows whose figures changed, or `None`
    /// when the repository holds no Spack index.
    pub async fn repair_spack_figures(&self, repo: &str) -> Result<Option<u64>> {
        let repo = repo.to_owned();
        self.write(move |c| {
            let Some(id) = super::queries::repo_id(c, &repo)? else {
                return Ok(None);
            };
            let changed = c.execute(
                &format!(
                    "UPDATE spack_nodes AS n SET (closure_refs, spec_refs, ref_count) = (SELECT {SPACK_NODE_RECOUNT})
                      WHERE n.repo_id = ?1
                        AND (n.closure_refs, n.spec_refs, n.ref_count) <> (SELECT {SPACK_NODE_RECOUNT})"
                ),
                [id],
            )?;
            let index = c.execute(
                &format!(
                    "UPDATE spack_index SET (specs, old_layout_specs) = (SELECT {SPACK_SPECS_RECOUNT}),
                            built_generation = NULL
                      WHERE repo_id = ?1"
                ),
                [id],
            )?;
            Ok((index > 0).then_some(changed as u64))
        })
        .await
    }

    /// Up to `limit` recorded blobs (digest, recorded size, whether it is a composite) whose
    /// digest sorts after `after`, in digest order: page through every blob by passing the last
    /// digest of a page.
    pub async fn blobs_after(&self, after: Option<String>, limit: usize) -> Result<Vec<(String, u64, bool)>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT digest, size, composite FROM blobs WHERE digest > ?1 ORDER BY digest LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after.clone().unwrap_or_default(), limit as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, bool>(2)?))
            })?;
            Ok(rows.collect::<db::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Forgets blob `digest` (see the module doc), in one transaction. Returns the number of
    /// repositories it was linked to, or `None` when the catalog did not record it.
    pub async fn forget_blob(&self, digest: &str) -> Result<Option<u64>> {
        let digest = digest.to_owned();
        self.write(move |c| {
            // A composite made of it is as bad as it: forgotten first (its pieces with it).
            let composites = c
                .prepare_cached("SELECT DISTINCT digest FROM blob_pieces WHERE piece = ?1")?
                .query_map([&digest], |r| r.get::<_, String>(0))?
                .collect::<db::Result<Vec<_>>>()?;
            for composite in &composites {
                forget_one(c, composite)?;
            }
            Ok(forget_one(c, &digest)?)
        })
        .await
    }

    /// Recounts the figures of up to `limit` repositories whose id is above `after` (in id
    /// order) and returns those whose kept figures differ (see the module doc).
    pub async fn check_repo_figures(&self, after: i64, limit: usize) -> Result<RepoFiguresPage> {
        self.read(move |c| {
            let mut ids = c.prepare_cached("SELECT id FROM repositories WHERE id > ?1 ORDER BY id LIMIT ?2")?;
            let ids = ids
                .query_map(params![after, limit as i64], |r| r.get::<_, i64>(0))?
                .collect::<db::Result<Vec<_>>>()?;
            let mut figures = c.prepare_cached(&format!(
                "SELECT name, tag_count, blob_bytes, manifest_bytes, {RECOUNT} FROM repositories WHERE id = ?1"
            ))?;
            let mut mismatches = Vec::new();
            for id in &ids {
                let m = figures.query_row([id], |r| {
                    Ok(RepoFiguresMismatch {
                        repo: r.get(0)?,
                        kept: RepoFigures {
                            tags: r.get(1)?,
                            blob_bytes: r.get(2)?,
                            manifest_bytes: r.get(3)?,
                        },
                        counted: RepoFigures {
                            tags: r.get(4)?,
                            blob_bytes: r.get(5)?,
                            manifest_bytes: r.get(6)?,
                        },
                    })
                })?;
                if m.kept != m.counted {
                    mismatches.push(m);
                }
            }
            Ok(RepoFiguresPage {
                checked: ids.len() as u64,
                mismatches,
                next: (ids.len() >= limit).then(|| ids.last().copied()).flatten(),
            })
        })
        .await
    }

    /// Sets repository `repo`'s kept figures to a recount, in one transaction. Returns the
    /// figures it set, or `None` when the repository does not exist.
    pub async fn repair_repo_figures(&self, repo: &str) -> Result<Option<RepoFigures>> {
        let repo = repo.to_owned();
        self.write(move |c| {
            let Some(id) = super::queries::repo_id(c, &repo)? else {
                return Ok(None);
            };
            let counted = c.query_row(&format!("SELECT {RECOUNT}"), [id], |r| {
                Ok(RepoFigures {
                    tags: r.get(0)?,
                    blob_bytes: r.get(1)?,
                    manifest_bytes: r.get(2)?,
                })
            })?;
            c.execute(
                "UPDATE repositories SET tag_count = ?2, blob_bytes = ?3, manifest_bytes = ?4 WHERE id = ?1",
                params![id, counted.tags, counted.blob_bytes, counted.manifest_bytes],
            )?;
            Ok(Some(counted))
        })
        .await
    }
}

/// Marks stale every Spack index whose manifest lists blob `digest`, and removes the blob's
/// links and row (its own pieces' rows cascade). Returns how many repositories linked it, or
/// `None` when the catalog did not record it.
fn forget_one(c: &db::Connection, digest: &str) -> db::Result<Option<u64>> {
    c.execute(
        "UPDATE spack_index SET built_generation = NULL
          WHERE manifest_digest IN (
                SELECT m.digest FROM manifest_refs r JOIN manifests m ON m.id = r.manifest_id
                 WHERE r.digest = ?1 AND m.repo_id = spack_index.repo_id)",
        [digest],
    )?;
    let links = c.execute("DELETE FROM repo_blobs WHERE digest = ?1", [digest])?;
    let rows = c.execute("DELETE FROM blobs WHERE digest = ?1", [digest])?;
    Ok((rows > 0).then_some(links as u64))
}
