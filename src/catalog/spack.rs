//! Catalog side of Spack build caches: recording spec tags and reading index snapshots.

use rusqlite::{Connection, OptionalExtension, params};

use super::Catalog;
use super::queries::repo_id;
use crate::error::{Internal, Result};
use crate::oci::RepoName;
use crate::spack::SpecImage;

/// Where a repository's index stands.
#[derive(Debug, Clone)]
pub struct IndexState {
    /// Bumped by every change to the repository's spec tags.
    pub generation: i64,
    /// The generation the current index manifest was built from.
    pub built_generation: Option<i64>,
    pub manifest_digest: Option<String>,
}

/// What [`Catalog::spack_index_stream`] serialised.
#[derive(Debug, Clone, Copy)]
pub struct IndexSnapshot {
    /// The index generation the snapshot is of.
    pub generation: i64,
    pub specs: usize,
    pub nodes: usize,
    /// Length of the JSON sent.
    pub bytes: u64,
}

/// Size of the pieces an index is streamed in.
const INDEX_PIECE: usize = 1024 * 1024;

/// Gathers serialised JSON into [`INDEX_PIECE`]s and hands each full one to the consumer.
struct PieceSink {
    piece: Vec<u8>,
    sent: u64,
    to: tokio::sync::mpsc::Sender<bytes::Bytes>,
}

impl PieceSink {
    fn push(&mut self, data: &[u8]) -> Result<()> {
        self.piece.extend_from_slice(data);
        if self.piece.len() >= INDEX_PIECE {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.piece.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.piece, Vec::with_capacity(INDEX_PIECE + 4096));
        self.sent += piece.len() as u64;
        self.to
            .blocking_send(bytes::Bytes::from(piece))
            .map_err(|_| Internal::Other("the index consumer went away").into())
    }
}

/// Records (or clears) the spec carried by `tag`, inside the manifest PUT's transaction.
/// Cost is proportional to this spec's DAG, whatever else the repository holds.
pub(super) fn sync_tag(
    c: &Connection,
    repo_id: i64,
    tag: &str,
    manifest_id: i64,
    spec: Option<&SpecImage>,
) -> rusqlite::Result<()> {
    c.prepare_cached("DELETE FROM spack_specs WHERE repo_id = ?1 AND tag = ?2")?
        .execute(params![repo_id, tag])?;
    let Some(spec) = spec else { return Ok(()) };
    let mut node_stmt = c.prepare_cached(
        "INSERT INTO spack_nodes (repo_id, hash, name, version, platform, os, target, compiler, external, node)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT DO NOTHING",
    )?;
    let mut dep_stmt = c.prepare_cached(
        "INSERT INTO spack_deps (repo_id, hash, dep_hash, deptypes) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
    )?;
    for n in &spec.nodes {
        let added = node_stmt.execute(params![
            repo_id, n.hash, n.name, n.version, n.platform, n.os, n.target, n.compiler, n.external, n.json
        ])?;
        if added > 0 {
            for (dep, types) in &n.dependencies {
                dep_stmt.execute(params![repo_id, n.hash, dep, types])?;
            }
        }
    }
    c.prepare_cached(
        "INSERT INTO spack_specs (repo_id, tag, hash, manifest_id, layout_version) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![repo_id, tag, spec.hash, manifest_id, spec.layout_version])?;
    let mut closure =
        c.prepare_cached("INSERT INTO spack_closure (repo_id, tag, hash) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING")?;
    for n in &spec.nodes {
        closure.execute(params![repo_id, tag, n.hash])?;
    }
    Ok(())
}

/// Records a freshly built index manifest as current, unless a newer build got there first.
pub(super) fn publish_index(c: &Connection, repo_id: i64, generation: i64, digest: &str) -> rusqlite::Result<()> {
    let previous: Option<String> = c
        .query_row(
            "SELECT manifest_digest FROM spack_index WHERE repo_id = ?1",
            [repo_id],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    let updated = c.execute(
        "UPDATE spack_index SET built_generation = ?2, manifest_digest = ?3
          WHERE repo_id = ?1 AND (built_generation IS NULL OR built_generation < ?2)",
        params![repo_id, generation, digest],
    )?;
    // The replaced index manifest is no longer reachable by anything but its digest; drop it
    // unless a client tag names it.
    if updated > 0
        && let Some(old) = previous.filter(|old| old != digest)
    {
        // Its blobs (the old index) leave promptly, not a grace period later: see
        // `registry::gc`. Recorded before the manifest goes, while its references are known.
        c.execute(
            "INSERT INTO gc_superseded (repo_id, digest, superseded_at)
             SELECT ?1, r.digest, ?3 FROM manifests m JOIN manifest_refs r ON r.manifest_id = m.id
              WHERE m.repo_id = ?1 AND m.digest = ?2 AND r.kind IN ('config', 'layer')
                AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.manifest_id = m.id)
             ON CONFLICT DO UPDATE SET superseded_at = excluded.superseded_at",
            params![repo_id, old, super::now()],
        )?;
        c.execute(
            "DELETE FROM manifests WHERE repo_id = ?1 AND digest = ?2
                    AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.manifest_id = manifests.id)",
            params![repo_id, old],
        )?;
    }
    Ok(())
}

impl Catalog {
    /// The index state of a repository that holds (or held) Spack specs.
    pub async fn spack_index_state(&self, repo: &RepoName) -> Result<Option<IndexState>> {
        let repo = repo.to_string();
        self.read(move |c| {
            let state = c
                .prepare_cached(
                    "SELECT s.generation, s.built_generation, s.manifest_digest
                       FROM spack_index s JOIN repositories r ON r.id = s.repo_id WHERE r.name = ?1",
                )?
                .query_row([repo], |r| {
                    Ok(IndexState {
                        generation: r.get(0)?,
                        built_generation: r.get(1)?,
                        manifest_digest: r.get(2)?,
                    })
                })
                .optional()?;
            Ok(state)
        })
        .await
    }

    /// Serialises the repository's index from one consistent snapshot of the catalog, sending
    /// it to `to` in [`INDEX_PIECE`]s as it goes, so that the index is never held whole in
    /// memory (it is about 1 KB per spec node: 49 MB at 50,000 specs). `None`, with nothing sent,
    /// when the repository has no Spack index.
    pub async fn spack_index_stream(
        &self,
        repo: &RepoName,
        to: tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) -> Result<Option<IndexSnapshot>> {
        let repo = repo.to_string();
        self.read(move |c| {
            let tx = c.unchecked_transaction()?;
            let Some((repo_id, generation)) = tx
                .query_row(
                    "SELECT s.repo_id, s.generation FROM spack_index s JOIN repositories r ON r.id = s.repo_id
                      WHERE r.name = ?1",
                    [&repo],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
                )
                .optional()?
            else {
                return Ok(None);
            };
            let (specs, min_layout): (i64, Option<i64>) = tx.query_row(
                "SELECT COUNT(*), MIN(layout_version) FROM spack_specs WHERE repo_id = ?1",
                [repo_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            // Spack 0.2x (layout 2) reads database version 7 only; 1.x reads 7 and 8. Serve the
            // newest version every client that pushed here can read.
            let version = if min_layout.is_some_and(|l| l < 3) { "7" } else { "8" };
            let mut out = PieceSink {
                piece: Vec::with_capacity(INDEX_PIECE + 4096),
                sent: 0,
                to,
            };
            out.push(b"{\"database\":{\"version\":\"")?;
            out.push(version.as_bytes())?;
            out.push(b"\",\"installs\":{")?;
            let mut stmt = tx.prepare(
                "SELECT n.hash, n.node,
                        (SELECT COUNT(*) FROM spack_deps d
                          WHERE d.repo_id = n.repo_id AND d.dep_hash = n.hash
                            AND EXISTS (SELECT 1 FROM spack_closure c2 WHERE c2.repo_id = d.repo_id AND c2.hash = d.hash)),
                        EXISTS (SELECT 1 FROM spack_specs s WHERE s.repo_id = n.repo_id AND s.hash = n.hash)
                   FROM spack_nodes n
                  WHERE n.repo_id = ?1
                    AND EXISTS (SELECT 1 FROM spack_closure c WHERE c.repo_id = n.repo_id AND c.hash = n.hash)
                  ORDER BY n.hash",
            )?;
            let mut rows = stmt.query([repo_id])?;
            let mut nodes = 0usize;
            while let Some(row) = rows.next()? {
                let hash: String = row.get(0)?;
                let node: String = row.get(1)?;
                let ref_count: i64 = row.get(2)?;
                let in_buildcache: bool = row.get(3)?;
                if nodes > 0 {
                    out.push(b",")?;
                }
                nodes += 1;
                out.push(serde_json::Value::String(hash).to_string().as_bytes())?;
                out.push(b":{\"spec\":")?;
                out.push(node.as_bytes())?;
                out.push(format!(",\"ref_count\":{ref_count},\"in_buildcache\":{in_buildcache}}}").as_bytes())?;
            }
            out.push(b"}}}")?;
            out.flush()?;
            drop(rows);
            drop(stmt);
            tx.commit()?;
            Ok(Some(IndexSnapshot {
                generation,
                specs: specs as usize,
                nodes,
                bytes: out.sent,
            }))
        })
        .await
    }
}

/// A spec in a build cache, as the Spack API lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpecSummary {
    pub hash: String,
    pub name: String,
    pub version: String,
    pub platform: Option<String>,
    pub os: Option<String>,
    pub target: Option<String>,
    pub compiler: Option<String>,
    pub tag: String,
    pub layout_version: i64,
}

/// Filters of a spec search; `None` matches anything.
#[derive(Debug, Clone, Default)]
pub struct SpecQuery {
    pub name: Option<String>,
    pub version: Option<String>,
    /// A prefix of the DAG hash (letters and digits only).
    pub hash_prefix: Option<String>,
    pub platform: Option<String>,
    pub os: Option<String>,
    pub target: Option<String>,
    /// `gcc` or `gcc@12.2.0`.
    pub compiler: Option<String>,
    pub limit: u64,
    pub offset: u64,
}

/// A node of a spec's DAG, with whether the cache holds it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClosureNode {
    pub hash: String,
    pub name: String,
    pub version: String,
    pub external: bool,
    /// The cache has a spec image for this node.
    pub in_buildcache: bool,
    /// Dependency types when the node is a direct dependency of the spec, else `None`.
    pub deptypes: Option<serde_json::Value>,
}

/// One spec with its whole dependency DAG.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpecDetail {
    #[serde(flatten)]
    pub summary: SpecSummary,
    /// The spec's node exactly as Spack wrote it.
    pub node: serde_json::Value,
    pub dependencies: Vec<ClosureNode>,
}

fn summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<SpecSummary> {
    Ok(SpecSummary {
        tag: r.get(0)?,
        hash: r.get(1)?,
        layout_version: r.get(2)?,
        name: r.get(3)?,
        version: r.get(4)?,
        platform: r.get(5)?,
        os: r.get(6)?,
        target: r.get(7)?,
        compiler: r.get(8)?,
    })
}

const SUMMARY_COLUMNS: &str =
    "s.tag, s.hash, s.layout_version, n.name, n.version, n.platform, n.os, n.target, n.compiler
     FROM spack_specs s JOIN spack_nodes n ON n.repo_id = s.repo_id AND n.hash = s.hash";

impl Catalog {
    /// Specs of a build cache matching `q`, by name, version and hash. `None`: no such repository.
    pub async fn spack_specs(&self, repo: &RepoName, q: SpecQuery) -> Result<Option<Vec<SpecSummary>>> {
        let repo = repo.to_string();
        self.read(move |c| {
            let Some(repo_id) = repo_id(c, &repo)? else {
                return Ok(None);
            };
            let sql = format!(
                "SELECT {SUMMARY_COLUMNS}
                  WHERE s.repo_id = ?1
                    AND (?2 IS NULL OR n.name = ?2)
                    AND (?3 IS NULL OR n.version = ?3)
                    AND (?4 IS NULL OR substr(s.hash, 1, length(?4)) = ?4)
                    AND (?5 IS NULL OR n.platform = ?5)
                    AND (?6 IS NULL OR n.os = ?6)
                    AND (?7 IS NULL OR n.target = ?7)
                    AND (?8 IS NULL OR n.compiler = ?8 OR substr(n.compiler, 1, length(?8) + 1) = ?8 || '@')
                  ORDER BY n.name, n.version, s.hash
                  LIMIT ?9 OFFSET ?10"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt
                .query_map(
                    params![
                        repo_id,
                        q.name,
                        q.version,
                        q.hash_prefix,
                        q.platform,
                        q.os,
                        q.target,
                        q.compiler,
                        q.limit.min(i64::MAX as u64) as i64,
                        q.offset.min(i64::MAX as u64) as i64
                    ],
                    summary,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some(rows))
        })
        .await
    }

    /// One spec by full hash with its DAG; `Ok(None)` when the cache has no spec with that hash.
    pub async fn spack_spec(&self, repo: &RepoName, hash: String) -> Result<Option<SpecDetail>> {
        let repo = repo.to_string();
        self.read(move |c| {
            let Some(repo_id) = repo_id(c, &repo)? else { return Ok(None) };
            let tx = c.unchecked_transaction()?;
            let sql = format!("SELECT {SUMMARY_COLUMNS} WHERE s.repo_id = ?1 AND s.hash = ?2 ORDER BY s.tag LIMIT 1");
            let Some(summary) = tx.query_row(&sql, params![repo_id, hash], summary).optional()? else {
                return Ok(None);
            };
            let node: String = tx.query_row(
                "SELECT node FROM spack_nodes WHERE repo_id = ?1 AND hash = ?2",
                params![repo_id, hash],
                |r| r.get(0),
            )?;
            let mut stmt = tx.prepare(
                "SELECT n.hash, n.name, n.version, n.external,
                        EXISTS (SELECT 1 FROM spack_specs s WHERE s.repo_id = n.repo_id AND s.hash = n.hash),
                        (SELECT d.deptypes FROM spack_deps d WHERE d.repo_id = n.repo_id AND d.hash = ?3 AND d.dep_hash = n.hash)
                   FROM spack_closure c JOIN spack_nodes n ON n.repo_id = c.repo_id AND n.hash = c.hash
                  WHERE c.repo_id = ?1 AND c.tag = ?2 AND c.hash <> ?3
                  ORDER BY n.name, n.hash",
            )?;
            let dependencies = stmt
                .query_map(params![repo_id, summary.tag, summary.hash], |r| {
                    let deptypes: Option<String> = r.get(5)?;
                    Ok(ClosureNode {
                        hash: r.get(0)?,
                        name: r.get(1)?,
                        version: r.get(2)?,
                        external: r.get(3)?,
                        in_buildcache: r.get(4)?,
                        deptypes: deptypes.and_then(|d| serde_json::from_str(&d).ok()),
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            drop(stmt);
            tx.commit()?;
            let node = serde_json::from_str(&node).unwrap_or(serde_json::Value::Null);
            Ok(Some(SpecDetail { summary, node, dependencies }))
        })
        .await
    }

    /// Which of `hashes` the build cache has no spec image for, in the order given.
    /// `None`: no such repository (then every hash is missing).
    pub async fn spack_missing(&self, repo: &RepoName, hashes: Vec<String>) -> Result<Option<Vec<String>>> {
        let repo = repo.to_string();
        self.read(move |c| {
            let Some(repo_id) = repo_id(c, &repo)? else {
                return Ok(None);
            };
            let mut stmt = c.prepare_cached("SELECT 1 FROM spack_specs WHERE repo_id = ?1 AND hash = ?2 LIMIT 1")?;
            let mut missing = Vec::new();
            for h in hashes {
                if !stmt.exists(params![repo_id, h])? {
                    missing.push(h);
                }
            }
            Ok(Some(missing))
        })
        .await
    }
}
