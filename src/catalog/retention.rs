//! Catalog side of retention: the reads a retention pass plans from, the short write
//! transactions that delete what it decided (each re-checking, inside the transaction, that the
//! reason still holds), last-pulled times, and Spack keep-lists.
//!
//! Nothing here decides what to keep: that is `registry::retention`. Reads run on the reader
//! connections; every write is one bounded job in the writer's group commit (at most one batch
//! of tags, or [`PULL_BATCH`] pulled-at updates), so retention never holds the writer for long.

use std::collections::HashSet;

use super::db::{self, Connection, OptionalExtension, params};

use super::Catalog;
use super::audit::{self, Action, Actor, Event};
use super::queries::repo_id;
use crate::error::Result;
use crate::oci::RepoName;

/// A tag as a retention pass sees it.
#[derive(Debug, Clone)]
pub struct RetentionTag {
    pub name: String,
    pub manifest_id: i64,
    pub digest: String,
    /// When the tag was last pushed (unix seconds).
    pub updated_at: i64,
    /// When its manifest was last pulled, if recorded.
    pub pulled_at: Option<i64>,
    /// The spec DAG hash, for a Spack spec tag.
    pub spack_hash: Option<String>,
}

/// A tag a pass decided to delete, with what it saw, re-checked at deletion.
#[derive(Debug, Clone)]
pub struct TagRemoval {
    pub name: String,
    pub manifest_id: i64,
    pub updated_at: i64,
    /// A Spack spec tag (deleted only while the repository's spec tags are as planned).
    pub spack: bool,
    /// The manifest's digest and why the tag goes (`rule 0: …`), for the audit trail.
    pub digest: String,
    pub reason: String,
}

/// What one repository looked like when a pass planned its deletions.
#[derive(Debug, Clone)]
pub struct RetentionSnapshot {
    pub repo_id: i64,
    /// The Spack index generation (bumped by every change to the spec tags), if any.
    pub spack_generation: Option<i64>,
    /// The `keep_last` newest tags (by push time, then name).
    pub newest: HashSet<String>,
    /// Every hash the live keep-lists keep: their roots and link/run dependency closure.
    pub kept_hashes: HashSet<String>,
    /// When the snapshot was taken (unix seconds).
    pub taken_at: i64,
}

/// What [`Catalog::retention_delete`] did.
#[derive(Debug, Clone, Default)]
pub struct RetentionDeleted {
    /// Tags deleted.
    pub deleted: Vec<String>,
    /// The repository's spec tags or keep-lists changed since the snapshot: its spec tags were
    /// left alone (plan again).
    pub spack_changed: bool,
    /// The Spack generation after the deletions (the expected one for the next batch).
    pub spack_generation: Option<i64>,
}

/// A keep-list as the API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeepList {
    pub name: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub created_by: Option<String>,
    pub hashes: Vec<String>,
}

/// Pulled-at updates per write job.
pub const PULL_BATCH: usize = 1000;

/// The hashes the live keep-lists of a repository keep: their roots and, transitively, every
/// dependency reached through an edge whose deptypes include `link` or `run`.
fn kept_closure(c: &Connection, repo_id: i64, now: i64) -> db::Result<HashSet<String>> {
    // `deptypes` is a JSON array of strings; each engine has its own way to read one.
    macro_rules! kept_through {
        ($link_or_run:literal) => {
            concat!(
                "WITH RECURSIVE kept(hash) AS (
                     SELECT h.hash FROM spack_keep_hashes h
                       JOIN spack_keep k ON k.repo_id = h.repo_id AND k.name = h.name
                      WHERE h.repo_id = ?1 AND k.expires_at > ?2
                     UNION
                     SELECT d.dep_hash FROM spack_deps d JOIN kept ON d.hash = kept.hash
                      WHERE d.repo_id = ?1 AND ",
                $link_or_run,
                "
                 )
                 SELECT hash FROM kept"
            )
        };
    }
    let mut stmt = c.prepare_cached(match c.engine() {
        db::Engine::Sqlite => {
            kept_through!("EXISTS (SELECT 1 FROM json_each(d.deptypes) WHERE value IN ('link', 'run'))")
        }
        db::Engine::Postgres => kept_through!("jsonb_exists_any(d.deptypes::jsonb, ARRAY['link', 'run'])"),
    })?;
    let rows = stmt.query_map(params![repo_id, now], |r| r.get::<_, String>(0))?;
    rows.collect()
}

/// Whether tag `name` pushed at `updated_at` has at least `n` tags of its repository newer than
/// it (by push time, then name: the order `keep_last` counts in).
const NEWER_TAGS: &str = "(SELECT COUNT(*) FROM (SELECT 1 FROM tags t2 WHERE t2.repo_id = ?1
      AND (t2.updated_at > ?4 OR (t2.updated_at = ?4 AND t2.name > ?2)) LIMIT ?6) AS newer) >= ?6";

impl Catalog {
    /// Plans a repository's pass: `None` when it does not exist.
    pub async fn retention_snapshot(
        &self,
        repo: &RepoName,
        keep_last: Option<u32>,
        now: i64,
    ) -> Result<Option<RetentionSnapshot>> {
        let repo = repo.to_string();
        self.read(move |c| {
            let tx = c.unchecked_transaction()?;
            let Some(repo_id) = repo_id(&tx, &repo)? else {
                return Ok(None);
            };
            let spack_generation = tx
                .query_row(
                    "SELECT generation FROM spack_index WHERE repo_id = ?1",
                    [repo_id],
                    |r| r.get(0),
                )
                .optional()?;
            let mut newest = HashSet::new();
            if let Some(n) = keep_last {
                let mut stmt = tx.prepare_cached(
                    "SELECT name FROM tags WHERE repo_id = ?1 ORDER BY updated_at DESC, name DESC LIMIT ?2",
                )?;
                for name in stmt.query_map(params![repo_id, n], |r| r.get::<_, String>(0))? {
                    newest.insert(name?);
                }
            }
            let kept_hashes = kept_closure(&tx, repo_id, now)?;
            drop(tx);
            Ok(Some(RetentionSnapshot {
                repo_id,
                spack_generation,
                newest,
                kept_hashes,
                taken_at: now,
            }))
        })
        .await
    }

    /// Up to `limit` tags of a repository after `after`, in name order.
    pub async fn retention_tags(&self, repo_id: i64, after: Option<String>, limit: usize) -> Result<Vec<RetentionTag>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT t.name, t.manifest_id, m.digest, t.updated_at, m.pulled_at, s.hash
                   FROM tags t JOIN manifests m ON m.id = t.manifest_id
                   LEFT JOIN spack_specs s ON s.repo_id = t.repo_id AND s.tag = t.name
                  WHERE t.repo_id = ?1 AND t.name > ?2
                  ORDER BY t.name LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![repo_id, after.clone().unwrap_or_default(), limit as i64], |r| {
                Ok(RetentionTag {
                    name: r.get(0)?,
                    manifest_id: r.get(1)?,
                    digest: r.get(2)?,
                    updated_at: r.get(3)?,
                    pulled_at: r.get(4)?,
                    spack_hash: r.get(5)?,
                })
            })?;
            Ok(rows.collect::<db::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Deletes planned tags in one write job, each only if it still names the same manifest, was
    /// not pushed again, was not pulled since `pulled_since` (when the rule keeps pulled tags),
    /// and still has `keep_last` newer tags. Spec tags are deleted only while the repository's
    /// spec tags are at `snapshot`'s generation (`expected_generation`) and no keep-list was
    /// created or replaced since the snapshot; otherwise they are left for a new plan. Each tag
    /// deleted is recorded in the audit trail (actor `retention`, with the rule and reason).
    pub async fn retention_delete(
        &self,
        snapshot_repo: i64,
        snapshot_taken_at: i64,
        expected_generation: Option<i64>,
        removals: Vec<TagRemoval>,
        pulled_since: Option<i64>,
        keep_last: Option<u32>,
    ) -> Result<RetentionDeleted> {
        self.write(move |c| {
            let repo_id = snapshot_repo;
            let generation = |c: &Connection| -> db::Result<Option<i64>> {
                c.query_row(
                    "SELECT generation FROM spack_index WHERE repo_id = ?1",
                    [repo_id],
                    |r| r.get(0),
                )
                .optional()
            };
            let mut out = RetentionDeleted::default();
            let mut spack_ok = true;
            if removals.iter().any(|r| r.spack) {
                let fresh_keep: bool = c.query_row(
                    "SELECT EXISTS (SELECT 1 FROM spack_keep WHERE repo_id = ?1 AND created_at >= ?2)",
                    params![repo_id, snapshot_taken_at],
                    |r| r.get(0),
                )?;
                spack_ok = !fresh_keep && generation(c)? == expected_generation;
                out.spack_changed = !spack_ok;
            }
            let sql = format!(
                "DELETE FROM tags WHERE repo_id = ?1 AND name = ?2 AND manifest_id = ?3 AND updated_at = ?4
                    AND (CAST(?5 AS BIGINT) IS NULL OR NOT EXISTS (SELECT 1 FROM manifests m WHERE m.id = ?3 AND m.pulled_at >= ?5))
                    AND (CAST(?6 AS BIGINT) IS NULL OR {NEWER_TAGS})"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let actor = Actor::system("retention");
            let now = super::now();
            let repo_name: String =
                c.query_row("SELECT name FROM repositories WHERE id = ?1", [repo_id], |r| r.get(0))?;
            for r in removals.iter().filter(|r| spack_ok || !r.spack) {
                let n = stmt.execute(params![
                    repo_id,
                    r.name,
                    r.manifest_id,
                    r.updated_at,
                    pulled_since,
                    keep_last
                ])?;
                if n > 0 {
                    out.deleted.push(r.name.clone());
                    let event = Event::new(Action::RetentionDelete)
                        .repo(repo_name.as_str())
                        .tag(Some(r.name.as_str()))
                        .digest(r.digest.as_str())
                        .detail(serde_json::json!({ "reason": r.reason }));
                    audit::record(c, &actor, &event, now)?;
                }
            }
            out.spack_generation = generation(c)?;
            Ok(out)
        })
        .await
    }

    /// Removes up to `limit` keep-lists that expired before `now`; returns (repository, name)
    /// of each.
    pub async fn remove_expired_keep_lists(&self, now: i64, limit: usize) -> Result<Vec<(String, String)>> {
        self.write(move |c| {
            let mut stmt = c.prepare_cached(
                "DELETE FROM spack_keep WHERE (repo_id, name) IN
                    (SELECT repo_id, name FROM spack_keep WHERE expires_at <= ?1 LIMIT ?2)
                 RETURNING (SELECT r.name FROM repositories r WHERE r.id = spack_keep.repo_id), name",
            )?;
            let rows = stmt.query_map(params![now, limit as i64], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?.unwrap_or_default(),
                    r.get::<_, String>(1)?,
                ))
            })?;
            Ok(rows.collect::<db::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Records last-pulled times: `(repository, digest, unix seconds)`, each written only when
    /// the stored value is older than `recent_secs` before it. At most [`PULL_BATCH`] per call.
    pub async fn record_pulls(&self, pulls: Vec<(String, String, i64)>, recent_secs: i64) -> Result<u64> {
        self.write(move |c| {
            let mut stmt = c.prepare_cached(
                "UPDATE manifests SET pulled_at = ?3
                  WHERE repo_id = (SELECT id FROM repositories WHERE name = ?1) AND digest = ?2
                    AND (pulled_at IS NULL OR pulled_at < CAST(?3 AS BIGINT) - CAST(?4 AS BIGINT))",
            )?;
            let mut written = 0u64;
            for (repo, digest, at) in &pulls {
                written += stmt.execute(params![repo, digest, at, recent_secs])? as u64;
            }
            Ok(written)
        })
        .await
    }

    /// Creates or replaces a keep-list. `false` when the repository does not exist.
    pub async fn put_keep_list(
        &self,
        repo: &RepoName,
        name: String,
        expires_at: i64,
        created_by: Option<String>,
        hashes: Vec<String>,
    ) -> Result<bool> {
        let repo = repo.to_string();
        self.write(move |c| {
            let Some(repo_id) = repo_id(c, &repo)? else { return Ok(false) };
            c.execute(
                "DELETE FROM spack_keep WHERE repo_id = ?1 AND name = ?2",
                params![repo_id, name],
            )?;
            c.execute(
                "INSERT INTO spack_keep (repo_id, name, created_at, expires_at, created_by) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![repo_id, name, super::now(), expires_at, created_by],
            )?;
            let mut stmt = c.prepare_cached(
                "INSERT INTO spack_keep_hashes (repo_id, name, hash) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            )?;
            for h in &hashes {
                stmt.execute(params![repo_id, name, h])?;
            }
            Ok(true)
        })
        .await
    }

    /// A repository's keep-lists, by name; `None` when it does not exist.
    pub async fn keep_lists(&self, repo: &RepoName) -> Result<Option<Vec<KeepList>>> {
        let repo = repo.to_string();
        self.read(move |c| {
            let tx = c.unchecked_transaction()?;
            let Some(repo_id) = repo_id(&tx, &repo)? else {
                return Ok(None);
            };
            let mut lists = tx
                .prepare_cached(
                    "SELECT name, created_at, expires_at, created_by FROM spack_keep WHERE repo_id = ?1 ORDER BY name",
                )?
                .query_map([repo_id], |r| {
                    Ok(KeepList {
                        name: r.get(0)?,
                        created_at: r.get(1)?,
                        expires_at: r.get(2)?,
                        created_by: r.get(3)?,
                        hashes: Vec::new(),
                    })
                })?
                .collect::<db::Result<Vec<_>>>()?;
            let mut hashes =
                tx.prepare_cached("SELECT hash FROM spack_keep_hashes WHERE repo_id = ?1 AND name = ?2 ORDER BY hash")?;
            for list in &mut lists {
                list.hashes = hashes
                    .query_map(params![repo_id, list.name], |r| r.get(0))?
                    .collect::<db::Result<Vec<String>>>()?;
            }
            Ok(Some(lists))
        })
        .await
    }

    /// Deletes a keep-list; whether it existed.
    pub async fn delete_keep_list(&self, repo: &RepoName, name: String) -> Result<bool> {
        let repo = repo.to_string();
        self.write(move |c| {
            let n = c.execute(
                "DELETE FROM spack_keep WHERE name = ?2 AND repo_id = (SELECT id FROM repositories WHERE name = ?1)",
                params![repo, name],
            )?;
            Ok(n > 0)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A catalog with repository 1 (`r`), manifests 1 and 2, and `setup` run on it.
    async fn catalog(setup: &'static str) -> (tempfile::TempDir, Catalog) {
        let tmp = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&tmp.path().join("catalog.db")).unwrap();
        catalog
            .write(move |c| {
                c.execute_batch(
                    "INSERT INTO repositories (id, name, created_at) VALUES (1, 'r', 0);
                     INSERT INTO manifests (id, repo_id, digest, media_type, size, content, created_at)
                          VALUES (1, 1, 'sha256:01', 'x', 1, x'00', 0), (2, 1, 'sha256:02', 'x', 1, x'00', 0);",
                )?;
                c.execute_batch(setup)?;
                Ok(())
            })
            .await
            .unwrap();
        (tmp, catalog)
    }

    fn removal(name: &str, manifest_id: i64, updated_at: i64, spack: bool) -> TagRemoval {
        TagRemoval {
            name: name.into(),
            manifest_id,
            updated_at,
            spack,
            digest: String::new(),
            reason: "test".into(),
        }
    }

    async fn tag_names(catalog: &Catalog) -> Vec<String> {
        catalog
            .read(|c| {
                let mut stmt = c.prepare("SELECT name FROM tags ORDER BY name")?;
                Ok(stmt.query_map([], |r| r.get(0))?.collect::<db::Result<Vec<String>>>()?)
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn deletes_recheck_what_the_plan_saw() {
        let (_tmp, catalog) = catalog(
            "INSERT INTO tags (repo_id, name, manifest_id, updated_at) VALUES
                (1, 'gone', 1, 100), (1, 'repushed', 1, 200), (1, 'moved', 2, 300), (1, 'pulled', 2, 50);
             UPDATE manifests SET pulled_at = 1000 WHERE id = 2;",
        )
        .await;
        let done = catalog
            .retention_delete(
                1,
                0,
                None,
                vec![
                    removal("gone", 1, 100, false),
                    // Pushed again after the plan read it.
                    removal("repushed", 1, 150, false),
                    // Now names another manifest.
                    removal("moved", 1, 300, false),
                    // Pulled after the rule's cutoff.
                    removal("pulled", 2, 50, false),
                ],
                Some(900),
                None,
            )
            .await
            .unwrap();
        assert_eq!(done.deleted, ["gone"]);
        assert_eq!(tag_names(&catalog).await, ["moved", "pulled", "repushed"]);
        let done = catalog
            .retention_delete(1, 0, None, vec![removal("pulled", 2, 50, false)], Some(1001), None)
            .await
            .unwrap();
        assert_eq!(done.deleted, ["pulled"], "not pulled since a later cutoff");
    }

    #[tokio::test]
    async fn keep_last_is_rechecked_against_the_tags_left() {
        let (_tmp, catalog) = catalog(
            "INSERT INTO tags (repo_id, name, manifest_id, updated_at) VALUES
                (1, 'a', 1, 100), (1, 'b', 1, 200), (1, 'c', 1, 300);",
        )
        .await;
        // keep_last = 2, and a plan that saw more tags (a client deleted some since): `a` still
        // has two newer tags and goes, `b` has only one left and stays.
        let done = catalog
            .retention_delete(
                1,
                0,
                None,
                vec![removal("a", 1, 100, false), removal("b", 1, 200, false)],
                None,
                Some(2),
            )
            .await
            .unwrap();
        assert_eq!(done.deleted, ["a"]);
        assert_eq!(tag_names(&catalog).await, ["b", "c"]);
    }

    const SPACK: &str = "INSERT INTO tags (repo_id, name, manifest_id, updated_at) VALUES
            (1, 'p-1-aaa.spack', 1, 100), (1, 'plain', 1, 100);
         INSERT INTO spack_specs (repo_id, tag, hash, manifest_id, layout_version)
              VALUES (1, 'p-1-aaa.spack', 'aaa', 1, 3);";

    #[tokio::test]
    async fn spec_tags_wait_for_a_new_plan_when_spec_tags_change() {
        let (_tmp, catalog) = catalog(SPACK).await;
        let generation = catalog
            .retention_snapshot(&"r".parse().unwrap(), None, 10)
            .await
            .unwrap()
            .unwrap()
            .spack_generation
            .unwrap();
        let plan = || vec![removal("p-1-aaa.spack", 1, 100, true), removal("plain", 1, 100, false)];
        // A spec tag was pushed or removed since the plan: only the plain tag goes.
        let done = catalog
            .retention_delete(1, 10, Some(generation - 1), plan(), None, None)
            .await
            .unwrap();
        assert!(done.spack_changed);
        assert_eq!(done.deleted, ["plain"]);
        let done = catalog
            .retention_delete(1, 10, Some(generation), plan(), None, None)
            .await
            .unwrap();
        assert!(!done.spack_changed);
        assert_eq!(done.deleted, ["p-1-aaa.spack"]);
        assert_eq!(done.spack_generation, Some(generation + 1), "its own deletion counted");
    }

    #[tokio::test]
    async fn spec_tags_wait_for_a_new_plan_when_a_keep_list_is_created() {
        let (_tmp, catalog) = catalog(SPACK).await;
        let snapshot = catalog
            .retention_snapshot(&"r".parse().unwrap(), None, 10)
            .await
            .unwrap()
            .unwrap();
        catalog
            .put_keep_list(&"r".parse().unwrap(), "new".into(), i64::MAX, None, vec!["zzz".into()])
            .await
            .unwrap();
        let done = catalog
            .retention_delete(
                1,
                snapshot.taken_at,
                snapshot.spack_generation,
                vec![removal("p-1-aaa.spack", 1, 100, true)],
                None,
                None,
            )
            .await
            .unwrap();
        assert!(done.spack_changed && done.deleted.is_empty());
    }

    #[tokio::test]
    async fn the_closure_follows_link_and_run_edges_of_live_keep_lists() {
        let (_tmp, catalog) = catalog(
            "INSERT INTO spack_nodes (repo_id, hash, name, version, external, node) VALUES
                (1, 'a', 'a', '1', 0, '{}'), (1, 'b', 'b', '1', 0, '{}'), (1, 'c', 'c', '1', 0, '{}'),
                (1, 'd', 'd', '1', 0, '{}'), (1, 'e', 'e', '1', 0, '{}'), (1, 'f', 'f', '1', 0, '{}');
             INSERT INTO spack_deps (repo_id, hash, dep_hash, deptypes) VALUES
                (1, 'a', 'b', '[\"link\"]'), (1, 'b', 'c', '[\"run\"]'), (1, 'a', 'd', '[\"build\"]'),
                (1, 'c', 'e', '[\"build\",\"link\"]'), (1, 'd', 'f', '[\"link\"]'), (1, 'e', 'a', '[\"link\"]');
             INSERT INTO spack_keep (repo_id, name, created_at, expires_at) VALUES (1, 'live', 0, 100), (1, 'old', 0, 5);
             INSERT INTO spack_keep_hashes (repo_id, name, hash) VALUES (1, 'live', 'a'), (1, 'old', 'd');",
        )
        .await;
        let snapshot = catalog
            .retention_snapshot(&"r".parse().unwrap(), None, 10)
            .await
            .unwrap()
            .unwrap();
        let mut kept: Vec<&str> = snapshot.kept_hashes.iter().map(String::as_str).collect();
        kept.sort();
        // d is build-only (and f only through it); the expired list keeps nothing; the cycle
        // back to a ends.
        assert_eq!(kept, ["a", "b", "c", "e"]);
        let removed = catalog.remove_expired_keep_lists(10, 100).await.unwrap();
        assert_eq!(removed, [("r".to_owned(), "old".to_owned())]);
        let lists = catalog.keep_lists(&"r".parse().unwrap()).await.unwrap().unwrap();
        assert_eq!(lists.len(), 1);
        assert_eq!(lists[0].hashes, ["a"]);
    }

    #[tokio::test]
    async fn pulls_are_written_only_when_the_stored_time_is_old() {
        let (_tmp, catalog) = catalog("UPDATE manifests SET pulled_at = 9000 WHERE id = 2;").await;
        let pulls = vec![
            ("r".to_owned(), "sha256:01".to_owned(), 10_000),
            ("r".to_owned(), "sha256:02".to_owned(), 10_000),
            ("r".to_owned(), "sha256:ff".to_owned(), 10_000),
        ];
        assert_eq!(
            catalog.record_pulls(pulls.clone(), 3600).await.unwrap(),
            1,
            "02 is recent, ff unknown"
        );
        assert_eq!(
            catalog.record_pulls(pulls, 500).await.unwrap(),
            1,
            "02 is older than 500 s"
        );
    }
}
