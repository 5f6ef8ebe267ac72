//! The catalog's queries, one async method per question the registry asks.
//!
//! Immutable tags (`auth::immutable`) are enforced here, in the write transaction that moves or
//! deletes a tag ([`Catalog::put_manifest`], [`Catalog::delete_tag`],
//! [`Catalog::delete_manifest`]): the tag's current manifest is read and the write refused in the
//! same transaction, so no concurrent write can slip between the check and the change.

use super::db::{self, Connection, OptionalExtension, params};

use super::audit::{self, Action, Actor, Event};
use super::{Catalog, now};
use crate::auth::{Overwritten, TagChange, TagLocks};
use crate::error::{Error, Result};
use crate::oci::manifest::Manifest;
use crate::oci::{Digest, Reference, RepoName, Tag};
use crate::spack::SpecImage;

/// A stored manifest, as served.
#[derive(Debug, Clone)]
pub struct ManifestRecord {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// `None` when only the metadata was asked for (HEAD).
    pub content: Option<Vec<u8>>,
}

/// A manifest accepted for storage.
pub struct NewManifest {
    pub digest: Digest,
    pub content: Vec<u8>,
    pub parsed: Manifest,
    pub tag: Option<Tag>,
    /// The Spack spec the manifest's config carries, for a spec tag.
    pub spack: Option<SpecImage>,
    /// The platform an image's config names, `os/architecture[/variant]`.
    pub platform: Option<String>,
    /// Set when this manifest is a freshly built Spack index for that generation.
    pub spack_index_generation: Option<i64>,
}

/// What a deletion did.
#[derive(Debug, Clone, Default)]
pub struct Deletion {
    /// Whether the tag or manifest existed (and is now gone).
    pub existed: bool,
    /// Immutable tags it deleted, by a writer allowed to (for the log).
    pub overwritten: Vec<Overwritten>,
}

/// A page of a filtered repository listing ([`Catalog::visible_repositories`]).
#[derive(Debug, Clone)]
pub struct RepositoryPage {
    /// Names the filter accepted, in lexical order.
    pub names: Vec<String>,
    /// When the scan reached its bound before the page filled: the last name it examined,
    /// after which the next page starts.
    pub resume_after: Option<String>,
}

/// One entry of a referrers response.
#[derive(Debug, Clone)]
pub struct Referrer {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    pub artifact_type: Option<String>,
    pub annotations: Option<String>,
}

pub(super) fn repo_id(conn: &Connection, repo: &str) -> db::Result<Option<i64>> {
    conn.query_row("SELECT id FROM repositories WHERE name = ?1", [repo], |r| r.get(0))
        .optional()
}

pub(super) fn ensure_repo(conn: &Connection, repo: &str) -> db::Result<i64> {
    if let Some(id) = repo_id(conn, repo)? {
        return Ok(id);
    }
    conn.query_row(
        "INSERT INTO repositories (name, created_at) VALUES (?1, ?2) RETURNING id",
        params![repo, now()],
        |r| r.get(0),
    )
}

pub(super) fn link(conn: &Connection, repo_id: i64, digest: &str, size: u64) -> db::Result<()> {
    conn.execute(
        "INSERT INTO blobs (digest, size, created_at) VALUES (?1, ?2, ?3) ON CONFLICT (digest) DO NOTHING",
        params![digest, size as i64, now()],
    )?;
    conn.execute(
        // Linking again (a re-upload, a mount) restarts the garbage collector's grace period.
        "INSERT INTO repo_blobs (repo_id, digest, linked_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (repo_id, digest) DO UPDATE SET linked_at = excluded.linked_at",
        params![repo_id, digest, now()],
    )?;
    Ok(())
}

/// Size of `digest` in `repo` and whether it is a composite, if the repository may read it.
fn entry_in_repo(conn: &Connection, repo: &str, digest: &str) -> db::Result<Option<(u64, bool)>> {
    conn.prepare_cached(
        "SELECT b.size, b.composite FROM repo_blobs rb
           JOIN repositories r ON r.id = rb.repo_id
           JOIN blobs b ON b.digest = rb.digest
          WHERE r.name = ?1 AND rb.digest = ?2",
    )?
    .query_row(params![repo, digest], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, bool>(1)?))
    })
    .optional()
}

/// The pieces of composite blob `digest`, in order. A piece whose recorded digest does not
/// parse (never written so) fails the read rather than serving other bytes.
pub(super) fn pieces_of(conn: &Connection, digest: &str) -> db::Result<Vec<crate::storage::composite::Piece>> {
    let mut stmt =
        conn.prepare_cached("SELECT piece, start, len FROM blob_pieces WHERE digest = ?1 ORDER BY ordinal")?;
    let rows = stmt.query_map([digest], |r| {
        let blob: String = r.get(0)?;
        let blob = blob.parse::<Digest>().map_err(|e| db::Error::conversion(0, e))?;
        Ok(crate::storage::composite::Piece {
            blob,
            start: r.get::<_, i64>(1)? as u64,
            len: r.get::<_, i64>(2)? as u64,
        })
    })?;
    rows.collect()
}

/// [`link`] for a blob whose object was just published: a composite recorded under the same
/// digest (the same bytes, see `storage::composite`) becomes a plain blob served from that
/// object, so that nothing a client stored depends on pieces the collector may then take, and
/// a build that wrote the same bytes whole can name its own blob.
pub(super) fn link_published(conn: &Connection, repo_id: i64, digest: &str, size: u64) -> db::Result<()> {
    link(conn, repo_id, digest, size)?;
    if conn.execute(
        "UPDATE blobs SET composite = 0 WHERE digest = ?1 AND composite = 1",
        [digest],
    )? > 0
    {
        conn.execute("DELETE FROM blob_pieces WHERE digest = ?1", [digest])?;
    }
    Ok(())
}

fn size_in_repo(conn: &Connection, repo: &str, digest: &str) -> db::Result<Option<u64>> {
    conn.query_row(
        "SELECT b.size FROM repo_blobs rb
           JOIN repositories r ON r.id = rb.repo_id
           JOIN blobs b ON b.digest = rb.digest
          WHERE r.name = ?1 AND rb.digest = ?2",
        params![repo, digest],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(|s| s.map(|s| s as u64))
}

impl Catalog {
    /// Whether the repository exists (has ever held a blob or manifest and was not removed).
    pub async fn repo_exists(&self, repo: &RepoName) -> Result<bool> {
        let repo = repo.to_string();
        self.read(move |c| Ok(repo_id(c, &repo)?.is_some())).await
    }

    /// Size of `digest` if the repository may read it.
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.read(move |c| Ok(size_in_repo(c, &repo, &digest)?)).await
    }

    /// Size of `digest` if the repository may read it, and, for a composite blob (see
    /// `storage::composite`), its pieces, read in the same snapshot as the size.
    pub async fn blob_body_entry(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<(u64, Option<Vec<crate::storage::composite::Piece>>)>> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.read(move |c| {
            // A plain blob (nearly every GET): one statement, as before composites existed.
            match entry_in_repo(c, &repo, &digest)? {
                None => return Ok(None),
                Some((size, false)) => return Ok(Some((size, None))),
                Some((_, true)) => {}
            }
            // A composite: its row and pieces again, from one snapshot (it may have been
            // forgotten since, or made plain by an object published under its digest).
            let tx = c.unchecked_transaction()?;
            let entry = match entry_in_repo(&tx, &repo, &digest)? {
                None => None,
                Some((size, false)) => Some((size, None)),
                Some((size, true)) => Some((size, Some(pieces_of(&tx, &digest)?))),
            };
            tx.commit()?;
            Ok(entry)
        })
        .await
    }

    /// Size of `digest` if the repository may read it, and whether it is a composite blob.
    pub async fn blob_entry(&self, repo: &RepoName, digest: &Digest) -> Result<Option<(u64, bool)>> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.read(move |c| Ok(entry_in_repo(c, &repo, &digest)?)).await
    }

    /// The pieces of composite blob `digest`, in order (empty for a plain blob or an unknown
    /// digest).
    pub async fn blob_pieces(&self, digest: &Digest) -> Result<Vec<crate::storage::composite::Piece>> {
        let digest = digest.to_string();
        self.read(move |c| Ok(pieces_of(c, &digest)?)).await
    }

    /// Size the catalog records for `digest` in any repository: `Some` only for a blob that was
    /// verified when it was published (every blob row is written after its publish).
    pub async fn recorded_blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        let digest = digest.to_string();
        self.read(move |c| {
            Ok(c.query_row("SELECT size FROM blobs WHERE digest = ?1", [&digest], |r| {
                r.get::<_, i64>(0)
            })
            .optional()?
            .map(|s| s.max(0) as u64))
        })
        .await
    }

    /// Records a verified, published blob and links it to the repository.
    pub async fn link_blob(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<()> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.write(move |c| {
            let id = ensure_repo(c, &repo)?;
            Ok(link_published(c, id, &digest, size)?)
        })
        .await
    }

    /// Links a blob already stored for `from` (or, with `None`, any repository) into `repo`.
    /// Returns its size, or `None` when no source holds it.
    pub async fn mount_blob(&self, repo: &RepoName, digest: &Digest, from: Option<&RepoName>) -> Result<Option<u64>> {
        let (repo, digest, from) = (repo.to_string(), digest.to_string(), from.map(|f| f.to_string()));
        self.write(move |c| {
            let size = match &from {
                Some(from) => size_in_repo(c, from, &digest)?,
                None => c
                    .query_row(
                        "SELECT b.size FROM blobs b WHERE b.digest = ?1
                            AND EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = b.digest)",
                        [&digest],
                        |r| r.get::<_, i64>(0),
                    )
                    .optional()?
                    .map(|s| s as u64),
            };
            let Some(size) = size else { return Ok(None) };
            let id = ensure_repo(c, &repo)?;
            link(c, id, &digest, size)?;
            Ok(Some(size))
        })
        .await
    }

    /// Unlinks a blob from a repository, recording it in the audit trail. Returns whether it
    /// was linked.
    pub async fn unlink_blob(&self, repo: &RepoName, digest: &Digest, actor: &Actor) -> Result<bool> {
        let (repo, digest, actor) = (repo.to_string(), digest.to_string(), actor.clone());
        self.write(move |c| {
            let n = c.execute(
                "DELETE FROM repo_blobs WHERE digest = ?2
                    AND repo_id = (SELECT id FROM repositories WHERE name = ?1)",
                params![repo, digest],
            )?;
            if n > 0 {
                audit::record(
                    c,
                    &actor,
                    &Event::new(Action::BlobDelete).repo(repo).digest(digest),
                    now(),
                )?;
            }
            Ok(n > 0)
        })
        .await
    }

    /// Stores a validated manifest (and its tag) in one transaction, after checking inside that
    /// transaction that every blob and child manifest it references is present in the repository
    /// with the size its descriptor gives (`MANIFEST_INVALID` naming the blob or child if not),
    /// and that the tag, if it exists and names another manifest, is not immutable under `locks`
    /// (403 `DENIED` if it is, unless the writer may overwrite: then it is returned, to be logged).
    /// The push is recorded in the audit trail for `actor` (with the digest a moved tag named
    /// before); `None` for the registry's own manifests (Spack indexes), which are not.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        m: NewManifest,
        locks: TagLocks,
        actor: Option<&Actor>,
    ) -> Result<Option<Overwritten>> {
        let (repo, actor) = (repo.to_string(), actor.cloned());
        self.write(move |c| {
            let repo_id = ensure_repo(c, &repo)?;
            let digest = m.digest.to_string();
            let mut overwritten = None;
            let mut previous = None;
            if let Some(tag) = &m.tag {
                let current: Option<String> = c
                    .prepare_cached(
                        "SELECT m.digest FROM tags t JOIN manifests m ON m.id = t.manifest_id
                          WHERE t.repo_id = ?1 AND t.name = ?2",
                    )?
                    .query_row(params![repo_id, tag.as_str()], |r| r.get(0))
                    .optional()?;
                if let Some(current) = current.filter(|d| *d != digest) {
                    if !locks.is_empty() {
                        overwritten = locks.check(tag.as_str(), TagChange::Move { to: digest.clone() })?;
                    }
                    previous = Some(current);
                }
            }
            let p = &m.parsed;
            for d in p.required_blobs() {
                match size_in_repo(c, &repo, &d.digest.to_string())? {
                    Some(size) if size == d.size => {}
                    Some(size) => {
                        return Err(Error::ManifestInvalid(
                            format!(
                                "descriptor size {} for blob {} does not match its stored size {size}",
                                d.size, d.digest
                            )
                            .into(),
                        ));
                    }
                    None => return Err(Error::ManifestBlobUnknown(d.digest.clone())),
                }
            }
            for d in &p.manifests {
                let known: Option<i64> = c
                    .query_row(
                        "SELECT size FROM manifests WHERE repo_id = ?1 AND digest = ?2",
                        params![repo_id, d.digest.to_string()],
                        |r| r.get(0),
                    )
                    .optional()?;
                match known {
                    Some(size) if size as u64 == d.size => {}
                    Some(size) => {
                        return Err(Error::ManifestInvalid(
                            format!(
                                "descriptor size {} for child manifest {} does not match its stored size {size}",
                                d.size, d.digest
                            )
                            .into(),
                        ));
                    }
                    None => return Err(Error::ManifestBlobUnknown(d.digest.clone())),
                }
            }
            let manifest_id: i64 = c.query_row(
                "INSERT INTO manifests
                    (repo_id, digest, media_type, size, content, artifact_type, subject, annotations,
                     created_at, touched_at, platform)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10)
                 ON CONFLICT (repo_id, digest) DO UPDATE
                    SET media_type = excluded.media_type, touched_at = excluded.touched_at,
                        platform = coalesce(excluded.platform, manifests.platform)
                 RETURNING id",
                params![
                    repo_id,
                    digest,
                    p.media_type,
                    m.content.len() as i64,
                    m.content,
                    p.artifact_type,
                    p.subject.as_ref().map(|s| s.digest.to_string()),
                    p.annotations,
                    now(),
                    m.platform
                ],
                |r| r.get(0),
            )?;
            let mut refs = c.prepare_cached(
                "INSERT INTO manifest_refs (manifest_id, digest, kind) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            )?;
            if let Some(cfg) = &p.config {
                refs.execute(params![manifest_id, cfg.digest.to_string(), "config"])?;
            }
            for l in &p.layers {
                refs.execute(params![manifest_id, l.digest.to_string(), "layer"])?;
            }
            for child in &p.manifests {
                refs.execute(params![manifest_id, child.digest.to_string(), "manifest"])?;
            }
            if let Some(tag) = &m.tag {
                c.execute(
                    "INSERT INTO tags (repo_id, name, manifest_id, updated_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (repo_id, name) DO UPDATE
                        SET manifest_id = excluded.manifest_id, updated_at = excluded.updated_at",
                    params![repo_id, tag.as_str(), manifest_id, now()],
                )?;
                super::spack::sync_tag(c, repo_id, tag.as_str(), manifest_id, m.spack.as_ref())?;
            }
            if let Some(generation) = m.spack_index_generation {
                super::spack::publish_index(c, repo_id, generation, &digest)?;
            }
            if let Some(actor) = &actor {
                let mut detail = serde_json::Map::new();
                if let Some(p) = previous {
                    detail.insert("previous".into(), p.into());
                }
                if let Some(o) = &overwritten {
                    detail.insert("overwrote_immutable_rule".into(), o.rule.clone().into());
                }
                let mut event = Event::new(Action::ManifestPush)
                    .repo(repo.as_str())
                    .tag(m.tag.as_ref().map(|t| t.as_str()))
                    .digest(digest.as_str());
                if !detail.is_empty() {
                    event = event.detail(detail.into());
                }
                audit::record(c, actor, &event, now())?;
            }
            Ok(overwritten)
        })
        .await
    }

    /// Looks a manifest up by tag or digest; `with_content` false skips loading the bytes.
    pub async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        with_content: bool,
    ) -> Result<Option<ManifestRecord>> {
        let (repo, reference) = (repo.to_string(), reference.clone());
        self.read(move |c| {
            // Four fixed statements (no SQL built per request): by tag or digest, with or
            // without the bytes.
            const SELECT_BY_TAG: [&str; 2] = [
                "SELECT m.digest, m.media_type, m.size, NULL FROM tags t JOIN manifests m ON m.id = t.manifest_id
                   JOIN repositories r ON r.id = t.repo_id WHERE r.name = ?1 AND t.name = ?2",
                "SELECT m.digest, m.media_type, m.size, m.content FROM tags t JOIN manifests m ON m.id = t.manifest_id
                   JOIN repositories r ON r.id = t.repo_id WHERE r.name = ?1 AND t.name = ?2",
            ];
            const SELECT_BY_DIGEST: [&str; 2] = [
                "SELECT m.digest, m.media_type, m.size, NULL FROM manifests m JOIN repositories r ON r.id = m.repo_id
                  WHERE r.name = ?1 AND m.digest = ?2",
                "SELECT m.digest, m.media_type, m.size, m.content FROM manifests m JOIN repositories r ON r.id = m.repo_id
                  WHERE r.name = ?1 AND m.digest = ?2",
            ];
            let (sql, key) = match &reference {
                Reference::Tag(t) => (SELECT_BY_TAG[usize::from(with_content)], t.as_str().to_owned()),
                Reference::Digest(d) => (SELECT_BY_DIGEST[usize::from(with_content)], d.to_string()),
            };
            let rec = c
                .prepare_cached(sql)?
                .query_row(params![repo, key], |r| {
                    Ok(ManifestRecord {
                        digest: r.get(0)?,
                        media_type: r.get(1)?,
                        size: r.get::<_, i64>(2)? as u64,
                        content: r.get(3)?,
                    })
                })
                .optional()?;
            Ok(rec)
        })
        .await
    }

    /// Deletes a manifest by digest, with its tags and references; refused (403 `DENIED`) while
    /// a tag immutable under `locks` names it, unless the writer may overwrite. Recorded in the
    /// audit trail for `actor`, with the tags that named it.
    pub async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        locks: TagLocks,
        actor: &Actor,
    ) -> Result<Deletion> {
        let (repo, digest, actor) = (repo.to_string(), digest.to_string(), actor.clone());
        self.write(move |c| {
            let Some(repo_id) = repo_id(c, &repo)? else {
                return Ok(Deletion::default());
            };
            let mut overwritten = Vec::new();
            if !locks.is_empty() {
                // The tags naming the manifest, or an index that lists it (at any depth):
                // deleting a child would break the immutable image as surely as the index.
                // PostgreSQL: the seed takes the columns' byte-order collation, which the
                // recursive term has (a bare parameter would be the database's default).
                macro_rules! up_from {
                    ($seed:literal) => {
                        concat!(
                            "WITH RECURSIVE up(digest) AS (
                             SELECT ",
                            $seed,
                            "
                             UNION
                             SELECT m.digest FROM up
                               JOIN manifest_refs r ON r.digest = up.digest AND r.kind = 'manifest'
                               JOIN manifests m ON m.id = r.manifest_id AND m.repo_id = ?1
                         )
                         SELECT t.name, m.digest FROM up
                           JOIN manifests m ON m.repo_id = ?1 AND m.digest = up.digest
                           JOIN tags t ON t.manifest_id = m.id
                          ORDER BY t.name"
                        )
                    };
                }
                let tags = c
                    .prepare_cached(match c.engine() {
                        db::Engine::Sqlite => up_from!("?2"),
                        db::Engine::Postgres => up_from!("CAST(?2 AS TEXT) COLLATE \"C\""),
                    })?
                    .query_map(params![repo_id, digest], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                    })?
                    .collect::<db::Result<Vec<_>>>()?;
                for (tag, named) in tags {
                    let change = TagChange::DeleteManifest {
                        digest: digest.clone(),
                        via: (named != digest).then_some(named),
                    };
                    overwritten.extend(locks.check(&tag, change)?);
                }
            }
            let tags = c
                .prepare_cached(
                    "SELECT t.name FROM tags t JOIN manifests m ON m.id = t.manifest_id
                      WHERE m.repo_id = ?1 AND m.digest = ?2 ORDER BY t.name",
                )?
                .query_map(params![repo_id, digest], |r| r.get::<_, String>(0))?
                .collect::<db::Result<Vec<_>>>()?;
            let n = c.execute(
                "DELETE FROM manifests WHERE digest = ?2 AND repo_id = ?1",
                params![repo_id, digest],
            )?;
            if n > 0 {
                let mut event = Event::new(Action::ManifestDelete)
                    .repo(repo.as_str())
                    .digest(digest.as_str());
                if !tags.is_empty() || !overwritten.is_empty() {
                    let rules: Vec<&str> = overwritten.iter().map(|o| o.rule.as_str()).collect();
                    event = event.detail(serde_json::json!({ "tags": tags, "overwrote_immutable_rules": rules }));
                }
                audit::record(c, &actor, &event, now())?;
            }
            Ok(Deletion {
                existed: n > 0,
                overwritten,
            })
        })
        .await
    }

    /// Deletes a tag (not the manifest it names); refused (403 `DENIED`) when it is immutable
    /// under `locks`, unless the writer may overwrite. Recorded in the audit trail for `actor`,
    /// with the digest the tag named.
    pub async fn delete_tag(&self, repo: &RepoName, tag: &Tag, locks: TagLocks, actor: &Actor) -> Result<Deletion> {
        let (repo, tag, actor) = (repo.to_string(), tag.to_string(), actor.clone());
        self.write(move |c| {
            let Some(repo_id) = repo_id(c, &repo)? else {
                return Ok(Deletion::default());
            };
            let named: Option<String> = c
                .prepare_cached(
                    "SELECT m.digest FROM tags t JOIN manifests m ON m.id = t.manifest_id
                      WHERE t.repo_id = ?1 AND t.name = ?2",
                )?
                .query_row(params![repo_id, tag], |r| r.get(0))
                .optional()?;
            let Some(named) = named else {
                return Ok(Deletion::default());
            };
            let overwritten = locks.check(&tag, TagChange::Delete)?;
            let n = c.execute(
                "DELETE FROM tags WHERE repo_id = ?1 AND name = ?2",
                params![repo_id, tag],
            )?;
            if n > 0 {
                let mut event = Event::new(Action::TagDelete)
                    .repo(repo.as_str())
                    .tag(Some(tag.as_str()))
                    .digest(named);
                if let Some(o) = &overwritten {
                    event = event.detail(serde_json::json!({ "overwrote_immutable_rule": o.rule }));
                }
                audit::record(c, &actor, &event, now())?;
            }
            Ok(Deletion {
                existed: n > 0,
                overwritten: overwritten.into_iter().collect(),
            })
        })
        .await
    }

    /// Tags of a repository in lexical order, after `last`, at most `limit`. `None` when the
    /// repository does not exist.
    pub async fn tags(&self, repo: &RepoName, last: Option<String>, limit: Option<u64>) -> Result<Option<Vec<String>>> {
        let repo = repo.to_string();
        self.read(move |c| {
            let Some(id) = repo_id(c, &repo)? else { return Ok(None) };
            let limit = limit.map_or(i64::MAX, |l| l.min(i64::MAX as u64) as i64);
            let mut stmt =
                // `index.spack` of a Spack build cache is the server's, listed whether or not a
                // client ever pushed it.
                c.prepare_cached(
                    "SELECT name FROM (SELECT name FROM tags WHERE repo_id = ?1
                                       UNION SELECT 'index.spack' FROM spack_index WHERE repo_id = ?1) AS names
                      WHERE name > ?2 ORDER BY name LIMIT ?3",
                )?;
            let tags = stmt
                .query_map(params![id, last.clone().unwrap_or_default(), limit], |r| r.get(0))?
                .collect::<db::Result<Vec<String>>>()?;
            Ok(Some(tags))
        })
        .await
    }

    /// Repository names after `last`, in lexical order, that `keep` accepts: up to `limit` of
    /// them, from one query that examines at most `scan` names (so the work is bounded whatever
    /// the number of repositories and however few of them `keep` accepts). `keep` runs on the
    /// blocking pool, so it must be cheap and must not block.
    pub async fn visible_repositories<F>(
        &self,
        last: Option<String>,
        limit: u64,
        scan: u64,
        keep: F,
    ) -> Result<RepositoryPage>
    where
        F: Fn(&str) -> bool + Send + 'static,
    {
        self.read(move |c| {
            let scan = scan.max(1);
            let mut stmt = c.prepare_cached("SELECT name FROM repositories WHERE name > ?1 ORDER BY name LIMIT ?2")?;
            let mut rows = stmt.query(params![
                last.clone().unwrap_or_default(),
                scan.min(i64::MAX as u64) as i64
            ])?;
            let mut names = Vec::new();
            let mut examined = 0u64;
            let mut last_examined = None;
            while let Some(row) = rows.next()? {
                let name: String = row.get(0)?;
                examined += 1;
                if keep(&name) {
                    names.push(name.clone());
                    if names.len() as u64 >= limit {
                        return Ok(RepositoryPage {
                            names,
                            resume_after: None,
                        });
                    }
                }
                last_examined = Some(name);
            }
            let resume_after = if examined >= scan { last_examined } else { None };
            Ok(RepositoryPage { names, resume_after })
        })
        .await
    }

    /// Manifests in the repository whose `subject` is `digest`, optionally of one artifact type.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        digest: &Digest,
        artifact_type: Option<String>,
    ) -> Result<Vec<Referrer>> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT m.digest, m.media_type, m.size, m.artifact_type, m.annotations
                   FROM manifests m JOIN repositories r ON r.id = m.repo_id
                  WHERE r.name = ?1 AND m.subject = ?2 AND (CAST(?3 AS TEXT) IS NULL OR m.artifact_type = ?3)
                  ORDER BY m.created_at, m.digest",
            )?;
            let rows = stmt
                .query_map(params![repo, digest, artifact_type], |r| {
                    Ok(Referrer {
                        digest: r.get(0)?,
                        media_type: r.get(1)?,
                        size: r.get::<_, i64>(2)? as u64,
                        artifact_type: r.get(3)?,
                        annotations: r.get(4)?,
                    })
                })?
                .collect::<db::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }
}
