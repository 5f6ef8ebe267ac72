//! Upload sessions (`uploads` table, migration 0003): what a session needs to be resumed after a
//! restart — its repository, the durable offset, the hash state at that offset, and the storage
//! backend's staging state (opaque JSON owned by `storage`).
//!
//! A row is created when a session opens, moved forward by checkpoints as staged data becomes
//! durable (never backwards: a late checkpoint cannot undo a newer one), and removed in the same
//! transaction that links the finished blob, or when the session is cancelled or expires, or at
//! start-up when its staged data is gone (`Registry::clean_up_uploads_at_start`).

use super::db::{self, OptionalExtension, params};
use uuid::Uuid;

use super::queries::{ensure_repo, link_published};
use super::{Catalog, now};
use crate::error::Result;
use crate::oci::{Digest, RepoName};

/// A persisted upload session.
#[derive(Debug, Clone)]
pub struct UploadRecord {
    pub id: Uuid,
    pub repo: String,
    /// The user who opened the session (`None`: opened without authentication).
    pub owner: Option<String>,
    /// `sha256` or `sha512`.
    pub algorithm: String,
    /// Bytes durably staged.
    pub offset: u64,
    /// Hasher state after `offset` bytes (`Hasher::save`).
    pub hash_state: Vec<u8>,
    /// The storage backend's staging state, JSON.
    pub staging: String,
}

/// A checkpoint of a session's durable progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadCheckpoint {
    pub offset: u64,
    pub hash_state: Vec<u8>,
    pub staging: String,
}

fn key(id: Uuid) -> String {
    id.simple().to_string()
}

fn record(r: &db::Row<'_>) -> db::Result<UploadRecord> {
    let id: String = r.get(0)?;
    let offset: i64 = r.get(3)?;
    Ok(UploadRecord {
        id: Uuid::try_parse(&id).unwrap_or(Uuid::nil()),
        repo: r.get(1)?,
        algorithm: r.get(2)?,
        offset: offset.max(0) as u64,
        hash_state: r.get(4)?,
        staging: r.get(5)?,
        owner: r.get(6)?,
    })
}

const COLUMNS: &str = "id, repo, algorithm, \"offset\", hash_state, staging, owner";
/// How many columns `COLUMNS` names (the index of the first column selected after them).
const COLUMN_COUNT: usize = 7;

impl Catalog {
    /// Records a new session (offset 0 unless `rec` says otherwise).
    pub async fn create_upload(&self, rec: UploadRecord) -> Result<()> {
        self.write(move |c| {
            let t = now();
            c.execute(
                "INSERT INTO uploads (id, repo, algorithm, \"offset\", hash_state, staging, created_at, updated_at, owner)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8)",
                params![
                    key(rec.id),
                    rec.repo,
                    rec.algorithm,
                    rec.offset as i64,
                    rec.hash_state,
                    rec.staging,
                    t,
                    rec.owner
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Moves a session's durable progress forward. A checkpoint older than the one recorded, or
    /// for a session that is gone, changes nothing.
    pub async fn checkpoint_upload(&self, id: Uuid, cp: UploadCheckpoint) -> Result<()> {
        self.write(move |c| {
            c.execute(
                "UPDATE uploads SET \"offset\" = ?2, hash_state = ?3, staging = ?4, updated_at = ?5
                  WHERE id = ?1 AND \"offset\" <= ?2",
                params![key(id), cp.offset as i64, cp.hash_state, cp.staging, now()],
            )?;
            Ok(())
        })
        .await
    }

    /// Moves a session from checkpoint `from` to `to` if `from` is what is recorded; whether it
    /// did. With several replicas this is how a replica that lost the session's lock finds that
    /// another one moved the session on: its checkpoint changes nothing.
    pub async fn checkpoint_upload_from(&self, id: Uuid, from: UploadCheckpoint, to: UploadCheckpoint) -> Result<bool> {
        self.write(move |c| {
            let n = c.execute(
                "UPDATE uploads SET \"offset\" = ?5, hash_state = ?6, staging = ?7, updated_at = ?8
                  WHERE id = ?1 AND \"offset\" = ?2 AND hash_state = ?3 AND staging = ?4",
                params![
                    key(id),
                    from.offset as i64,
                    from.hash_state,
                    from.staging,
                    to.offset as i64,
                    to.hash_state,
                    to.staging,
                    now()
                ],
            )?;
            Ok(n > 0)
        })
        .await
    }

    /// Forgets session `id` if checkpoint `at` is what is recorded; whether it did.
    pub async fn delete_upload_at(&self, id: Uuid, at: UploadCheckpoint) -> Result<bool> {
        self.write(move |c| {
            let n = c.execute(
                "DELETE FROM uploads WHERE id = ?1 AND \"offset\" = ?2 AND hash_state = ?3 AND staging = ?4",
                params![key(id), at.offset as i64, at.hash_state, at.staging],
            )?;
            Ok(n > 0)
        })
        .await
    }

    /// The session `id`, if it is recorded.
    pub async fn upload(&self, id: Uuid) -> Result<Option<UploadRecord>> {
        self.read(move |c| {
            Ok(c.query_row(
                &format!("SELECT {COLUMNS} FROM uploads WHERE id = ?1"),
                [key(id)],
                record,
            )
            .optional()?)
        })
        .await
    }

    /// How many sessions are recorded, in all and opened by `owner` (with several replicas the
    /// catalog is the only place that sees every session).
    pub async fn count_uploads(&self, owner: Option<&str>) -> Result<(u64, u64)> {
        let owner = owner.map(str::to_owned);
        self.read(move |c| {
            let (all, mine): (i64, i64) = c.query_row(
                "SELECT count(*), count(CASE WHEN owner = ?1 THEN 1 END) FROM uploads",
                [&owner],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            Ok((u64::try_from(all).unwrap_or(0), u64::try_from(mine).unwrap_or(0)))
        })
        .await
    }

    /// Ids of every recorded session.
    pub async fn upload_ids(&self) -> Result<Vec<Uuid>> {
        self.read(|c| {
            let mut stmt = c.prepare("SELECT id FROM uploads")?;
            let ids = stmt
                .query_map([], |r| r.get::<_, String>(0))?
                .filter_map(|r| r.ok().and_then(|s| Uuid::try_parse(&s).ok()))
                .collect();
            Ok(ids)
        })
        .await
    }

    /// Every recorded session with the time (unix seconds) it was last used, for the start-up
    /// check of what a previous process left.
    pub async fn uploads_with_last_use(&self) -> Result<Vec<(UploadRecord, i64)>> {
        self.read(|c| {
            let mut stmt = c.prepare(&format!("SELECT {COLUMNS}, updated_at FROM uploads"))?;
            let rows = stmt.query_map([], |r| Ok((record(r)?, r.get::<_, i64>(COLUMN_COUNT)?)))?;
            Ok(rows.collect::<db::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Sessions not used after `before` (unix seconds), oldest first, at most `limit`.
    pub async fn idle_uploads(&self, before: i64, limit: u32) -> Result<Vec<UploadRecord>> {
        self.read(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {COLUMNS} FROM uploads WHERE updated_at <= ?1 ORDER BY updated_at LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![before, limit], record)?;
            Ok(rows.collect::<db::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Marks a session as used now (expiry counts from its last use).
    pub async fn touch_upload(&self, id: Uuid) -> Result<()> {
        self.write(move |c| {
            c.execute(
                "UPDATE uploads SET updated_at = ?2 WHERE id = ?1",
                params![key(id), now()],
            )?;
            Ok(())
        })
        .await
    }

    /// Forgets session `id` if it was not used after `before` (unix seconds); whether it did.
    pub async fn delete_upload_if_idle(&self, id: Uuid, before: i64) -> Result<bool> {
        self.write(move |c| {
            let n = c.execute(
                "DELETE FROM uploads WHERE id = ?1 AND updated_at <= ?2",
                params![key(id), before],
            )?;
            Ok(n > 0)
        })
        .await
    }

    /// Forgets a session (finished elsewhere, cancelled or expired).
    pub async fn delete_upload(&self, id: Uuid) -> Result<()> {
        self.write(move |c| {
            c.execute("DELETE FROM uploads WHERE id = ?1", [key(id)])?;
            Ok(())
        })
        .await
    }

    /// Links a verified, published blob into `repo` and, in the same transaction, forgets the
    /// session that uploaded it (if any).
    pub async fn link_uploaded_blob(&self, repo: &RepoName, digest: &Digest, size: u64, id: Uuid) -> Result<()> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.write(move |c| {
            let repo_id = ensure_repo(c, &repo)?;
            link_published(c, repo_id, &digest, size)?;
            c.execute("DELETE FROM uploads WHERE id = ?1", [key(id)])?;
            Ok(())
        })
        .await
    }
}
