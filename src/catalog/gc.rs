//! The catalog's side of garbage collection (see `registry::gc` for the rules).
//!
//! Every step comes in two halves: a *scan* on a reader connection, which walks one bounded
//! slice of a table in key order and returns the candidates in it, and a *delete* in a short
//! write job, which re-checks each candidate's condition inside the write transaction and
//! removes only those that still meet it. The scans therefore never hold up writers (readers
//! see a WAL snapshot), the write jobs stay a few milliseconds long whatever the catalog's
//! size, and a candidate that a push revived between the two halves is left alone.
//! Each manifest removed is recorded in the audit trail (actor `gc`) in its delete job.

use std::collections::{HashMap, HashSet};

use super::db::{self, Connection, OptionalExtension, params};

use super::Catalog;
use super::audit::{self, Action, Actor, Event};
use super::now;
use crate::error::Result;

/// Whether manifest `m` has no reason to stay, apart from its age: no tag names it, no manifest
/// of its repository lists it as a child, the manifest it refers to (its subject, for a
/// referrer) is not stored, and it is not a Spack build cache's current index.
const MANIFEST_UNNEEDED: &str = "
    NOT EXISTS (SELECT 1 FROM tags t WHERE t.manifest_id = m.id)
    AND NOT EXISTS (SELECT 1 FROM manifest_refs r JOIN manifests p ON p.id = r.manifest_id
                     WHERE r.digest = m.digest AND r.kind = 'manifest' AND p.repo_id = m.repo_id)
    AND (m.subject IS NULL
         OR NOT EXISTS (SELECT 1 FROM manifests s WHERE s.repo_id = m.repo_id AND s.digest = m.subject))
    AND NOT EXISTS (SELECT 1 FROM spack_index x WHERE x.repo_id = m.repo_id AND x.manifest_digest = m.digest)";

/// Whether link `rb` is referenced as config or layer by a manifest of its repository.
const LINK_REFERENCED: &str = "
    EXISTS (SELECT 1 FROM manifest_refs r JOIN manifests m ON m.id = r.manifest_id
             WHERE r.digest = rb.digest AND m.repo_id = rb.repo_id AND r.kind IN ('config', 'layer'))";

/// One slice of a scan: the candidates found in it, and where the next slice starts (`None`
/// when the scan reached the end).
#[derive(Debug)]
pub struct Slice<T, K> {
    pub candidates: Vec<T>,
    pub next: Option<K>,
}

/// A manifest the collector removed.
#[derive(Debug, Clone)]
pub struct RemovedManifest {
    pub repo: String,
    pub digest: String,
}

/// Scan position in `manifests_by_touched` order.
pub type ManifestKey = (i64, i64);
/// Scan position in `repo_blobs` order.
pub type LinkKey = (i64, String);

impl Catalog {
    /// Examines up to `limit` manifests touched before `cutoff`, after `after`, and returns the
    /// ids of those nothing needs.
    pub async fn gc_scan_manifests(
        &self,
        cutoff: i64,
        after: Option<ManifestKey>,
        limit: usize,
    ) -> Result<Slice<i64, ManifestKey>> {
        self.read(move |c| {
            let (t, id) = after.unwrap_or((i64::MIN, i64::MIN));
            let sql = format!(
                "SELECT m.touched_at, m.id, CASE WHEN {MANIFEST_UNNEEDED} THEN 1 ELSE 0 END
                   FROM manifests m INDEXED BY manifests_by_touched
                  WHERE m.touched_at < ?1 AND (m.touched_at, m.id) > (?2, ?3)
                  ORDER BY m.touched_at, m.id LIMIT ?4"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let mut rows = stmt.query(params![cutoff, t, id, limit as i64])?;
            let (mut candidates, mut last, mut seen) = (Vec::new(), None, 0usize);
            while let Some(row) = rows.next()? {
                seen += 1;
                let key: ManifestKey = (row.get(0)?, row.get(1)?);
                if row.get::<_, i64>(2)? == 1 {
                    candidates.push(key.1);
                }
                last = Some(key);
            }
            Ok(Slice {
                candidates,
                next: if seen < limit { None } else { last },
            })
        })
        .await
    }

    /// Deletes those of manifests `ids` that are still touched before `cutoff` and still
    /// unneeded, with their references (and so their children's and blobs' claim on them).
    /// Stops once the job has run for `budget` (a manifest's deletion cascades to its
    /// references and touches its blobs' links, so a whole batch can take a while on a cold
    /// cache); returns what it removed and how many of `ids` it examined, in order.
    pub async fn gc_delete_manifests(
        &self,
        ids: Vec<i64>,
        cutoff: i64,
        budget: std::time::Duration,
    ) -> Result<(Vec<RemovedManifest>, usize)> {
        self.write(move |c| {
            let started = std::time::Instant::now();
            let sql = format!(
                "DELETE FROM manifests AS m WHERE m.id = ?1 AND m.touched_at < ?2 AND {MANIFEST_UNNEEDED}
                 RETURNING repo_id, digest"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let mut removed = Vec::new();
            let mut examined = 0;
            for id in ids {
                if examined > 0 && started.elapsed() >= budget {
                    break;
                }
                examined += 1;
                if let Some(row) = stmt
                    .query_row(params![id, cutoff], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                    })
                    .optional()?
                {
                    removed.push(row);
                }
            }
            let names = repo_names(c, removed.iter().map(|(id, _)| *id))?;
            let removed: Vec<RemovedManifest> = removed
                .into_iter()
                .map(|(id, digest)| RemovedManifest {
                    repo: names.get(&id).cloned().unwrap_or_default(),
                    digest,
                })
                .collect();
            let (actor, at) = (Actor::system("gc"), now());
            for m in &removed {
                let event = Event::new(Action::GcManifest)
                    .repo(m.repo.as_str())
                    .digest(m.digest.as_str());
                audit::record(c, &actor, &event, at)?;
            }
            Ok((removed, examined))
        })
        .await
    }

    /// Examines up to `limit` blob links after `after` and returns those linked (or last
    /// touched) before `cutoff` that no manifest of their repository references.
    pub async fn gc_scan_links(
        &self,
        cutoff: i64,
        after: Option<LinkKey>,
        limit: usize,
    ) -> Result<Slice<LinkKey, LinkKey>> {
        self.read(move |c| {
            let (repo, digest) = after.clone().unwrap_or((i64::MIN, String::new()));
            let sql = format!(
                "SELECT rb.repo_id, rb.digest, CASE WHEN rb.linked_at < ?1 AND NOT {LINK_REFERENCED} THEN 1 ELSE 0 END
                   FROM repo_blobs rb WHERE (rb.repo_id, rb.digest) > (?2, ?3)
                  ORDER BY rb.repo_id, rb.digest LIMIT ?4"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let mut rows = stmt.query(params![cutoff, repo, digest, limit as i64])?;
            let (mut candidates, mut last, mut seen) = (Vec::new(), None, 0usize);
            while let Some(row) = rows.next()? {
                seen += 1;
                let key: LinkKey = (row.get(0)?, row.get(1)?);
                if row.get::<_, i64>(2)? == 1 {
                    candidates.push(key.clone());
                }
                last = Some(key);
            }
            Ok(Slice {
                candidates,
                next: if seen < limit { None } else { last },
            })
        })
        .await
    }

    /// Removes those of `links` still unreferenced; with `cutoff`, only those also still linked
    /// before it. Returns how many went.
    pub async fn gc_unlink(&self, links: Vec<LinkKey>, cutoff: Option<i64>) -> Result<u64> {
        self.write(move |c| {
            let sql = format!(
                "DELETE FROM repo_blobs AS rb WHERE rb.repo_id = ?1 AND rb.digest = ?2
                    AND rb.linked_at < ?3 AND NOT {LINK_REFERENCED}"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let cutoff = cutoff.unwrap_or(i64::MAX);
            let mut n = 0;
            for (repo, digest) in links {
                n += stmt.execute(params![repo, digest, cutoff])? as u64;
            }
            Ok(n)
        })
        .await
    }

    /// Examines up to `limit` blobs after `after` (in digest order) and returns those (with
    /// the bytes their objects hold: none for a composite) that no repository links, no
    /// composite blob names as a piece and no Spack index layout names (migration 0018).
    pub async fn gc_scan_blobs(&self, after: Option<String>, limit: usize) -> Result<Slice<(String, u64), String>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT b.digest, CASE WHEN b.composite = 1 THEN 0 ELSE b.size END,
                        NOT EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = b.digest)
                        AND NOT EXISTS (SELECT 1 FROM blob_pieces p WHERE p.piece = b.digest)
                        AND NOT EXISTS (SELECT 1 FROM spack_index_layout l WHERE l.blob = b.digest)
                   FROM blobs b WHERE b.digest > ?1 ORDER BY b.digest LIMIT ?2",
            )?;
            let mut rows = stmt.query(params![after.clone().unwrap_or_default(), limit as i64])?;
            let (mut candidates, mut last, mut seen) = (Vec::new(), None, 0usize);
            while let Some(row) = rows.next()? {
                seen += 1;
                let digest: String = row.get(0)?;
                if row.get::<_, bool>(2)? {
                    candidates.push((digest.clone(), row.get::<_, i64>(1)?.max(0) as u64));
                }
                last = Some(digest);
            }
            Ok(Slice {
                candidates,
                next: if seen < limit { None } else { last },
            })
        })
        .await
    }

    /// Forgets those of `digests` that no repository links (any more) and no composite or Spack
    /// index layout names, in one transaction (a composite's pieces go with it).
    /// Returns the ones it forgot.
    pub async fn gc_forget_blobs(&self, digests: Vec<String>) -> Result<Vec<String>> {
        self.write(move |c| {
            let mut stmt = c.prepare_cached(
                "DELETE FROM blobs WHERE digest = ?1
                    AND NOT EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = blobs.digest)
                    AND NOT EXISTS (SELECT 1 FROM blob_pieces p WHERE p.piece = blobs.digest)
                    AND NOT EXISTS (SELECT 1 FROM spack_index_layout l WHERE l.blob = blobs.digest)",
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

    /// Up to `limit` links of superseded Spack index blobs recorded before `before`.
    pub async fn gc_superseded_due(&self, before: i64, limit: usize) -> Result<Vec<LinkKey>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT repo_id, digest FROM gc_superseded WHERE superseded_at < ?1
                  ORDER BY superseded_at LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![before, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<db::Result<Vec<LinkKey>>>()?)
        })
        .await
    }

    /// Unlinks those of the superseded index blobs `links` that no manifest of their repository
    /// references (whatever their link's age), and forgets the records of all of them, if still
    /// recorded before `before` (an index superseded again meanwhile waits its turn).
    /// Returns how many links went.
    pub async fn gc_unlink_superseded(&self, links: Vec<LinkKey>, before: i64) -> Result<u64> {
        self.write(move |c| {
            let mut done = c.prepare_cached(
                "DELETE FROM gc_superseded WHERE repo_id = ?1 AND digest = ?2 AND superseded_at < ?3",
            )?;
            let sql = format!(
                "DELETE FROM repo_blobs AS rb WHERE rb.repo_id = ?1 AND rb.digest = ?2 AND NOT {LINK_REFERENCED}"
            );
            let mut unlink = c.prepare_cached(&sql)?;
            let mut n = 0;
            for (repo, digest) in links {
                if done.execute(params![repo, digest, before])? > 0 {
                    n += unlink.execute(params![repo, digest])? as u64;
                }
            }
            Ok(n)
        })
        .await
    }

    /// Sizes of those of `digests` that the catalog records and no repository links or
    /// composite names (0 for a composite, which holds no bytes of its own).
    pub async fn blob_sizes_if_unlinked(&self, digests: Vec<String>) -> Result<HashMap<String, u64>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT CASE WHEN b.composite = 1 THEN 0 ELSE b.size END FROM blobs b WHERE b.digest = ?1
                    AND NOT EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = b.digest)
                    AND NOT EXISTS (SELECT 1 FROM blob_pieces p WHERE p.piece = b.digest)
                    AND NOT EXISTS (SELECT 1 FROM spack_index_layout l WHERE l.blob = b.digest)",
            )?;
            let mut sizes = HashMap::new();
            for digest in &digests {
                if let Some(size) = stmt.query_row([digest], |r| r.get::<_, i64>(0)).optional()? {
                    sizes.insert(digest.clone(), size.max(0) as u64);
                }
            }
            Ok(sizes)
        })
        .await
    }

    /// Which of `digests` the catalog records as blobs.
    pub async fn blobs_known(&self, digests: Vec<String>) -> Result<HashSet<String>> {
        self.read(move |c| {
            let mut known = HashSet::new();
            for chunk in digests.chunks(500) {
                let marks = vec!["?"; chunk.len()].join(",");
                let mut stmt = c.prepare(&format!("SELECT digest FROM blobs WHERE digest IN ({marks})"))?;
                let params: Vec<&dyn db::ToParam> = chunk.iter().map(|d| d as &dyn db::ToParam).collect();
                let rows = stmt.query_map(&params, |r| r.get::<_, String>(0))?;
                for row in rows {
                    known.insert(row?);
                }
            }
            Ok(known)
        })
        .await
    }

    /// Whether the catalog records blob `digest` at all.
    pub async fn blob_known(&self, digest: &str) -> Result<bool> {
        let digest = digest.to_owned();
        self.read(move |c| {
            Ok(
                c.query_row("SELECT 1 FROM blobs WHERE digest = ?1", [&digest], |_| Ok(()))
                    .optional()?
                    .is_some(),
            )
        })
        .await
    }

    /// A persistent value of the collector's (see `gc_state`).
    pub async fn gc_state(&self, key: &'static str) -> Result<Option<i64>> {
        self.read(move |c| {
            Ok(
                c.query_row("SELECT value FROM gc_state WHERE key = ?1", [key], |r| r.get(0))
                    .optional()?,
            )
        })
        .await
    }

    pub async fn set_gc_state(&self, key: &'static str, value: i64) -> Result<()> {
        self.write(move |c| {
            c.execute(
                "INSERT INTO gc_state (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )?;
            Ok(())
        })
        .await
    }
}

/// A pull of proxied content served from the local copy (see `registry::proxy::lru`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProxyPull {
    /// A manifest, by repository and digest.
    Manifest { repo: String, digest: String },
    /// A config or layer blob: counts as a pull of every manifest of the repository that
    /// references it.
    Blob { repo: String, digest: String },
}

/// A cached manifest of a proxied repository, as eviction sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvictCandidate {
    pub id: i64,
    pub repo: String,
    pub digest: String,
    /// Its last use when scanned: `max(created_at, coalesce(proxy_pulled_at, 0))`.
    pub last_used: i64,
}

/// What evicting one manifest removed.
#[derive(Debug, Clone, Default)]
pub struct Eviction {
    /// The manifests deleted: the one asked for first, then the children and referrers that
    /// went with it (`(repo, digest)`).
    pub manifests: Vec<(String, String)>,
    /// The tags that named them.
    pub tags: Vec<String>,
    /// Bytes the prefix's cached content no longer counts: the manifests' sizes and the blobs
    /// they referenced that no remaining manifest under the prefix references.
    pub bytes: u64,
}

/// `repositories.name` bounds of the repositories under `prefix` (which ends in `/`): names
/// `>= lower` and `< upper` (`/` is followed by `0` in byte order).
fn prefix_range(prefix: &str) -> (String, String) {
    let upper = match prefix.strip_suffix('/') {
        Some(body) => format!("{body}0"),
        None => format!("{prefix}\u{10ffff}"),
    };
    (prefix.to_owned(), upper)
}

/// Repositories under the prefix range `?1..?2`.
const PREFIX_REPOS: &str = "SELECT id FROM repositories WHERE name >= ?1 AND name < ?2";

/// Records a pull of manifest `?2` of repository `?1` at `?3`: the manifest, and the manifests
/// of its repository that list it as a child (an index whose platform manifest was pulled by
/// digest): eviction candidates are the roots, so the index must look used. Both sides of the
/// `UNION` are index lookups (`(repo_id, digest)`, `manifest_refs(digest)`), and the rows are
/// then found by id: no scan of the repository's manifests, whatever their number. The outer
/// `+repo_id` (the unary `+` keeps SQLite from using an index for that term) keeps a child
/// listed by another repository's index out while leaving the lookup by id to the planner:
/// without it, SQLite searches the `(repo_id)` prefix of the unique index and tests each of
/// the repository's manifests against the list.
const RECORD_MANIFEST_PULL: &str = "UPDATE manifests SET proxy_pulled_at = ?3
  WHERE +repo_id = (SELECT id FROM repositories WHERE name = ?1)
    AND id IN (SELECT id FROM manifests
                WHERE repo_id = (SELECT id FROM repositories WHERE name = ?1) AND digest = ?2
               UNION
               SELECT manifest_id FROM manifest_refs WHERE digest = ?2 AND kind = 'manifest')
    AND (proxy_pulled_at IS NULL OR proxy_pulled_at < ?3)";

/// Records a pull of blob `?2` of repository `?1` at `?3`: every manifest of the repository
/// that references it as config or layer, found by `manifest_refs(digest)` and then by id
/// (`+repo_id` as in [`RECORD_MANIFEST_PULL`]).
const RECORD_BLOB_PULL: &str = "UPDATE manifests SET proxy_pulled_at = ?3
  WHERE +repo_id = (SELECT id FROM repositories WHERE name = ?1)
    AND id IN (SELECT manifest_id FROM manifest_refs WHERE digest = ?2 AND kind IN ('config', 'layer'))
    AND (proxy_pulled_at IS NULL OR proxy_pulled_at < ?3)";

impl Catalog {
    /// Records pulls of proxied content at unix second `at` each; a stored time is only moved
    /// forward. Returns the rows changed.
    pub async fn record_proxy_pulls(&self, pulls: Vec<(ProxyPull, i64)>) -> Result<u64> {
        self.write(move |c| {
            // The manifest, and the manifests of its repository that list it as a child (an
            // index whose platform manifest was pulled by digest): eviction candidates are the
            // roots, so the index must look used.
            let mut manifest = c.prepare_cached(RECORD_MANIFEST_PULL)?;
            let mut blob = c.prepare_cached(RECORD_BLOB_PULL)?;
            let mut written = 0u64;
            for (pull, at) in &pulls {
                written += match pull {
                    ProxyPull::Manifest { repo, digest } => manifest.execute(params![repo, digest, at])?,
                    ProxyPull::Blob { repo, digest } => blob.execute(params![repo, digest, at])?,
                } as u64;
            }
            Ok(written)
        })
        .await
    }

    /// The bytes the cached content under `prefix` takes once what is no longer needed is
    /// deleted: every distinct blob a manifest of a repository under the prefix references as
    /// config or layer (counted once, however many repositories or manifests share it), plus
    /// the manifests' own sizes. Blobs only linked (an evicted or collected manifest's, waiting
    /// out the grace period) are not counted: they are on their way out.
    pub async fn proxy_cached_bytes(&self, prefix: &str) -> Result<u64> {
        let (lower, upper) = prefix_range(prefix);
        self.read(move |c| {
            let sql = format!(
                "SELECT coalesce((SELECT sum(b.size) FROM blobs b WHERE b.digest IN (
                            SELECT r.digest FROM manifest_refs r JOIN manifests m ON m.id = r.manifest_id
                             WHERE m.repo_id IN ({PREFIX_REPOS}) AND r.kind IN ('config', 'layer'))), 0)
                      + coalesce((SELECT sum(manifest_bytes) FROM repositories WHERE id IN ({PREFIX_REPOS})), 0)"
            );
            let bytes: i64 = c.query_row(&sql, params![lower, upper], |r| r.get(0))?;
            Ok(bytes.max(0) as u64)
        })
        .await
    }

    /// Up to `limit` manifests under `prefix` that eviction may take, least recently used
    /// first: those no manifest of their repository lists as a child (an index's children go
    /// with it) and that are not a Spack cache's current index (the registry built it from the
    /// specs cached here; it would only be built again), ordered by their last use (the later of their fetch, `created_at`, and their
    /// last pull from the cache, `proxy_pulled_at`), never-pulled ones first among equals, then
    /// by fetch time.
    pub async fn proxy_evict_candidates(&self, prefix: &str, limit: usize) -> Result<Vec<EvictCandidate>> {
        let (lower, upper) = prefix_range(prefix);
        self.read(move |c| {
            let sql = format!(
                "SELECT m.id, p.name, m.digest, max(m.created_at, coalesce(m.proxy_pulled_at, 0))
                   FROM manifests m JOIN repositories p ON p.id = m.repo_id
                  WHERE m.repo_id IN ({PREFIX_REPOS})
                    AND NOT EXISTS (SELECT 1 FROM manifest_refs r JOIN manifests q ON q.id = r.manifest_id
                                     WHERE r.digest = m.digest AND r.kind = 'manifest' AND q.repo_id = m.repo_id)
                    AND NOT EXISTS (SELECT 1 FROM spack_index s
                                     WHERE s.repo_id = m.repo_id AND s.manifest_digest = m.digest)
                  ORDER BY max(m.created_at, coalesce(m.proxy_pulled_at, 0)),
                           m.proxy_pulled_at IS NOT NULL, m.created_at, m.id
                  LIMIT ?3"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![lower, upper, limit as i64], |r| {
                Ok(EvictCandidate {
                    id: r.get(0)?,
                    repo: r.get(1)?,
                    digest: r.get(2)?,
                    last_used: r.get(3)?,
                })
            })?;
            Ok(rows.collect::<db::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Evicts manifest `id` of a repository under `prefix` as a client `DELETE` by digest
    /// would (the same row deletion, so its tags, references and every trigger follow), with
    /// the children no other manifest of its repository lists and the referrers that describe
    /// it, unless a tag names them; each recorded in the audit trail (actor `gc`,
    /// `proxy.evict`). Nothing when the manifest is gone or a manifest lists it as a child
    /// (it became one since the scan). The row must still be the candidate's (its id, repository
    /// and digest): a row id freed by a deletion and reused between the scan and this write
    /// (`manifests.id` has no `AUTOINCREMENT`, so SQLite reuses the largest freed id) names
    /// another manifest, which is left alone. Its last use must still be the scanned one: a
    /// pull written since the scan (the flusher runs during a pass) makes it no longer the
    /// least recently used, so it is left alone and a later scan orders it anew. A pull still
    /// in the in-memory map ([`crate::registry::proxy::lru`]) is not seen.
    pub async fn proxy_evict(&self, prefix: &str, candidate: &EvictCandidate) -> Result<Eviction> {
        let (lower, upper) = prefix_range(prefix);
        let EvictCandidate {
            id,
            repo,
            digest,
            last_used,
        } = candidate.clone();
        self.write(move |c| {
            let mut eviction = Eviction::default();
            let (same, listed): (bool, bool) = c.query_row(
                "SELECT EXISTS (SELECT 1 FROM manifests m JOIN repositories p ON p.id = m.repo_id
                                 WHERE m.id = ?1 AND m.digest = ?2 AND p.name = ?3
                                   AND max(m.created_at, coalesce(m.proxy_pulled_at, 0)) = ?4),
                        EXISTS (SELECT 1 FROM manifests m JOIN manifest_refs r ON r.digest = m.digest AND r.kind = 'manifest'
                                  JOIN manifests q ON q.id = r.manifest_id AND q.repo_id = m.repo_id
                                 WHERE m.id = ?1)",
                params![id, digest, repo, last_used],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if !same || listed {
                return Ok(eviction);
            }
            let mut manifest = c.prepare_cached(
                "SELECT m.repo_id, p.name, m.digest, m.size FROM manifests m JOIN repositories p ON p.id = m.repo_id
                  WHERE m.id = ?1 AND p.name >= ?2 AND p.name < ?3",
            )?;
            let mut refs = c.prepare_cached("SELECT digest, kind FROM manifest_refs WHERE manifest_id = ?1")?;
            let mut tags = c.prepare_cached("SELECT name FROM tags WHERE manifest_id = ?1 ORDER BY name")?;
            let mut referrers =
                c.prepare_cached("SELECT id FROM manifests WHERE repo_id = ?1 AND subject = ?2")?;
            let mut delete = c.prepare_cached("DELETE FROM manifests WHERE id = ?1")?;
            let mut orphan_child = c.prepare_cached(
                "SELECT m.id FROM manifests m WHERE m.repo_id = ?1 AND m.digest = ?2
                    AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.manifest_id = m.id)
                    AND NOT EXISTS (SELECT 1 FROM manifest_refs r JOIN manifests q ON q.id = r.manifest_id
                                     WHERE r.digest = m.digest AND r.kind = 'manifest' AND q.repo_id = m.repo_id)",
            )?;
            let (actor, at) = (Actor::system("gc"), now());
            let mut blobs = HashSet::new();
            let mut queue = vec![(id, true)];
            while let Some((mid, first)) = queue.pop() {
                let Some((repo_id, repo, digest, size)) = manifest
                    .query_row(params![mid, lower, upper], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?))
                    })
                    .optional()?
                else {
                    continue;
                };
                let named: Vec<String> = tags
                    .query_map([mid], |r| r.get::<_, String>(0))?
                    .collect::<db::Result<_>>()?;
                if !first && !named.is_empty() {
                    continue; // a tagged child or referrer stays (and keeps its references)
                }
                let mut children = Vec::new();
                for row in refs.query_map([mid], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
                    let (d, kind) = row?;
                    if kind == "manifest" {
                        children.push(d);
                    } else {
                        blobs.insert(d);
                    }
                }
                let described: Vec<i64> = referrers
                    .query_map(params![repo_id, digest], |r| r.get::<_, i64>(0))?
                    .collect::<db::Result<_>>()?;
                if delete.execute([mid])? == 0 {
                    continue;
                }
                let mut event = Event::new(Action::ProxyEvict).repo(repo.as_str()).digest(digest.as_str());
                if !named.is_empty() {
                    event = event.detail(serde_json::json!({ "tags": named }));
                }
                audit::record(c, &actor, &event, at)?;
                eviction.bytes += size.max(0) as u64;
                eviction.tags.extend(named);
                eviction.manifests.push((repo, digest));
                for child in children {
                    if let Some(cid) = orphan_child.query_row(params![repo_id, child], |r| r.get::<_, i64>(0)).optional()? {
                        queue.push((cid, false));
                    }
                }
                queue.extend(described.into_iter().map(|r| (r, false)));
            }
            let sql = format!(
                "SELECT b.size FROM blobs b WHERE b.digest = ?3
                    AND NOT EXISTS (SELECT 1 FROM manifest_refs r JOIN manifests m ON m.id = r.manifest_id
                                     WHERE r.digest = b.digest AND r.kind IN ('config', 'layer')
                                       AND m.repo_id IN ({PREFIX_REPOS}))"
            );
            let mut freed = c.prepare_cached(&sql)?;
            for digest in blobs {
                if let Some(size) = freed
                    .query_row(params![lower, upper, digest], |r| r.get::<_, i64>(0))
                    .optional()?
                {
                    eviction.bytes += size.max(0) as u64;
                }
            }
            Ok(eviction)
        })
        .await
    }
}

/// Names of the repositories `ids`.
fn repo_names(c: &Connection, ids: impl Iterator<Item = i64>) -> db::Result<HashMap<i64, String>> {
    let mut stmt = c.prepare_cached("SELECT name FROM repositories WHERE id = ?1")?;
    let mut names = HashMap::new();
    for id in ids {
        if let std::collections::hash_map::Entry::Vacant(e) = names.entry(id)
            && let Some(name) = stmt.query_row([id], |r| r.get::<_, String>(0)).optional()?
        {
            e.insert(name);
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `hub/x`: a tagged index (10, created at 200) and its child (11) with layer L2 and config
    /// L1; `hub/y`: an image (20, created at 100, pulled at 500) with layer L1, and a referrer
    /// of it (21, created at 150); `local/z` (hosted) and `hubby/w` (not under `hub/`).
    async fn catalog() -> (tempfile::TempDir, Catalog) {
        let tmp = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&tmp.path().join("catalog.db")).unwrap();
        catalog
            .write(|c| {
                c.execute_batch(
                    "INSERT INTO repositories (id, name, created_at) VALUES
                        (1, 'hub/x', 0), (2, 'hub/y', 0), (3, 'local/z', 0), (4, 'hubby/w', 0);
                     INSERT INTO blobs (digest, size, created_at) VALUES
                        ('sha256:l1', 1000, 0), ('sha256:l2', 2000, 0), ('sha256:l3', 5000, 0);
                     INSERT INTO repo_blobs (repo_id, digest, linked_at) VALUES
                        (1, 'sha256:l1', 0), (1, 'sha256:l2', 0), (2, 'sha256:l1', 0), (3, 'sha256:l3', 0);
                     INSERT INTO manifests (id, repo_id, digest, media_type, size, content, subject, created_at) VALUES
                        (10, 1, 'sha256:ix', 'x', 10, x'00', NULL, 200),
                        (11, 1, 'sha256:c1', 'x', 20, x'00', NULL, 200),
                        (20, 2, 'sha256:y1', 'x', 30, x'00', NULL, 100),
                        (21, 2, 'sha256:r1', 'x', 5, x'00', 'sha256:y1', 150),
                        (30, 3, 'sha256:z1', 'x', 40, x'00', NULL, 0),
                        (40, 4, 'sha256:w1', 'x', 50, x'00', NULL, 0);
                     INSERT INTO manifest_refs (manifest_id, digest, kind) VALUES
                        (10, 'sha256:c1', 'manifest'), (11, 'sha256:l1', 'config'), (11, 'sha256:l2', 'layer'),
                        (20, 'sha256:l1', 'layer'), (30, 'sha256:l3', 'layer');
                     INSERT INTO tags (repo_id, name, manifest_id, updated_at) VALUES (1, 'v1', 10, 200);
                     UPDATE manifests SET proxy_pulled_at = 500 WHERE id = 20;",
                )?;
                Ok(())
            })
            .await
            .unwrap();
        (tmp, catalog)
    }

    async fn pulled_at(catalog: &Catalog, id: i64) -> Option<i64> {
        catalog
            .read(move |c| {
                Ok(
                    c.query_row("SELECT proxy_pulled_at FROM manifests WHERE id = ?1", [id], |r| {
                        r.get(0)
                    })?,
                )
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn pulls_only_move_forward_and_a_blob_pull_counts_for_its_manifests() {
        let (_tmp, catalog) = catalog().await;
        let y1 = ProxyPull::Manifest {
            repo: "hub/y".into(),
            digest: "sha256:y1".into(),
        };
        assert_eq!(catalog.record_proxy_pulls(vec![(y1.clone(), 400)]).await.unwrap(), 0);
        assert_eq!(pulled_at(&catalog, 20).await, Some(500));
        assert_eq!(catalog.record_proxy_pulls(vec![(y1, 600)]).await.unwrap(), 1);
        assert_eq!(pulled_at(&catalog, 20).await, Some(600));
        let l1 = ProxyPull::Blob {
            repo: "hub/x".into(),
            digest: "sha256:l1".into(),
        };
        assert_eq!(catalog.record_proxy_pulls(vec![(l1, 700)]).await.unwrap(), 1);
        assert_eq!(pulled_at(&catalog, 11).await, Some(700), "the child referencing L1");
        assert_eq!(pulled_at(&catalog, 10).await, None);
        assert_eq!(
            pulled_at(&catalog, 20).await,
            Some(600),
            "another repository's manifest"
        );
        // A platform manifest pulled by digest: the index listing it counts as pulled too.
        let c1 = ProxyPull::Manifest {
            repo: "hub/x".into(),
            digest: "sha256:c1".into(),
        };
        assert_eq!(catalog.record_proxy_pulls(vec![(c1, 800)]).await.unwrap(), 2);
        assert_eq!(pulled_at(&catalog, 11).await, Some(800));
        assert_eq!(pulled_at(&catalog, 10).await, Some(800), "the index listing it");
        assert_eq!(pulled_at(&catalog, 20).await, Some(600));
    }

    #[tokio::test]
    async fn eviction_takes_the_least_recently_used_root_with_its_children_and_referrers() {
        let (_tmp, catalog) = catalog().await;
        // L1 once (shared by two repositories), L2, and the four manifests; not L3 (hosted) nor
        // `hubby/w`'s manifest.
        assert_eq!(
            catalog.proxy_cached_bytes("hub/").await.unwrap(),
            1000 + 2000 + 10 + 20 + 30 + 5
        );
        let order: Vec<i64> = catalog
            .proxy_evict_candidates("hub/", 10)
            .await
            .unwrap()
            .iter()
            .map(|c| c.id)
            .collect();
        // The referrer (used at 150), the index (200), the pulled image (500); never the child.
        assert_eq!(order, [21, 10, 20]);

        let e = catalog
            .proxy_evict(
                "hub/",
                &EvictCandidate {
                    id: 10,
                    repo: "hub/x".into(),
                    digest: "sha256:ix".into(),
                    last_used: 200,
                },
            )
            .await
            .unwrap();
        assert_eq!(
            e.manifests,
            [
                ("hub/x".to_owned(), "sha256:ix".to_owned()),
                ("hub/x".to_owned(), "sha256:c1".to_owned())
            ]
        );
        assert_eq!(e.tags, ["v1"]);
        // Both manifests and L2; L1 is still referenced by `hub/y`.
        assert_eq!(e.bytes, 10 + 20 + 2000);
        assert_eq!(catalog.proxy_cached_bytes("hub/").await.unwrap(), 1000 + 30 + 5);

        // Row 20 holding another digest, or in another repository, than the candidate's (its
        // id reused since the scan): left alone.
        for (repo, digest) in [("hub/y", "sha256:ix"), ("hub/x", "sha256:y1")] {
            let stale = EvictCandidate {
                id: 20,
                repo: repo.into(),
                digest: digest.into(),
                last_used: 500,
            };
            let e = catalog.proxy_evict("hub/", &stale).await.unwrap();
            assert!(e.manifests.is_empty(), "{e:?}");
        }
        assert_eq!(catalog.proxy_cached_bytes("hub/").await.unwrap(), 1000 + 30 + 5);
        let e = catalog
            .proxy_evict(
                "hub/",
                &EvictCandidate {
                    id: 20,
                    repo: "hub/y".into(),
                    digest: "sha256:y1".into(),
                    last_used: 500,
                },
            )
            .await
            .unwrap();
        assert_eq!(e.manifests.len(), 2, "the image and its referrer: {e:?}");
        assert_eq!(e.bytes, 30 + 5 + 1000);
        assert_eq!(catalog.proxy_cached_bytes("hub/").await.unwrap(), 0);

        // Outside the prefix: nothing.
        assert!(
            catalog
                .proxy_evict(
                    "hub/",
                    &EvictCandidate {
                        id: 30,
                        repo: "local/z".into(),
                        digest: "sha256:z1".into(),
                        last_used: 0,
                    }
                )
                .await
                .unwrap()
                .manifests
                .is_empty()
        );
        assert!(
            catalog
                .proxy_evict(
                    "hub/",
                    &EvictCandidate {
                        id: 40,
                        repo: "hubby/w".into(),
                        digest: "sha256:w1".into(),
                        last_used: 0,
                    }
                )
                .await
                .unwrap()
                .manifests
                .is_empty()
        );
        let (audited, links, figures): (i64, i64, i64) = catalog
            .read(|c| {
                Ok((
                    c.query_row(
                        "SELECT count(*) FROM audit_log WHERE action = 'proxy.evict' AND actor = 'gc'",
                        [],
                        |r| r.get(0),
                    )?,
                    c.query_row("SELECT count(*) FROM repo_blobs", [], |r| r.get(0))?,
                    c.query_row("SELECT sum(manifest_bytes) FROM repositories", [], |r| r.get(0))?,
                ))
            })
            .await
            .unwrap();
        assert_eq!(audited, 4);
        assert_eq!(
            links, 4,
            "eviction unlinks nothing: the collector does, after the grace period"
        );
        assert_eq!(figures, 40 + 50, "the repository figures followed the deletions");
    }

    /// A candidate pulled after the scan (the pull written by the flusher, during the pass) is
    /// no longer the least recently used: its eviction is a no-op, for an image and for an
    /// index whose platform manifest was pulled; a new scan orders them anew and sees the
    /// new last use, with which the eviction goes through.
    #[tokio::test]
    async fn eviction_leaves_a_candidate_pulled_since_the_scan() {
        let (_tmp, catalog) = catalog().await;
        let scanned = catalog.proxy_evict_candidates("hub/", 10).await.unwrap();
        let used: Vec<(i64, i64)> = scanned.iter().map(|c| (c.id, c.last_used)).collect();
        assert_eq!(used, [(21, 150), (10, 200), (20, 500)]);
        let pulls = vec![
            (
                ProxyPull::Manifest {
                    repo: "hub/y".into(),
                    digest: "sha256:y1".into(),
                },
                900,
            ),
            (
                ProxyPull::Manifest {
                    repo: "hub/x".into(),
                    digest: "sha256:c1".into(),
                },
                950,
            ),
        ];
        catalog.record_proxy_pulls(pulls).await.unwrap();
        for candidate in &scanned[1..] {
            let e = catalog.proxy_evict("hub/", candidate).await.unwrap();
            assert!(e.manifests.is_empty(), "{candidate:?} was pulled since: {e:?}");
        }
        let before = 1000 + 2000 + 10 + 20 + 30 + 5;
        assert_eq!(catalog.proxy_cached_bytes("hub/").await.unwrap(), before);

        let rescanned = catalog.proxy_evict_candidates("hub/", 10).await.unwrap();
        let used: Vec<(i64, i64)> = rescanned.iter().map(|c| (c.id, c.last_used)).collect();
        assert_eq!(used, [(21, 150), (20, 900), (10, 950)], "the new order");
        let e = catalog.proxy_evict("hub/", &rescanned[1]).await.unwrap();
        assert_eq!(e.manifests.len(), 2, "the image and its referrer: {e:?}");
    }

    /// A recorded pull finds its rows through indexes: the `(repo_id, digest)` one for a
    /// manifest, `manifest_refs(digest)` for an index listing it or the manifests referencing a
    /// blob, the row id for the update; never a scan of `manifests` (a repository's, or the
    /// whole table).
    #[tokio::test]
    async fn a_recorded_pull_uses_the_indexes() {
        let (_tmp, catalog) = catalog().await;
        for (sql, lookups) in [
            (
                RECORD_MANIFEST_PULL,
                &[
                    "sqlite_autoindex_manifests_1 (repo_id=? AND digest=?)",
                    "manifest_refs_by_digest (digest=?)",
                ][..],
            ),
            (RECORD_BLOB_PULL, &["manifest_refs_by_digest (digest=?)"][..]),
        ] {
            let plan: Vec<String> = catalog
                .read(move |c| {
                    let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                    let rows = stmt.query_map(params!["hub/x", "sha256:c1", 1], |r| r.get::<_, String>(3))?;
                    Ok(rows.collect::<db::Result<Vec<_>>>()?)
                })
                .await
                .unwrap();
            let text = plan.join("\n");
            for lookup in lookups {
                assert!(plan.iter().any(|l| l.contains(lookup)), "{lookup}:\n{text}");
            }
            assert!(
                plan.iter()
                    .any(|l| l.starts_with("SEARCH manifests USING INTEGER PRIMARY KEY (rowid=?)")),
                "the updated rows found by id:\n{text}"
            );
            assert!(
                !plan
                    .iter()
                    .any(|l| l.starts_with("SCAN manifests") || l.ends_with("sqlite_autoindex_manifests_1 (repo_id=?)")),
                "no scan of the manifests:\n{text}"
            );
        }
    }
}
