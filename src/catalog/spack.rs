//! Catalog side of Spack build caches: recording spec tags, reading index snapshots, and the
//! queries of the Spack API and the UI's Spack pages.
//!
//! Query invariants (each stays indexed at hundreds of thousands of specs):
//! - Searches ([`Catalog::spack_specs`], [`Catalog::spack_facets`]) read `spack_specs` alone:
//!   its rows carry the root node's name, version, compiler, platform, os and target (copied in
//!   [`sync_tag`], in the manifest PUT's transaction; migration 0012 back-filled older rows).
//!   The SQL holds only the filters given and names (`INDEXED BY`) the index of the most
//!   selective one (`spack_specs_by_{name,target,os,compiler}`, each in tag order): SQLite has
//!   no statistics here and would otherwise walk the primary key in tag order testing every
//!   row. Pages are keyset pages in tag order (`after` = the last tag shown); facet counts are
//!   one `GROUP BY` over the matching rows, read from `spack_specs_facets` alone when no filter
//!   (or only the compiler) is given.
//! - Reverse dependencies ([`Catalog::spack_dependents`]) are the edges of `spack_deps` read
//!   backwards through `spack_deps_by_dep` (direct dependents, keyset by dependent hash), or
//!   the spec tags whose DAG holds the node, through `spack_closure_by_hash` (transitive
//!   dependents, keyset by tag): both are index range scans, never a walk of the graph.
//!
//! The index ([`Catalog::spack_index_stream`]) is one walk of a repository's `spack_nodes` rows
//! in rowid order (`spack_nodes_by_repo`: the order the rows lie in the table, so the scan reads
//! the table's pages front to back; migration 0016), from one read snapshot, with no join and no
//! subquery:
//! - Each node row holds its entry's only variable-length part, the node's JSON exactly as Spack
//!   wrote it (`node`: the stored fragment, copied into the output without decoding). The entry
//!   is `"<hash>":{"spec":<node>,"ref_count":<n>,"in_buildcache":<bool>}`; entries are
//!   separated by `,` and wrapped in `{"database":{"version":"<v>","installs":{…}}}`.
//! - What depends on other specs is kept beside it as integers, maintained by the triggers of
//!   migration 0015 in the transaction of every change to spec tags (whatever path: push,
//!   delete, retention, GC, cascades), at a cost of the changed DAG's nodes and edges, never of
//!   the repository: `closure_refs` (spec tags whose DAG holds the node: listed iff > 0),
//!   `spec_refs` (`in_buildcache` iff > 0) and `ref_count` (listed nodes with an edge to it).
//!   The repository's spec count and whether any spec has layout < 3 (database version 7) are
//!   kept in `spack_index`. The exact invariant is written in the migration; `stowage fsck`
//!   recounts it ([`Catalog::check_spack_figures`]) and `--repair` restores it.
//! - The output is byte for byte what serialising the same rows, in the same order, with counts
//!   correlated afresh gives (the published blob's digest depends only on the catalog's content,
//!   never on how it was computed). Entries are in the order their nodes were first recorded;
//!   `installs` is a JSON object, whose order Spack ignores.
//!
//! Incremental builds ([`Catalog::spack_index_build`] with [`BuildMode::Incremental`]; the
//! design, with a picture, is in docs/design.md, "The index at 500,000 specs"): the walk is cut
//! into segments of 512 rowids ([`SEGMENT_SHIFT`]). Invariants:
//! - every change to a node row's entry marks its segment (`spack_index_dirty`, triggers of
//!   migration 0018) in the changing transaction, so a segment without a mark since the layout
//!   was recorded has the run the layout names, byte for byte;
//! - a build reads marks, layout and rows in one snapshot, and its layout is recorded with the
//!   marks it read deleted by value (`record_spack_build`), so a concurrent change stays marked;
//! - a run starts with `,` exactly when an entry precedes it: a reused run that must lose its
//!   `,` is named one byte later, and one that would need a `,` it lacks is serialised again;
//! - the composite of the header, the runs and the trailer is therefore the full serialisation
//!   of the snapshot (tests/spack_index.rs checks it byte for byte against a correlated one).

use super::db::{self, Connection, OptionalExtension, params};

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

/// Gathers serialised JSON into pieces of exactly `size` bytes (the last one shorter) and hands
/// each full one to the consumer.
struct PieceSink {
    piece: Vec<u8>,
    size: usize,
    sent: u64,
    to: tokio::sync::mpsc::Sender<bytes::Bytes>,
}

impl PieceSink {
    fn new(size: usize, to: tokio::sync::mpsc::Sender<bytes::Bytes>) -> Self {
        PieceSink {
            piece: Self::fresh(size),
            size,
            sent: 0,
            to,
        }
    }

    /// Room for a piece and the entry that overruns it.
    fn fresh(size: usize) -> Vec<u8> {
        Vec::with_capacity(size + 64 * 1024)
    }

    fn push(&mut self, data: &[u8]) -> Result<()> {
        self.piece.extend_from_slice(data);
        self.send_full()
    }

    /// Bytes gathered so far (sent and not yet sent).
    fn position(&self) -> u64 {
        self.sent + self.piece.len() as u64
    }

    /// Appends one `"hash":{"spec":…,"ref_count":…,"in_buildcache":…}` entry of `installs`,
    /// after a `,` when `comma`.
    fn push_entry(&mut self, comma: bool, hash: &str, node: &[u8], ref_count: i64, in_buildcache: bool) -> Result<()> {
        use std::io::Write as _;
        if comma {
            self.piece.push(b',');
        }
        // DAG hashes are base32 (letters and digits): a JSON string as they are. Anything else
        // is escaped as serde_json would.
        if hash.bytes().all(|b| b.is_ascii_alphanumeric()) {
            self.piece.push(b'"');
            self.piece.extend_from_slice(hash.as_bytes());
            self.piece.push(b'"');
        } else {
            let quoted = serde_json::Value::String(hash.to_owned()).to_string();
            self.piece.extend_from_slice(quoted.as_bytes());
        }
        self.piece.extend_from_slice(b":{\"spec\":");
        self.piece.extend_from_slice(node);
        // Writing into a Vec cannot fail.
        let _ = write!(
            self.piece,
            ",\"ref_count\":{ref_count},\"in_buildcache\":{in_buildcache}}}"
        );
        self.send_full()
    }

    /// Sends every whole piece gathered, keeping the overrun for the next.
    fn send_full(&mut self) -> Result<()> {
        while self.piece.len() >= self.size {
            let mut next = Self::fresh(self.size);
            next.extend_from_slice(&self.piece[self.size..]);
            let mut full = std::mem::replace(&mut self.piece, next);
            full.truncate(self.size);
            self.send(full)?;
        }
        Ok(())
    }

    /// Sends what is left (the last, short piece).
    fn flush(&mut self) -> Result<()> {
        if self.piece.is_empty() {
            return Ok(());
        }
        let last = std::mem::take(&mut self.piece);
        self.send(last)
    }

    fn send(&mut self, piece: Vec<u8>) -> Result<()> {
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
) -> db::Result<()> {
    c.prepare_cached("DELETE FROM spack_specs WHERE repo_id = ?1 AND tag = ?2")?
        .execute(params![repo_id, tag])?;
    let Some(spec) = spec else { return Ok(()) };
    if c.engine() == db::Engine::Postgres {
        return sync_tag_batched(c, repo_id, tag, manifest_id, spec);
    }
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
    // The root's searchable fields go into the tag's row (see the module doc). Every spec image
    // lists its root among its nodes; were one not to, its row would only lack them.
    insert_spec_row(c, repo_id, tag, manifest_id, spec)?;
    let mut closure =
        c.prepare_cached("INSERT INTO spack_closure (repo_id, tag, hash) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING")?;
    for n in &spec.nodes {
        closure.execute(params![repo_id, tag, n.hash])?;
    }
    Ok(())
}

/// Rows per statement of [`sync_tag_batched`]: each statement is a round trip to PostgreSQL
/// (a row per statement made a 30,000-node spec take minutes), and 256 rows of 10 columns stay
/// far below its 65,535 parameters.
const PG_BATCH: usize = 256;

/// Specs of at least this many nodes refresh the planner's statistics of the Spack tables in
/// the transaction that records them (see [`sync_tag_batched`]); typical specs have a few
/// hundred nodes, and autovacuum's own ANALYZE keeps up with those.
const PG_ANALYZE_NODES: usize = 1000;

/// [`sync_tag`] on PostgreSQL: the same rows, written by multi-row statements. The triggers
/// then fire at the end of each statement rather than after each row, which the schema's
/// triggers are written to allow (`docs/postgres.md`).
fn sync_tag_batched(c: &Connection, repo_id: i64, tag: &str, manifest_id: i64, spec: &SpecImage) -> db::Result<()> {
    let mut added = std::collections::HashSet::new();
    let nodes: Vec<[&dyn db::ToParam; 10]> = spec
        .nodes
        .iter()
        .map(|n| -> [&dyn db::ToParam; 10] {
            [
                &repo_id,
                &n.hash,
                &n.name,
                &n.version,
                &n.platform,
                &n.os,
                &n.target,
                &n.compiler,
                &n.external,
                &n.json,
            ]
        })
        .collect();
    insert_batched(
        c,
        "INSERT INTO spack_nodes (repo_id, hash, name, version, platform, os, target, compiler, external, node)",
        "ON CONFLICT DO NOTHING RETURNING hash",
        &nodes,
        |r| {
            added.insert(r.get::<_, String>(0)?);
            Ok(())
        },
    )?;
    let repo: &i64 = &repo_id;
    let deps: Vec<[&dyn db::ToParam; 4]> = spec
        .nodes
        .iter()
        // A hash listed twice counts once, with its first entry's edges, as on SQLite (where
        // the second insert of the node adds nothing, and so no edges).
        .filter(|n| added.remove(&n.hash))
        .flat_map(|n| {
            n.dependencies
                .iter()
                .map(move |(dep, types)| -> [&dyn db::ToParam; 4] { [repo, &n.hash, dep, types] })
        })
        .collect();
    insert_batched(
        c,
        "INSERT INTO spack_deps (repo_id, hash, dep_hash, deptypes)",
        "ON CONFLICT DO NOTHING",
        &deps,
        |_| Ok(()),
    )?;
    if spec.nodes.len() >= PG_ANALYZE_NODES {
        // Statistics of tables this transaction just grew: without them the planner takes
        // them for nearly empty, and the triggers below and the spec's first reads pick
        // nested loops that are quadratic in the spec's size (a 3,000-node spec's dependency
        // read took 3 s). ANALYZE sees this transaction's own rows.
        c.execute_batch("ANALYZE spack_nodes, spack_deps, spack_closure")?;
    }
    insert_spec_row(c, repo_id, tag, manifest_id, spec)?;
    let closure: Vec<[&dyn db::ToParam; 3]> = spec
        .nodes
        .iter()
        .map(|n| -> [&dyn db::ToParam; 3] { [&repo_id, &tag, &n.hash] })
        .collect();
    insert_batched(
        c,
        "INSERT INTO spack_closure (repo_id, tag, hash)",
        "ON CONFLICT DO NOTHING",
        &closure,
        |_| Ok(()),
    )
}

/// Runs `head VALUES (…), (…) tail` for `rows`, [`PG_BATCH`] at a time, passing each row the
/// statement returns to `on_row`.
fn insert_batched<const W: usize>(
    c: &Connection,
    head: &str,
    tail: &str,
    rows: &[[&dyn db::ToParam; W]],
    mut on_row: impl FnMut(&db::Row<'_>) -> db::Result<()>,
) -> db::Result<()> {
    for chunk in rows.chunks(PG_BATCH) {
        let mut sql = String::with_capacity(head.len() + tail.len() + chunk.len() * W * 6);
        sql.push_str(head);
        sql.push_str(" VALUES ");
        for i in 0..chunk.len() {
            sql.push_str(if i == 0 { "(" } else { ", (" });
            for j in 0..W {
                if j > 0 {
                    sql.push_str(", ");
                }
                sql.push('?');
                sql.push_str(&(i * W + j + 1).to_string());
            }
            sql.push(')');
        }
        sql.push(' ');
        sql.push_str(tail);
        let params: Vec<&dyn db::ToParam> = chunk.iter().flat_map(|row| row.iter().copied()).collect();
        let mut stmt = c.prepare_cached(&sql)?;
        let mut returned = stmt.query(&params)?;
        while let Some(row) = returned.next()? {
            on_row(&row)?;
        }
    }
    Ok(())
}

/// The tag's row in `spack_specs`, with its root's searchable fields.
fn insert_spec_row(c: &Connection, repo_id: i64, tag: &str, manifest_id: i64, spec: &SpecImage) -> db::Result<()> {
    let root = spec.nodes.iter().find(|n| n.hash == spec.hash);
    c.prepare_cached(
        "INSERT INTO spack_specs (repo_id, tag, hash, manifest_id, layout_version,
                                  name, version, platform, os, target, compiler)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        repo_id,
        tag,
        spec.hash,
        manifest_id,
        spec.layout_version,
        root.map(|n| &n.name),
        root.map(|n| &n.version),
        root.and_then(|n| n.platform.as_ref()),
        root.and_then(|n| n.os.as_ref()),
        root.and_then(|n| n.target.as_ref()),
        root.and_then(|n| n.compiler.as_ref()),
    ])?;
    Ok(())
}

/// Records a freshly built index manifest as current, unless a newer build got there first.
/// A build of the same generation replaces the current one: a hosted index is rebuilt at the
/// same generation only when its manifest was deleted, and a proxied repository's merged index
/// also when the upstream index changed (`registry::proxy::spack`). Builds of one repository
/// run one at a time.
pub(super) fn publish_index(c: &Connection, repo_id: i64, generation: i64, digest: &str) -> db::Result<()> {
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
          WHERE repo_id = ?1 AND (built_generation IS NULL OR built_generation <= ?2)",
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
            // Each digest once (a config that is also a layer is one blob): PostgreSQL refuses
            // an upsert that reaches one row twice.
            "INSERT INTO gc_superseded (repo_id, digest, superseded_at)
             SELECT ?1, d.digest, ?3 FROM (
                 SELECT DISTINCT r.digest FROM manifests m JOIN manifest_refs r ON r.manifest_id = m.id
                  WHERE m.repo_id = ?1 AND m.digest = ?2 AND r.kind IN ('config', 'layer')
                    AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.manifest_id = m.id)
             ) AS d
             WHERE true
             ON CONFLICT (repo_id, digest) DO UPDATE SET superseded_at = excluded.superseded_at",
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
                .query_row([&repo], |r| {
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

    /// Serialises the repository's whole index from one consistent snapshot of the catalog,
    /// sending it to `to` in pieces of `piece` bytes as it goes, so that the index is never held
    /// whole in memory (it is about 1 KB per spec node: 490 MB at 500,000 specs). `None`, with
    /// nothing sent, when the repository has no Spack index.
    pub async fn spack_index_stream(
        &self,
        repo: &RepoName,
        piece: usize,
        to: tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) -> Result<Option<IndexSnapshot>> {
        Ok(self
            .spack_index_build(repo, piece, to, BuildMode::Full)
            .await?
            .map(|b| b.snapshot))
    }

    /// Builds the repository's index from one consistent snapshot: sends what it serialises
    /// (the header, the runs it writes, the trailer) to `to` in pieces of `piece` bytes, and
    /// returns where each run of the index lies (see [`IndexBuild`]). With
    /// [`BuildMode::Incremental`], only the segments marked since the last recorded layout
    /// are serialised; the others are named where the layout says they lie. `None`, with
    /// nothing sent, when the repository has no Spack index.
    pub async fn spack_index_build(
        &self,
        repo: &RepoName,
        piece: usize,
        to: tokio::sync::mpsc::Sender<bytes::Bytes>,
        mode: BuildMode,
    ) -> Result<Option<IndexBuild>> {
        let repo = repo.to_string();
        // Once: what it serialises goes to `to` as it goes.
        self.read_once(move |c| {
            let tx = c.unchecked_transaction()?;
            let mut out = PieceSink::new(piece.max(1), to);
            let built = build_index(&tx, &repo, &mut out, mode)?;
            tx.commit()?;
            Ok(built)
        })
        .await
    }

    /// Records the layout of a build and consumes the marks it read, in one transaction with
    /// the composite blob the index is made of (`composite`: digest, size and pieces, linked
    /// into the repository), when it is one. Returns `false`, recording nothing, when a blob
    /// the composite or the layout names is no longer recorded (the collector took it since the
    /// build read the layout): the caller then builds in full.
    pub async fn record_spack_build(
        &self,
        repo: &RepoName,
        composite: Option<(crate::oci::Digest, u64, Vec<crate::storage::composite::Piece>)>,
        layout: Vec<IndexRun>,
        marks: Vec<(i64, i64)>,
    ) -> Result<bool> {
        let repo = repo.to_string();
        self.write(move |c| {
            let Some(repo_id) = repo_id(c, &repo)? else {
                return Ok(false);
            };
            let mut plain = c.prepare_cached("SELECT 1 FROM blobs WHERE digest = ?1 AND composite = 0")?;
            let mut named: Vec<String> = layout
                .iter()
                .filter_map(|r| match &r.source {
                    RunSource::Stored(blob) => Some(blob.clone()),
                    RunSource::Written => None,
                })
                .collect();
            if let Some((_, _, pieces)) = &composite {
                named.extend(pieces.iter().map(|p| p.blob.to_string()));
            }
            named.sort_unstable();
            named.dedup();
            for blob in &named {
                if !plain.exists([blob])? {
                    return Ok(false);
                }
            }
            if let Some((digest, size, pieces)) = &composite {
                let added = c.execute(
                    "INSERT INTO blobs (digest, size, created_at, composite) VALUES (?1, ?2, ?3, 1)
                     ON CONFLICT (digest) DO NOTHING",
                    params![digest.to_string(), *size as i64, super::now()],
                )?;
                // Already recorded: the same bytes, stored or composed before; they stay as they are.
                if added > 0 {
                    let mut piece = c.prepare_cached(
                        "INSERT INTO blob_pieces (digest, ordinal, piece, start, len) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?;
                    for (ordinal, p) in pieces.iter().enumerate() {
                        piece.execute(params![
                            digest.to_string(),
                            ordinal as i64,
                            p.blob.to_string(),
                            p.start as i64,
                            p.len as i64
                        ])?;
                    }
                }
                super::queries::link(c, repo_id, &digest.to_string(), *size)?;
            }
            c.execute("DELETE FROM spack_index_layout WHERE repo_id = ?1", [repo_id])?;
            let mut run = c.prepare_cached(
                "INSERT INTO spack_index_layout (repo_id, seg, blob, start, len, comma) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for r in &layout {
                let RunSource::Stored(blob) = &r.source else {
                    return Err(Internal::Other("an index layout run without its blob").into());
                };
                run.execute(params![repo_id, r.seg, blob, r.start as i64, r.len as i64, r.comma])?;
            }
            let mut consume =
                c.prepare_cached("DELETE FROM spack_index_dirty WHERE repo_id = ?1 AND seg = ?2 AND mark = ?3")?;
            for (seg, mark) in marks {
                consume.execute(params![repo_id, seg, mark])?;
            }
            Ok(true)
        })
        .await
    }
}

/// A segment is the node rows `[seg << SEGMENT_SHIFT, (seg + 1) << SEGMENT_SHIFT)`: 512 rowids,
/// about 512 KB of index. Migration 0018's triggers compute `id >> 9`: keep them equal.
pub const SEGMENT_SHIFT: u32 = 9;

/// A layout spread over more blobs than this is not reused: the build is a full one, and the
/// index a plain blob again (a composite's pieces stay few, and the blobs they keep alive).
const MAX_LAYOUT_BLOBS: usize = 16;

/// Nor is a layout whose blobs hold more than twice the bytes it names, plus this much: the
/// old bytes a composite keeps alive stay within about the index's own size.
const LAYOUT_SLACK: u64 = 64 * 1024 * 1024;

/// How a build may reuse the runs of the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildMode {
    /// Serialise every listed node.
    Full,
    /// Serialise only the segments marked since the last recorded layout (and a segment that
    /// must now start with a `,` it lacks); name the layout's runs for the others. Falls back
    /// to [`BuildMode::Full`] when there is no layout, when it names a blob no longer recorded
    /// (or a composite), or when it is spread too thin ([`MAX_LAYOUT_BLOBS`], [`LAYOUT_SLACK`]).
    Incremental,
}

/// Where a run of a built index lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunSource {
    /// In the bytes this build sent, at `start`.
    Written,
    /// In the stored blob with this digest, at `start`.
    Stored(String),
}

/// One segment's run of a built index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRun {
    pub seg: i64,
    pub source: RunSource,
    pub start: u64,
    pub len: u64,
    /// Whether the run starts with the `,` separating it from the entries before it.
    pub comma: bool,
}

/// What a build sent, and where the index's bytes lie: the `header` bytes at the start of what
/// was sent, then `runs` in order, then the 3 bytes sent last (`}}}`).
#[derive(Debug, Clone)]
pub struct IndexBuild {
    pub snapshot: IndexSnapshot,
    pub header: u64,
    pub runs: Vec<IndexRun>,
    /// The dirty marks read, (segment, mark): consumed when the layout is recorded.
    pub marks: Vec<(i64, i64)>,
    /// Whether the build reused a layout (`false`: everything was serialised).
    pub incremental: bool,
}

/// The index's last bytes, closing `installs`, `database` and the document.
pub const INDEX_TRAILER: &[u8] = b"}}}";

/// Builds the index inside the read transaction `tx` (see [`Catalog::spack_index_build`]).
fn build_index(tx: &Connection, repo: &str, out: &mut PieceSink, mode: BuildMode) -> Result<Option<IndexBuild>> {
    let Some((repo_id, generation, specs, old_layout_specs)) = tx
        .query_row(
            "SELECT s.repo_id, s.generation, s.specs, s.old_layout_specs
               FROM spack_index s JOIN repositories r ON r.id = s.repo_id WHERE r.name = ?1",
            [repo],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            },
        )
        .optional()?
    else {
        return Ok(None);
    };
    // Spack 0.2x (layout 2) reads database version 7 only; 1.x reads 7 and 8. Serve the
    // newest version every client that pushed here can read.
    let version = if old_layout_specs > 0 { "7" } else { "8" };
    out.push(b"{\"database\":{\"version\":\"")?;
    out.push(version.as_bytes())?;
    out.push(b"\",\"installs\":{")?;
    let header = out.position();
    let marks = tx
        .prepare_cached("SELECT seg, mark FROM spack_index_dirty WHERE repo_id = ?1 ORDER BY seg")?
        .query_map([repo_id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?
        .collect::<db::Result<Vec<_>>>()?;
    let layout = match mode {
        BuildMode::Incremental => reusable_layout(tx, repo_id)?,
        BuildMode::Full => None,
    };
    let mut runs = Vec::new();
    let mut nodes = 0usize;
    // Whether an entry precedes the next one (which then starts with `,`).
    let mut listed_before = false;
    let mut rows_stmt = tx.prepare_cached(
        "SELECT id, hash, node, ref_count, spec_refs > 0 FROM spack_nodes INDEXED BY spack_nodes_by_repo
          WHERE repo_id = ?1 AND id >= ?2 AND id < ?3 AND closure_refs > 0 ORDER BY id",
    )?;
    // Serialises the listed nodes with ids in `ids`, closing a run at each segment boundary.
    let mut write_rows = |ids: std::ops::Range<i64>,
                          out: &mut PieceSink,
                          listed_before: &mut bool,
                          runs: &mut Vec<IndexRun>|
     -> Result<usize> {
        let mut rows = rows_stmt.query(params![repo_id, ids.start, ids.end])?;
        let mut open: Option<IndexRun> = None;
        let mut n = 0usize;
        while let Some(row) = rows.next()? {
            let seg = row.get::<_, i64>(0)? >> SEGMENT_SHIFT;
            if open.as_ref().is_some_and(|r| r.seg != seg) {
                runs.extend(open.take().map(|r| close(r, out)));
            }
            if open.is_none() {
                open = Some(IndexRun {
                    seg,
                    source: RunSource::Written,
                    start: out.position(),
                    len: 0,
                    comma: *listed_before,
                });
            }
            let hash = row.get_str(1)?;
            let node = row.get_bytes(2)?;
            out.push_entry(*listed_before, hash, node, row.get(3)?, row.get(4)?)?;
            *listed_before = true;
            n += 1;
        }
        runs.extend(open.take().map(|r| close(r, out)));
        Ok(n)
    };
    let incremental = layout.is_some();
    match layout {
        // One walk of the repository's rows in table order; the figures are kept (see the
        // module doc) and the node is its stored JSON, copied without decoding.
        None => nodes += write_rows(i64::MIN..i64::MAX, out, &mut listed_before, &mut runs)?,
        Some(layout) => {
            let dirty: std::collections::BTreeSet<i64> = marks.iter().map(|(seg, _)| *seg).collect();
            let mut segs: std::collections::BTreeSet<i64> = dirty.clone();
            segs.extend(layout.keys().copied());
            for seg in segs {
                let reused = layout
                    .get(&seg)
                    .filter(|r| !dirty.contains(&seg) && (r.comma || !listed_before));
                match reused {
                    Some(r) => {
                        let mut r = r.clone();
                        // The first entry of the index has no `,` before it.
                        if r.comma && !listed_before {
                            r.start += 1;
                            r.len -= 1;
                            r.comma = false;
                        }
                        runs.push(r);
                        listed_before = true;
                    }
                    None => {
                        let ids = (seg << SEGMENT_SHIFT)..((seg + 1) << SEGMENT_SHIFT);
                        nodes += write_rows(ids, out, &mut listed_before, &mut runs)?;
                    }
                }
            }
        }
    }
    out.push(INDEX_TRAILER)?;
    out.flush()?;
    Ok(Some(IndexBuild {
        snapshot: IndexSnapshot {
            generation,
            specs: specs as usize,
            nodes,
            bytes: out.sent,
        },
        header,
        runs,
        marks,
        incremental,
    }))
}

/// Ends a written run at the sink's position.
fn close(mut run: IndexRun, out: &PieceSink) -> IndexRun {
    run.len = out.position() - run.start;
    run
}

/// The repository's recorded layout, by segment, if a build may reuse it (see
/// [`BuildMode::Incremental`]).
fn reusable_layout(tx: &Connection, repo_id: i64) -> Result<Option<std::collections::BTreeMap<i64, IndexRun>>> {
    let layout = tx
        .prepare_cached("SELECT seg, blob, start, len, comma FROM spack_index_layout WHERE repo_id = ?1")?
        .query_map([repo_id], |r| {
            Ok(IndexRun {
                seg: r.get(0)?,
                source: RunSource::Stored(r.get(1)?),
                start: r.get::<_, i64>(2)? as u64,
                len: r.get::<_, i64>(3)? as u64,
                comma: r.get(4)?,
            })
        })?
        .collect::<db::Result<Vec<_>>>()?;
    if layout.is_empty() {
        return Ok(None);
    }
    let mut blobs: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for r in &layout {
        if let RunSource::Stored(blob) = &r.source {
            blobs.entry(blob.as_str()).or_default();
        }
    }
    if blobs.len() > MAX_LAYOUT_BLOBS {
        return Ok(None);
    }
    let mut size = tx.prepare_cached("SELECT size FROM blobs WHERE digest = ?1 AND composite = 0")?;
    for (blob, bytes) in blobs.iter_mut() {
        match size.query_row([*blob], |r| r.get::<_, i64>(0)).optional()? {
            Some(n) => *bytes = n.max(0) as u64,
            None => return Ok(None),
        }
    }
    let named: u64 = layout.iter().map(|r| r.len).sum();
    let held: u64 = blobs.values().sum();
    if held > named.saturating_mul(2).saturating_add(LAYOUT_SLACK) {
        return Ok(None);
    }
    Ok(Some(layout.into_iter().map(|r| (r.seg, r)).collect()))
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
    /// Keyset cursor: only specs whose tag sorts after this one.
    pub after: Option<String>,
    pub limit: u64,
    /// Specs skipped (the Spack API's older paging; the UI pages with `after` only).
    pub offset: u64,
}

impl SpecQuery {
    /// The `WHERE` clause of the filters given (and only those, so that SQLite can use the
    /// index of one), with its parameters after `?1` (the repository id).
    fn filters(&self) -> (String, Vec<String>) {
        let mut sql = String::from("s.repo_id = ?1");
        let mut args: Vec<String> = Vec::new();
        let mut arg = |sql: &mut String, clause: &str, v: String| {
            args.push(v);
            sql.push_str(&clause.replace('?', &format!("?{}", args.len() + 1)));
        };
        for (column, value) in [
            ("name", &self.name),
            ("version", &self.version),
            ("platform", &self.platform),
            ("os", &self.os),
            ("target", &self.target),
        ] {
            if let Some(v) = value {
                arg(&mut sql, &format!(" AND s.{column} = ?"), v.clone());
            }
        }
        if let Some(p) = &self.hash_prefix {
            // Hashes are lower-case letters and digits: every one starting with `p` sorts
            // between `p` and `p{`.
            arg(&mut sql, " AND s.hash >= ?", p.clone());
            arg(&mut sql, " AND s.hash < ?", format!("{p}{{"));
        }
        match &self.compiler {
            // `gcc@12.2.0` matches itself.
            Some(c) if c.contains('@') => arg(&mut sql, " AND s.compiler = ?", c.clone()),
            // `gcc` matches `gcc` and every `gcc@…` (those sort between `gcc@` and `gccA`).
            Some(c) => {
                arg(&mut sql, " AND (s.compiler = ?", c.clone());
                arg(&mut sql, " OR (s.compiler > ?", format!("{c}@"));
                arg(&mut sql, " AND s.compiler < ?))", format!("{c}A"));
            }
            None => {}
        }
        if let Some(a) = &self.after {
            arg(&mut sql, " AND s.tag > ?", a.clone());
        }
        (sql, args)
    }

    /// The index of the most selective filter given that reads rows in tag order (SQLite,
    /// without statistics, would rather walk the primary key in tag order and test every row,
    /// a scan of the whole cache when few rows match).
    fn index(&self) -> Option<&'static str> {
        if self.name.is_some() {
            Some("spack_specs_by_name")
        } else if self.target.is_some() {
            Some("spack_specs_by_target")
        } else if self.os.is_some() {
            Some("spack_specs_by_os")
        } else if self.compiler.as_deref().is_some_and(|c| c.contains('@')) {
            Some("spack_specs_by_compiler")
        } else {
            None
        }
    }
}

/// Counts of the specs matching a search, per compiler, target and os (most first).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SpecFacets {
    pub total: u64,
    pub compilers: Vec<(String, u64)>,
    pub targets: Vec<(String, u64)>,
    pub oses: Vec<(String, u64)>,
}

/// A cached spec depending on another one.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Dependent {
    pub hash: String,
    pub name: String,
    pub version: String,
    pub tag: String,
    /// The dependency types when it depends on the spec directly, else `None`.
    pub deptypes: Option<serde_json::Value>,
}

/// One page of a spec's dependents.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Dependents {
    pub dependents: Vec<Dependent>,
    /// The cursor of the next page (`after`), if there is one.
    pub next: Option<String>,
}

/// A dependency edge of a spec's DAG.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Edge {
    /// The dependent.
    pub from: String,
    /// Its dependency.
    pub to: String,
    /// `build`, `link`, `run`, `test`.
    pub deptypes: Vec<String>,
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
    /// Every dependency edge between the nodes of the DAG (the spec's own included).
    pub edges: Vec<Edge>,
}

fn summary(r: &db::Row<'_>) -> db::Result<SpecSummary> {
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

const SUMMARY_COLUMNS: &str = "s.tag, s.hash, s.layout_version, COALESCE(s.name, ''), COALESCE(s.version, ''),
     s.platform, s.os, s.target, s.compiler FROM spack_specs s";

impl Catalog {
    /// Specs of a build cache matching `q`, in tag order. `None`: no such repository.
    pub async fn spack_specs(&self, repo: &RepoName, q: SpecQuery) -> Result<Option<Vec<SpecSummary>>> {
        let repo = repo.to_string();
        self.read(move |c| {
            let Some(repo_id) = repo_id(c, &repo)? else {
                return Ok(None);
            };
            let (filters, args) = q.filters();
            let indexed = q.index().map(|i| format!(" INDEXED BY {i}")).unwrap_or_default();
            // Paging is bound, not formatted in: the statement stays one cached statement
            // whatever page is asked for (see the catalog's rule on re-preparing).
            let (limit, offset) = (
                q.limit.min(i64::MAX as u64) as i64,
                q.offset.min(i64::MAX as u64) as i64,
            );
            let sql = format!(
                "SELECT {SUMMARY_COLUMNS}{indexed} WHERE {filters} ORDER BY s.tag LIMIT ?{} OFFSET ?{}",
                args.len() + 2,
                args.len() + 3
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let params: Vec<&dyn db::ToParam> = std::iter::once(&repo_id as &dyn db::ToParam)
                .chain(args.iter().map(|a| a as &dyn db::ToParam))
                .chain([&limit as &dyn db::ToParam, &offset as &dyn db::ToParam])
                .collect();
            let rows = stmt
                .query_map(params.as_slice(), summary)?
                .collect::<db::Result<Vec<_>>>()?;
            Ok(Some(rows))
        })
        .await
    }

    /// How many specs match `q` (its cursor and paging ignored), per compiler, target and os.
    /// `None`: no such repository.
    pub async fn spack_facets(&self, repo: &RepoName, mut q: SpecQuery) -> Result<Option<SpecFacets>> {
        let repo = repo.to_string();
        q.after = None;
        self.read(move |c| {
            let Some(repo_id) = repo_id(c, &repo)? else {
                return Ok(None);
            };
            let (filters, args) = q.filters();
            // Without statistics SQLite would read the facets index for its GROUP BY order even
            // when another filter's index finds far fewer rows: name the index to use.
            let index = match q.index() {
                Some("spack_specs_by_compiler") | None => "spack_specs_facets",
                Some(other) => other,
            };
            let sql = format!(
                "SELECT s.compiler, s.target, s.os, COUNT(*) FROM spack_specs s INDEXED BY {index}
                  WHERE {filters} GROUP BY s.compiler, s.target, s.os"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let params: Vec<&dyn db::ToParam> = std::iter::once(&repo_id as &dyn db::ToParam)
                .chain(args.iter().map(|a| a as &dyn db::ToParam))
                .collect();
            let mut rows = stmt.query(params.as_slice())?;
            let mut counts: [std::collections::BTreeMap<String, u64>; 3] = Default::default();
            let mut total = 0u64;
            while let Some(row) = rows.next()? {
                let n = row.get::<_, i64>(3)?.max(0) as u64;
                total += n;
                for (i, map) in counts.iter_mut().enumerate() {
                    let value: Option<String> = row.get(i)?;
                    *map.entry(value.unwrap_or_default()).or_default() += n;
                }
            }
            let [compilers, targets, oses] = counts.map(|m| {
                let mut v: Vec<(String, u64)> = m.into_iter().filter(|(k, _)| !k.is_empty()).collect();
                v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                v
            });
            Ok(Some(SpecFacets {
                total,
                compilers,
                targets,
                oses,
            }))
        })
        .await
    }

    /// How many specs a build cache holds, and the size of its current index blob (when built).
    pub async fn spack_cache_size(&self, repo: &RepoName) -> Result<(u64, Option<u64>)> {
        let repo = repo.to_string();
        self.read(move |c| {
            let Some(repo_id) = repo_id(c, &repo)? else {
                return Ok((0, None));
            };
            let specs: i64 = c
                .prepare_cached("SELECT COUNT(*) FROM spack_specs WHERE repo_id = ?1")?
                .query_row([repo_id], |r| r.get(0))?;
            let index_bytes: Option<i64> = c
                .prepare_cached(
                    "SELECT SUM(b.size) FROM spack_index i
                       JOIN manifests m ON m.repo_id = i.repo_id AND m.digest = i.manifest_digest
                       JOIN manifest_refs r ON r.manifest_id = m.id AND r.kind = 'layer'
                       JOIN blobs b ON b.digest = r.digest
                      WHERE i.repo_id = ?1",
                )?
                .query_row([repo_id], |r| r.get(0))
                .optional()?
                .flatten();
            Ok((specs.max(0) as u64, index_bytes.map(|b| b.max(0) as u64)))
        })
        .await
    }

    /// The cached specs depending on the node `hash`: directly (an edge of theirs names it;
    /// pages keyed by their hash), or with `transitive` anywhere in their DAG (pages keyed by
    /// tag). `after` is the previous page's `next`. `Ok(None)`: the repository has no such node.
    pub async fn spack_dependents(
        &self,
        repo: &RepoName,
        hash: String,
        transitive: bool,
        after: Option<String>,
        limit: u64,
    ) -> Result<Option<Dependents>> {
        let repo = repo.to_string();
        let limit = limit.clamp(1, 10_000);
        self.read(move |c| {
            let Some(repo_id) = repo_id(c, &repo)? else { return Ok(None) };
            let known = c
                .prepare_cached("SELECT 1 FROM spack_nodes WHERE repo_id = ?1 AND hash = ?2")?
                .exists(params![repo_id, hash])?;
            if !known {
                return Ok(None);
            }
            let sql = if transitive {
                "SELECT s.tag, s.hash, COALESCE(s.name, ''), COALESCE(s.version, ''),
                        (SELECT d.deptypes FROM spack_deps d WHERE d.repo_id = s.repo_id AND d.hash = s.hash AND d.dep_hash = ?2)
                   FROM spack_closure c JOIN spack_specs s ON s.repo_id = c.repo_id AND s.tag = c.tag
                  WHERE c.repo_id = ?1 AND c.hash = ?2 AND c.tag > ?3 AND s.hash <> ?2
                  ORDER BY c.tag LIMIT ?4"
            } else {
                "SELECT (SELECT MIN(s.tag) FROM spack_specs s WHERE s.repo_id = d.repo_id AND s.hash = d.hash) AS tag,
                        d.hash, n.name, n.version, d.deptypes
                   FROM spack_deps d JOIN spack_nodes n ON n.repo_id = d.repo_id AND n.hash = d.hash
                  WHERE d.repo_id = ?1 AND d.dep_hash = ?2 AND d.hash > ?3
                    AND EXISTS (SELECT 1 FROM spack_specs s WHERE s.repo_id = d.repo_id AND s.hash = d.hash)
                  ORDER BY d.hash LIMIT ?4"
            };
            let mut stmt = c.prepare_cached(sql)?;
            let mut dependents = stmt
                .query_map(
                    params![repo_id, hash, after.clone().unwrap_or_default(), (limit + 1) as i64],
                    |r| {
                        let deptypes: Option<String> = r.get(4)?;
                        Ok(Dependent {
                            tag: r.get(0)?,
                            hash: r.get(1)?,
                            name: r.get(2)?,
                            version: r.get(3)?,
                            deptypes: deptypes.and_then(|d| serde_json::from_str(&d).ok()),
                        })
                    },
                )?
                .collect::<db::Result<Vec<_>>>()?;
            let next = if dependents.len() as u64 > limit {
                dependents.truncate(limit as usize);
                dependents
                    .last()
                    .map(|d| if transitive { d.tag.clone() } else { d.hash.clone() })
            } else {
                None
            };
            Ok(Some(Dependents { dependents, next }))
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
            // CROSS JOIN keeps SQLite reading the tag's closure first (without statistics it
            // would rather walk every node of the repository in name order).
            let mut stmt = tx.prepare(
                "SELECT n.hash, n.name, n.version, n.external,
                        EXISTS (SELECT 1 FROM spack_specs s WHERE s.repo_id = n.repo_id AND s.hash = n.hash),
                        (SELECT d.deptypes FROM spack_deps d WHERE d.repo_id = n.repo_id AND d.hash = ?3 AND d.dep_hash = n.hash)
                   FROM spack_closure c CROSS JOIN spack_nodes n ON n.repo_id = c.repo_id AND n.hash = c.hash
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
                .collect::<db::Result<Vec<_>>>()?;
            drop(stmt);
            let mut stmt = tx.prepare(
                "SELECT d.hash, d.dep_hash, d.deptypes
                   FROM spack_closure c CROSS JOIN spack_deps d ON d.repo_id = c.repo_id AND d.hash = c.hash
                  WHERE c.repo_id = ?1 AND c.tag = ?2
                    AND EXISTS (SELECT 1 FROM spack_closure c2 WHERE c2.repo_id = c.repo_id AND c2.tag = c.tag AND c2.hash = d.dep_hash)
                  ORDER BY d.hash, d.dep_hash",
            )?;
            let edges = stmt
                .query_map(params![repo_id, summary.tag], |r| {
                    let deptypes: String = r.get(2)?;
                    Ok(Edge {
                        from: r.get(0)?,
                        to: r.get(1)?,
                        deptypes: serde_json::from_str(&deptypes).unwrap_or_default(),
                    })
                })?
                .collect::<db::Result<Vec<_>>>()?;
            drop(stmt);
            tx.commit()?;
            let node = serde_json::from_str(&node).unwrap_or(serde_json::Value::Null);
            Ok(Some(SpecDetail {
                summary,
                node,
                dependencies,
                edges,
            }))
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
            for h in &hashes {
                if !stmt.exists(params![repo_id, h])? {
                    missing.push(h.clone());
                }
            }
            Ok(Some(missing))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    /// A catalog at the schema just before the first migration whose SQL contains `marker`.
    fn catalog_before(marker: &str) -> (tempfile::TempDir, Connection) {
        let tmp = tempfile::tempdir().unwrap();
        let c = Connection::open(tmp.path().join("catalog.db")).unwrap();
        let at = super::super::MIGRATIONS
            .iter()
            .position(|m| m.contains(marker))
            .unwrap();
        for sql in &super::super::MIGRATIONS[..at] {
            c.execute_batch(sql).unwrap();
        }
        c.pragma_update(None, "user_version", at as i64).unwrap();
        (tmp, c)
    }

    #[test]
    fn the_search_migration_back_fills_specs_recorded_before_it() {
        let (_tmp, mut c) = catalog_before("spack_specs_by_compiler");
        // A spec row as an older Stowage wrote it (without its manifest and tag rows: only the
        // back-fill is under test).
        c.execute_batch(
            "PRAGMA foreign_keys = OFF;
             INSERT INTO repositories (id, name, created_at) VALUES (1, 'r', 0);
             INSERT INTO spack_nodes VALUES (1, 'h1', 'zlib', '1.3', 'linux', 'debian12', 'zen2', 'gcc@12.2.0', 0, '{}');
             INSERT INTO spack_specs (repo_id, tag, hash, manifest_id, layout_version)
                  VALUES (1, 'zlib-1.3-h1.spack', 'h1', 1, 3);",
        )
        .unwrap();
        super::super::migrate(&mut c).unwrap();
        let row: (String, String, String, String, String, String) = c
            .query_row(
                "SELECT name, version, platform, os, target, compiler FROM spack_specs WHERE tag = 'zlib-1.3-h1.spack'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .unwrap();
        assert_eq!(
            row,
            (
                "zlib".into(),
                "1.3".into(),
                "linux".into(),
                "debian12".into(),
                "zen2".into(),
                "gcc@12.2.0".into()
            )
        );
    }

    #[test]
    fn the_figures_migration_back_fills_what_was_recorded_before_it() {
        let (_tmp, mut c) = catalog_before("spack_figures_closure_added");
        // Two spec tags as an older Stowage recorded them: `app` (layout 2) depends on `lib`,
        // which depends on `ext`; `lib` has its own tag, `ext` none; `old` is in no DAG any more.
        c.execute_batch(
            "PRAGMA foreign_keys = OFF;
             INSERT INTO repositories (id, name, created_at) VALUES (1, 'r', 0);
             INSERT INTO spack_nodes (repo_id, hash, name, version, external, node) VALUES
                 (1, 'app', 'app', '1', 0, '{}'), (1, 'lib', 'lib', '1', 0, '{}'),
                 (1, 'ext', 'ext', '1', 1, '{}'), (1, 'old', 'old', '1', 0, '{}');
             INSERT INTO spack_deps (repo_id, hash, dep_hash, deptypes) VALUES
                 (1, 'app', 'lib', '[]'), (1, 'lib', 'ext', '[]'), (1, 'old', 'lib', '[]');
             INSERT INTO spack_specs (repo_id, tag, hash, manifest_id, layout_version) VALUES
                 (1, 'app.spack', 'app', 1, 2), (1, 'lib.spack', 'lib', 2, 3);
             INSERT INTO spack_closure (repo_id, tag, hash) VALUES
                 (1, 'app.spack', 'app'), (1, 'app.spack', 'lib'), (1, 'app.spack', 'ext'),
                 (1, 'lib.spack', 'lib'), (1, 'lib.spack', 'ext');",
        )
        .unwrap();
        super::super::migrate(&mut c).unwrap();
        let figures = |hash: &str| -> (i64, i64, i64) {
            c.query_row(
                "SELECT closure_refs, spec_refs, ref_count FROM spack_nodes WHERE hash = ?1",
                [hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap()
        };
        assert_eq!(figures("app"), (1, 1, 0));
        // `old` depends on `lib` too, but is listed nowhere: its edge does not count.
        assert_eq!(figures("lib"), (2, 1, 1));
        assert_eq!(figures("ext"), (2, 0, 1));
        assert_eq!(figures("old"), (0, 0, 0));
        let specs: (i64, i64) = c
            .query_row(
                "SELECT specs, old_layout_specs FROM spack_index WHERE repo_id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(specs, (2, 1));
    }

    #[test]
    fn the_rowid_migration_keeps_every_row_edge_figure_and_trigger() {
        let (_tmp, mut c) = catalog_before("spack_nodes_by_repo");
        // Spec rows without their manifests and tags (foreign keys off for the set-up only):
        // the migration checks the tables it rebuilds, not these.
        c.execute_batch(
            "PRAGMA foreign_keys = OFF;
             INSERT INTO repositories (id, name, created_at) VALUES (1, 'r', 0), (2, 's', 0);
             INSERT INTO spack_nodes (repo_id, hash, name, version, external, node) VALUES
                 (1, 'lib', 'lib', '1', 0, '{\"l\":1}'), (1, 'app', 'app', '1', 0, '{\"a\":1}'),
                 (2, 'app', 'app', '1', 0, '{}');
             INSERT INTO spack_deps (repo_id, hash, dep_hash, deptypes) VALUES (1, 'app', 'lib', '[]');
             INSERT INTO spack_specs (repo_id, tag, hash, manifest_id, layout_version) VALUES
                 (1, 'app.spack', 'app', 1, 3);
             INSERT INTO spack_closure (repo_id, tag, hash) VALUES
                 (1, 'app.spack', 'app'), (1, 'app.spack', 'lib');
             PRAGMA foreign_keys = ON;",
        )
        .unwrap();
        super::super::migrate(&mut c).unwrap();
        let fk: bool = c.query_row("PRAGMA foreign_keys", [], |r| r.get(0)).unwrap();
        assert!(fk, "foreign keys are on again after the migration");
        // Rows copied in hash order, with their JSON and figures; the edge survived the drop.
        let rows: Vec<(i64, String, String, i64, i64, i64)> = c
            .prepare("SELECT repo_id, hash, node, closure_refs, spec_refs, ref_count FROM spack_nodes ORDER BY id")
            .unwrap()
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            rows,
            vec![
                (1, "app".into(), r#"{"a":1}"#.into(), 1, 1, 0),
                (1, "lib".into(), r#"{"l":1}"#.into(), 1, 0, 1),
                (2, "app".into(), "{}".into(), 0, 0, 0),
            ]
        );
        let edges: i64 = c
            .query_row("SELECT count(*) FROM spack_deps", [], |r| r.get(0))
            .unwrap();
        assert_eq!(edges, 1);
        // The triggers are back: removing the spec tag unlists both nodes and their edge.
        c.execute("DELETE FROM spack_specs WHERE tag = 'app.spack'", [])
            .unwrap();
        c.execute("DELETE FROM spack_closure WHERE tag = 'app.spack'", [])
            .unwrap();
        let figures: Vec<(i64, i64, i64)> = c
            .prepare("SELECT closure_refs, spec_refs, ref_count FROM spack_nodes WHERE repo_id = 1 ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(figures, vec![(0, 0, 0), (0, 0, 0)]);
        // Deleting a repository still cascades from its nodes to their edges.
        c.execute("DELETE FROM repositories WHERE id = 1", []).unwrap();
        let left: (i64, i64) = c
            .query_row(
                "SELECT (SELECT count(*) FROM spack_nodes), (SELECT count(*) FROM spack_deps)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(left, (1, 0));
        // A repository's listed nodes are read in table order through the new index.
        let plan: Vec<String> = c
            .prepare(
                "EXPLAIN QUERY PLAN SELECT hash, node, ref_count, spec_refs > 0 FROM spack_nodes
                  INDEXED BY spack_nodes_by_repo WHERE repo_id = ?1 AND closure_refs > 0 ORDER BY id",
            )
            .unwrap()
            .query_map([2], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(plan.iter().any(|p| p.contains("spack_nodes_by_repo")), "{plan:?}");
        assert!(!plan.iter().any(|p| p.contains("TEMP B-TREE")), "no sort: {plan:?}");
    }

    #[test]
    fn index_pieces_are_exactly_the_piece_size_and_concatenate_to_the_index() {
        let (to, mut from) = tokio::sync::mpsc::channel(1024);
        let mut sink = super::PieceSink::new(7, to);
        let mut expected = Vec::new();
        sink.push(b"{\"installs\":{").unwrap();
        expected.extend_from_slice(b"{\"installs\":{");
        for (i, node) in [
            &b"{}"[..],
            b"{\"name\":\"zlib\",\"long\":\"xxxxxxxxxxxxxxxxxxxxxxxx\"}",
            b"[1]",
        ]
        .iter()
        .enumerate()
        {
            let hash = format!("h{i}");
            sink.push_entry(i > 0, &hash, node, i as i64, i % 2 == 0).unwrap();
            expected.extend_from_slice(
                format!(
                    "{}\"{hash}\":{{\"spec\":{},\"ref_count\":{i},\"in_buildcache\":{}}}",
                    if i > 0 { "," } else { "" },
                    String::from_utf8_lossy(node),
                    i % 2 == 0
                )
                .as_bytes(),
            );
        }
        sink.push(b"}}").unwrap();
        expected.extend_from_slice(b"}}");
        sink.flush().unwrap();
        assert_eq!(sink.sent, expected.len() as u64);
        drop(sink);
        let mut pieces = Vec::new();
        while let Ok(piece) = from.try_recv() {
            pieces.push(piece);
        }
        let (last, whole) = pieces.split_last().unwrap();
        assert!(whole.iter().all(|p| p.len() == 7), "every piece but the last is whole");
        assert!(!last.is_empty() && last.len() <= 7);
        assert_eq!(pieces.concat(), expected);
    }
}
