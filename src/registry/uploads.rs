//! Blob uploads: sessions (POST, PATCH, PUT, GET status, DELETE), single-request uploads and
//! cross-repository mounts.
//!
//! Life cycle of a session: POST opens it and starts staging ([`StagedWriter`]); each PATCH
//! appends at the session's offset (a `Content-Range` that does not start there is refused with
//! 416 and changes nothing); the closing PUT appends its body, completes the staged object,
//! verifies the digest the client names, publishes the blob and links it into the repository.
//!
//! # Invariants
//!
//! These are what make a stored blob trustworthy; every path below keeps them.
//!
//! 1. **One owner at a time.** A session's writer lives behind its own lock. A request that
//!    changes the session (PATCH, PUT, DELETE) takes the lock, waiting at most [`BUSY_WAIT`] for
//!    a request already using it, and is refused with `BLOB_UPLOAD_INVALID` after that. A status
//!    request never takes it: while the session is busy it reports the offset stored at the end
//!    of the last request that succeeded ([`Session::offset`]).
//! 2. **An ended session stays ended.** Committing, cancelling, expiring or failing a session
//!    takes its writer out while holding the lock, so every later request sees it ended (404
//!    `BLOB_UPLOAD_UNKNOWN`). Its entry leaves the in-memory table only after its catalog row is
//!    gone, so no request can "resume" it from the catalog in between (a resumed session would
//!    truncate the staged data under the commit).
//! 3. **Any storage, sync or catalog failure ends the session.** The staged data is deleted and
//!    the client is told (`BLOB_UPLOAD_INVALID`, or 507 when the storage is full). There is no
//!    way to continue a session past bytes that may not be stored, so a hole can never be
//!    published. A client that goes away mid-request (the body fails) is the one exception:
//!    what it sent is either stored (written and synced) or dropped, the session continues at
//!    the stored offset, and no buffered part outlives the request unless the store cannot take
//!    a part that small (S3's 5 MiB minimum; such a tail is dropped when the request fails).
//! 4. **Only the identity that opened a session may use it** (the user name; with
//!    authentication off, anyone). Others are told it does not exist.
//! 5. **Bounded.** Sessions held at once are limited in total and per identity
//!    ([`SessionLimits`]); beyond that a POST gets 429 `TOOMANYREQUESTS` with `Retry-After`.
//!
//! The writer adds its own (see `storage::writer`): bytes are hashed as they are handed to the
//! store, the staged object's size is checked against the bytes hashed before it completes,
//! and publishing checks the published object's size again.
//!
//! Sessions survive a restart: each is recorded in the catalog when it opens and checkpointed
//! (durable offset, hash state, staging state) at the end of every PATCH and every
//! `CHECKPOINT_BYTES` within a long one. A session unknown to this process but recorded in the
//! catalog is resumed from its checkpoint on first use, so after a restart a client's status
//! request reports the durable offset and the client continues from there. Bytes received
//! after the last checkpoint are lost in a crash: the reported offset can go back, never beyond
//! what is stored. Sessions expire after `registry.upload_timeout` without use, in memory and,
//! across restarts, by the catalog's `updated_at`.
//!
//! # Shared sessions (several replicas)
//!
//! With a PostgreSQL catalog and blobs in an object store, several replicas serve one registry
//! and a load balancer may send each request of a session to a different one. Such sessions
//! are *shared* ([`Registry::shared_sessions`]); with SQLite, or blobs on local disk (which
//! allow one server), the above is all there is. A shared session keeps these, in place of
//! invariant 1's in-process exclusion alone:
//!
//! 6. **One replica at a time.** A request that changes the session holds, besides the session's
//!    in-process lock, the session's database lock (`catalog::locks::upload_key`), waiting for
//!    both within the same [`BUSY_WAIT`].
//! 7. **Between requests the catalog describes the session whole.** The end of every request
//!    that keeps the session moves the tail too small for a part into the session's tail object
//!    (`StagedWriter::spill`) and records that checkpoint, so the recorded offset is every byte
//!    the client was told is stored. A tail that cannot be stored ends the session (invariant
//!    3), as a failed part write does. A request whose body failed keeps what it received the
//!    same way.
//! 8. **A replica's copy is used only if it is current.** Under the database lock, a request
//!    reads the session's row: gone means the session ended elsewhere (404, and the copy here
//!    is dropped without touching the data); a row other than the checkpoint this replica last
//!    recorded means another replica moved the session on, and the writer is resumed from the
//!    row. A status request reads the row alone. Copies idle for [`SHARED_COPY_IDLE`] are
//!    dropped (the catalog has everything).
//! 9. **Expiry and clean-up go by the catalog and skip what is in use.** Sessions expire by
//!    their row's `updated_at` (every request's checkpoint moves it), only if their database
//!    lock is free, and the row goes first with a condition on `updated_at`, so a session used
//!    since it was listed is kept. At start-up a replica removes only staged objects older than
//!    `registry.upload_timeout`: younger ones may be another replica's uploads in progress.
//!    The session limits are counted in the catalog at `POST`; openings on several replicas at
//!    once may each take the last free place.
//! 10. **A closing `PUT` forgets the row before it consumes the staged data** (reads back and
//!     deletes the tail object, completes the multipart upload), so that a replica dying in the
//!     middle of a commit leaves a session that is unknown (404, the client starts again), not
//!     one whose data is half gone.
//! 11. **A replica records only over its own last checkpoint.** Every checkpoint of a shared
//!     session, the closing `PUT`'s delete of the row and the delete that ends a session are
//!     conditional on the row still holding the checkpoint this replica last recorded or read.
//!     If it does not, another replica moved the session on while this one believed it held
//!     the lock (its lock connection broke mid-request): the request is answered
//!     [`Error::UploadMoved`], the copy here is dropped without touching the staged data, and
//!     nothing this request wrote becomes part of the session. A session is ended (its staged
//!     data deleted) only after its row is gone; if the row cannot be deleted, the session goes
//!     on from it. A request that keeps a session leaves its copy equal to the row, or drops it.
//!
//! The cost over one process: a catalog read and two database lock statements per changing
//! request, one `PUT` of the tail object at the end of a request that leaves one (under the
//! object store's smallest part: 5 MiB), and one `GET` of it when the next request appends.
//! Two replicas could both write one session only if a lock connection broke mid-request
//! (`catalog::locks`). Invariant 11 keeps the later of the two from recording anything. The
//! earlier one's data may still have been overwritten: a multipart part then no longer matches
//! the part id (the ETag) recorded with it, and the object store refuses to complete the
//! upload; a tail object's bytes are hashed when they are read back, so overwritten ones fail
//! the closing `PUT`'s digest check. The session fails rather than publish bytes other than
//! those hashed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use uuid::Uuid;

use super::Registry;
use crate::catalog::locks::{LockGuard, LockService};
use crate::catalog::{UploadCheckpoint, UploadRecord};
use crate::error::{Error, Internal, Result};
use crate::oci::{Algorithm, Digest, RepoName};
use crate::storage::{Checkpoint, IDLE_RELEASE_AFTER, StagedWriter};

/// How long a request waits for another request on the same session to finish.
const BUSY_WAIT: Duration = Duration::from_secs(2);

/// How long a replica keeps its copy of a shared session after the copy's last request.
const SHARED_COPY_IDLE: Duration = Duration::from_secs(30);

/// `Retry-After` (seconds) when the session limit is reached.
const SESSIONS_RETRY_AFTER: u64 = 60;

/// How many upload sessions may be held at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// In total.
    pub total: usize,
    /// By one user (sessions opened without authentication count only in the total).
    pub per_identity: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            total: 4096,
            per_identity: 1024,
        }
    }
}

/// One upload session.
struct Session {
    repo: RepoName,
    /// The user who opened it (`None`: authentication was off, or anonymous).
    owner: Option<String>,
    state: tokio::sync::Mutex<SessionState>,
    /// Bytes the session held at the end of the last request that succeeded (what a status
    /// request reports while another request holds `state`).
    offset: AtomicU64,
    last_used: Mutex<Instant>,
    /// The checkpoint this process last recorded in (or read from) the catalog for the
    /// session. With shared sessions, a catalog row that differs from it means another replica
    /// moved the session on, and the writer here is stale.
    recorded: Mutex<Option<UploadCheckpoint>>,
}

struct SessionState {
    /// `None` once the session ended: committed, cancelled, expired or failed.
    writer: Option<StagedWriter>,
}

impl Session {
    fn new(repo: RepoName, owner: Option<String>, writer: Option<StagedWriter>) -> Session {
        let offset = writer.as_ref().map_or(0, StagedWriter::len);
        Session {
            repo,
            owner,
            state: tokio::sync::Mutex::new(SessionState { writer }),
            offset: AtomicU64::new(offset),
            last_used: Mutex::new(Instant::now()),
            recorded: Mutex::new(None),
        }
    }

    /// Notes the checkpoint recorded in the catalog for the session.
    fn recorded(&self, cp: &UploadCheckpoint) {
        self.offset.store(cp.offset, Ordering::Release);
        if let Ok(mut r) = self.recorded.lock() {
            *r = Some(cp.clone());
        }
    }

    /// The checkpoint this process last recorded (or read) for the session.
    fn last_recorded(&self) -> Option<UploadCheckpoint> {
        self.recorded.lock().ok().and_then(|r| r.clone())
    }

    /// Whether `cp` is the checkpoint this process last recorded.
    fn is_recorded(&self, cp: &UploadCheckpoint) -> bool {
        self.recorded.lock().is_ok_and(|r| r.as_ref() == Some(cp))
    }

    /// Whether `who` may use this session.
    fn usable_by(&self, who: Option<&str>) -> bool {
        match &self.owner {
            None => true,
            Some(owner) => who == Some(owner.as_str()),
        }
    }
}

/// A session taken by a request that changes it: its state and, with shared sessions, the
/// database lock of its id (released when the request is done with it).
struct Held<'a> {
    state: tokio::sync::MutexGuard<'a, SessionState>,
    _shared: Option<LockGuard>,
}

impl std::ops::Deref for Held<'_> {
    type Target = SessionState;
    fn deref(&self) -> &SessionState {
        &self.state
    }
}

impl std::ops::DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut SessionState {
        &mut self.state
    }
}

/// The hash algorithm a session record names.
fn algorithm_of(name: &str) -> Algorithm {
    match name {
        "sha512" => Algorithm::Sha512,
        _ => Algorithm::Sha256,
    }
}

/// Whether the recorded session may be used in `repo` by `who`.
fn usable(record: &UploadRecord, repo: &RepoName, who: Option<&str>) -> bool {
    record.repo == repo.as_str() && record.owner.as_deref().is_none_or(|owner| who == Some(owner))
}

pub(super) fn lock_key(id: Uuid) -> i64 {
    crate::catalog::locks::upload_key(&id.simple().to_string())
}

/// The upload sessions in progress.
pub struct Uploads {
    sessions: Mutex<HashMap<Uuid, Arc<Session>>>,
    /// Held while a session is resumed from the catalog, so it is resumed once.
    resuming: tokio::sync::Mutex<()>,
    limits: SessionLimits,
}

impl Default for Uploads {
    fn default() -> Self {
        Uploads::new(SessionLimits::default())
    }
}

impl Uploads {
    pub fn new(limits: SessionLimits) -> Self {
        Uploads {
            sessions: Mutex::new(HashMap::new()),
            resuming: tokio::sync::Mutex::new(()),
            limits,
        }
    }

    fn table(&self) -> Result<std::sync::MutexGuard<'_, HashMap<Uuid, Arc<Session>>>> {
        self.sessions
            .lock()
            .map_err(|_| Internal::Other("upload table poisoned").into())
    }

    /// The live session `id` of `repo` for `who`: `Ok(None)` if this process does not hold it.
    fn live(&self, repo: &RepoName, id: Uuid, who: Option<&str>) -> Result<Option<Arc<Session>>> {
        let Some(session) = self.table()?.get(&id).cloned() else {
            return Ok(None);
        };
        if &session.repo != repo || !session.usable_by(who) {
            return Err(Error::UploadUnknown);
        }
        if let Ok(mut t) = session.last_used.lock() {
            *t = Instant::now();
        }
        Ok(Some(session))
    }

    /// Whether this process holds session `id`.
    pub(super) fn holds(&self, id: Uuid) -> bool {
        self.sessions.lock().map(|s| s.contains_key(&id)).unwrap_or(false)
    }

    /// Adds a session whatever the limits (one counted when it was opened).
    fn insert(&self, id: Uuid, session: Session) -> Result<Arc<Session>> {
        let session = Arc::new(session);
        self.table()?.insert(id, Arc::clone(&session));
        Ok(session)
    }

    /// Adds a session if the limits allow it.
    fn admit(&self, id: Uuid, session: Session) -> Result<Arc<Session>> {
        let mut table = self.table()?;
        // Without an identity (authentication off) there is nobody to count separately.
        let mine = match &session.owner {
            Some(_) => table.values().filter(|s| s.owner == session.owner).count(),
            None => 0,
        };
        if table.len() >= self.limits.total || mine >= self.limits.per_identity {
            tracing::warn!(
                sessions = table.len(),
                of_identity = mine,
                identity = session.owner.as_deref().unwrap_or("-"),
                "upload session refused: limit reached"
            );
            return Err(Error::TooManyUploads {
                retry_after: SESSIONS_RETRY_AFTER,
            });
        }
        let session = Arc::new(session);
        table.insert(id, Arc::clone(&session));
        Ok(session)
    }

    /// Drops the copies of shared sessions idle here for at least `idle` that no request is
    /// using: the catalog describes them whole, and whichever replica the next request reaches
    /// resumes from it.
    fn drop_idle_copies(&self, idle: Duration) -> usize {
        let Ok(mut sessions) = self.sessions.lock() else {
            return 0;
        };
        let before = sessions.len();
        sessions.retain(|_, s| {
            let idle = s.last_used.lock().map(|t| t.elapsed() >= idle).unwrap_or(false);
            // A writer dropped here leaves its staged data alone (the session goes on).
            !(idle && s.state.try_lock().map(|mut st| st.writer.take()).is_ok())
        });
        before - sessions.len()
    }

    fn remove(&self, id: Uuid) {
        if let Ok(mut s) = self.sessions.lock() {
            s.remove(&id);
        }
    }

    /// Ends the sessions idle for longer than `timeout` that no request is using, returning
    /// their writers. They stay in the table (ended) until the caller forgets them.
    fn end_expired(&self, timeout: Duration) -> Vec<(Uuid, Option<StagedWriter>)> {
        let Ok(sessions) = self.sessions.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (id, session) in sessions.iter() {
            if !session.last_used.lock().map(|t| t.elapsed() > timeout).unwrap_or(false) {
                continue;
            }
            // A session a request is using right now is not idle, whatever its clock says.
            if let Ok(mut state) = session.state.try_lock() {
                out.push((*id, state.writer.take()));
            }
        }
        out
    }

    /// The sessions idle for at least `idle`.
    fn idle(&self, idle: Duration) -> Vec<(Uuid, Arc<Session>)> {
        let Ok(sessions) = self.sessions.lock() else {
            return Vec::new();
        };
        sessions
            .iter()
            .filter(|(_, s)| s.last_used.lock().map(|t| t.elapsed() >= idle).unwrap_or(false))
            .map(|(id, s)| (*id, Arc::clone(s)))
            .collect()
    }

    /// Number of sessions held (including ended ones whose catalog row is not gone yet).
    pub fn len(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A `Content-Range` of a chunk: inclusive byte offsets.
#[derive(Debug, Clone, Copy)]
pub struct ChunkRange {
    pub start: u64,
    pub end: u64,
}

/// A piece of an upload as a PATCH or closing PUT delivers it.
pub struct Chunk<S> {
    /// `Content-Range`, when the client sent one.
    pub range: Option<ChunkRange>,
    /// `Content-Length`, when the client sent one.
    pub content_length: Option<u64>,
    pub body: S,
}

impl ChunkRange {
    /// Bytes the range covers; `None` for a range that is backwards or too large to exist.
    pub fn byte_count(&self) -> Option<u64> {
        self.end.checked_sub(self.start)?.checked_add(1)
    }
}

/// Checks a chunk's declared range and length against the upload's offset.
fn check_chunk(offset: u64, range: Option<ChunkRange>, content_length: Option<u64>) -> bool {
    match range {
        None => true,
        Some(r) => r.start == offset && r.byte_count().is_some_and(|n| content_length.is_none_or(|l| l == n)),
    }
}

fn to_catalog(cp: Checkpoint) -> UploadCheckpoint {
    UploadCheckpoint {
        offset: cp.offset,
        hash_state: cp.hash_state,
        staging: cp.staging,
    }
}

/// How streaming a request body into a writer ended, when it did not succeed.
enum PumpError {
    /// The body could not be read (the client went away, or stalled): nothing is wrong with
    /// what was stored.
    Body(Error),
    /// Storing failed: the session cannot continue.
    Store(Error),
}

/// An error that ended an upload: storage and catalog failures are reported as such.
fn ended(e: Error) -> Error {
    match e {
        Error::Internal(inner) => Error::UploadFailed(inner),
        other => other,
    }
}

impl Registry {
    /// The database locks of upload sessions when sessions are shared by several replicas (a
    /// PostgreSQL catalog and blobs in an object store); `None` when one process owns them.
    pub(super) fn shared_sessions(&self) -> Option<&LockService> {
        if self.store.is_local() {
            return None;
        }
        self.catalog.locks()
    }

    /// The limits of [`SessionLimits`] counted over every replica's sessions, in the catalog.
    /// Concurrent openings on several replicas may each see the last free place.
    async fn admit_shared(&self, owner: Option<&str>) -> Result<()> {
        let (all, mine) = self.catalog.count_uploads(owner).await?;
        let limits = self.uploads.limits;
        if all >= limits.total as u64 || (owner.is_some() && mine >= limits.per_identity as u64) {
            tracing::warn!(
                sessions = all,
                of_identity = mine,
                identity = owner.unwrap_or("-"),
                "upload session refused: limit reached"
            );
            return Err(Error::TooManyUploads {
                retry_after: SESSIONS_RETRY_AFTER,
            });
        }
        Ok(())
    }

    /// Takes a session for a request that changes it: waits up to [`BUSY_WAIT`] for a request
    /// already using it (on any replica, when shared), then refuses. A shared session's writer
    /// is then brought up to what the catalog records ([`Registry::refresh`]).
    async fn take<'a>(&self, id: Uuid, session: &'a Session) -> Result<Held<'a>> {
        let deadline = tokio::time::Instant::now() + BUSY_WAIT;
        let state = tokio::time::timeout_at(deadline, session.state.lock())
            .await
            .map_err(|_| Error::UploadBusy)?;
        let Some(locks) = self.shared_sessions() else {
            if state.writer.is_none() {
                return Err(Error::UploadUnknown);
            }
            return Ok(Held { state, _shared: None });
        };
        let guard = tokio::time::timeout_at(deadline, locks.acquire(lock_key(id)))
            .await
            .map_err(|_| Error::UploadBusy)??;
        let mut held = Held {
            state,
            _shared: Some(guard),
        };
        self.refresh(id, session, &mut held).await?;
        Ok(held)
    }

    /// With the session's database lock held: keeps the writer here if the catalog records
    /// what this process last recorded, and otherwise (another replica moved the session on,
    /// or this copy was dropped) resumes from the catalog's record. A session whose record is
    /// gone was finished, cancelled or expired elsewhere, and is unknown.
    async fn refresh(&self, id: Uuid, session: &Session, state: &mut SessionState) -> Result<()> {
        let Some(record) = self.catalog.upload(id).await? else {
            // Its data went with the record; a writer dropped here leaves staged data alone.
            state.writer = None;
            self.uploads.remove(id);
            return Err(Error::UploadUnknown);
        };
        let recorded = UploadCheckpoint {
            offset: record.offset,
            hash_state: record.hash_state,
            staging: record.staging,
        };
        if state.writer.is_some() && session.is_recorded(&recorded) {
            return Ok(());
        }
        state.writer = None;
        let cp = Checkpoint {
            offset: recorded.offset,
            hash_state: recorded.hash_state.clone(),
            staging: recorded.staging.clone(),
        };
        match self
            .store
            .resume_upload(id, algorithm_of(&record.algorithm), &cp)
            .await?
        {
            Some(writer) => {
                tracing::debug!(upload = %id, offset = cp.offset, "upload session taken over from the catalog");
                state.writer = Some(writer);
                session.offset.store(recorded.offset, Ordering::Release);
                session.recorded(&recorded);
                Ok(())
            }
            None => {
                tracing::warn!(upload = %id, "an upload session's staged data is gone; forgetting it");
                self.forget_session(id, Some(&cp.staging)).await;
                self.uploads.remove(id);
                Err(Error::UploadUnknown)
            }
        }
    }

    /// Streams a request body into a writer. With a session, records a checkpoint each time
    /// enough has been written since the last one.
    async fn pump<S>(
        &self,
        writer: &mut StagedWriter,
        session: Option<(Uuid, &Session)>,
        mut body: S,
    ) -> std::result::Result<u64, PumpError>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        let mut n = 0u64;
        loop {
            // A body that goes idle while its upload holds memory for a partly filled part gives
            // that memory back once the budget wants it (local disk; see
            // `StagedWriter::release_idle`), so that stalled or dribbling clients do not hold the
            // budget active uploads need. `next` is cancel-safe: a timed-out wait loses nothing.
            let next = if writer.holds_partial_part() {
                loop {
                    match tokio::time::timeout(IDLE_RELEASE_AFTER, body.next()).await {
                        Ok(next) => break next,
                        Err(_) if writer.memory_wanted_back() => {
                            writer.release_idle().await.map_err(PumpError::Store)?;
                            break body.next().await;
                        }
                        // Still idle, memory not wanted: look again after another interval.
                        Err(_) => {}
                    }
                }
            } else {
                body.next().await
            };
            let Some(chunk) = next else {
                break;
            };
            let chunk = chunk.map_err(|e| PumpError::Body(Error::BodyRead(e.to_string())))?;
            n += chunk.len() as u64;
            writer.write(chunk).await.map_err(|e| match e {
                // The writer is intact: end this request, keep the session.
                e @ Error::UploadMemoryBusy { .. } => PumpError::Body(e),
                e => PumpError::Store(e),
            })?;
            if let Some((id, session)) = session
                && writer.checkpoint_due()
            {
                let cp = to_catalog(writer.checkpoint(false).await.map_err(PumpError::Store)?);
                self.record(id, session, cp).await.map_err(PumpError::Store)?;
                writer.drop_stale_tails().await;
            }
        }
        Ok(n)
    }

    /// Opens an upload session for `owner` (the user name, if any).
    pub async fn start_upload(&self, repo: &RepoName, owner: Option<&str>) -> Result<Uuid> {
        self.refuse_if_proxied(repo)?;
        if self.shared_sessions().is_some() {
            // Counted in the catalog, which sees every replica's sessions.
            self.admit_shared(owner).await?;
        }
        let id = Uuid::new_v4();
        // Admitted before anything is staged, so a refused session costs nothing.
        let fresh = Session::new(repo.clone(), owner.map(str::to_owned), None);
        let session = if self.shared_sessions().is_some() {
            self.uploads.insert(id, fresh)?
        } else {
            self.uploads.admit(id, fresh)?
        };
        let mut state = session.state.lock().await;
        let opened = async {
            let algorithm = Algorithm::Sha256;
            let writer = self.store.start_upload(id, algorithm).await?;
            let cp = writer.start_checkpoint();
            session.recorded(&to_catalog(cp.clone()));
            let record = UploadRecord {
                id,
                repo: repo.to_string(),
                owner: owner.map(str::to_owned),
                algorithm: algorithm.as_str().to_string(),
                offset: cp.offset,
                hash_state: cp.hash_state,
                staging: cp.staging,
            };
            if let Err(e) = self.catalog.create_upload(record).await {
                writer.abort().await;
                return Err(e);
            }
            Ok(writer)
        }
        .await;
        match opened {
            Ok(writer) => {
                state.writer = Some(writer);
                tracing::debug!(repo = %repo, upload = %id, "upload started");
                Ok(id)
            }
            Err(e) => {
                self.uploads.remove(id);
                Err(e)
            }
        }
    }

    /// The session `id` of `repo` for `who`, resumed from its catalog record if this process
    /// does not hold it yet (it was opened before a restart).
    async fn session(&self, repo: &RepoName, id: Uuid, who: Option<&str>) -> Result<Arc<Session>> {
        if let Some(s) = self.uploads.live(repo, id, who)? {
            return Ok(s);
        }
        let _guard = self.uploads.resuming.lock().await;
        if let Some(s) = self.uploads.live(repo, id, who)? {
            return Ok(s);
        }
        let record = self.catalog.upload(id).await?.ok_or(Error::UploadUnknown)?;
        if !usable(&record, repo, who) {
            return Err(Error::UploadUnknown);
        }
        let algorithm = algorithm_of(&record.algorithm);
        let recorded = UploadCheckpoint {
            offset: record.offset,
            hash_state: record.hash_state.clone(),
            staging: record.staging.clone(),
        };
        let cp = Checkpoint {
            offset: record.offset,
            hash_state: record.hash_state,
            staging: record.staging,
        };
        let Some(writer) = self.store.resume_upload(id, algorithm, &cp).await? else {
            tracing::warn!(upload = %id, "an upload session's staged data is gone; forgetting it");
            self.forget_session(id, Some(&cp.staging)).await;
            return Err(Error::UploadUnknown);
        };
        let fresh = Session::new(repo.clone(), record.owner, Some(writer));
        fresh.recorded(&recorded);
        let session = if self.shared_sessions().is_some() {
            // Counted against the limits when it was opened, on whichever replica.
            self.uploads.insert(id, fresh)?
        } else {
            self.uploads.admit(id, fresh)?
        };
        tracing::info!(repo = %repo, upload = %id, offset = cp.offset, "upload session resumed");
        Ok(session)
    }

    /// A whole blob in one request (`POST ?digest=`). Refused in a proxied repository.
    pub async fn upload_whole<S>(&self, repo: &RepoName, digest: &Digest, body: S) -> Result<()>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        self.refuse_if_proxied(repo)?;
        self.store_whole(repo, digest, body).await
    }

    /// Stages a whole blob, verifies it against `digest`, publishes and links it (the
    /// pull-through cache stores what it fetched through here).
    pub(super) async fn store_whole<S>(&self, repo: &RepoName, digest: &Digest, body: S) -> Result<()>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        let id = Uuid::new_v4();
        let mut writer = self.store.start_upload(id, digest.algorithm()).await?;
        if let Err(e) = self.pump(&mut writer, None, body).await {
            writer.abort().await;
            return Err(match e {
                PumpError::Body(e) => e,
                PumpError::Store(e) => ended(e),
            });
        }
        self.commit(repo, id, writer, digest).await
    }

    /// Links an existing blob into `repo` without uploading it. `Ok(false)` when it cannot be
    /// mounted (unknown in the source), in which case the caller opens a session instead.
    pub async fn mount_blob(&self, repo: &RepoName, digest: &Digest, from: Option<&RepoName>) -> Result<bool> {
        self.refuse_if_proxied(repo)?;
        let mounted = self.catalog.mount_blob(repo, digest, from).await?;
        if mounted.is_some() {
            tracing::info!(repo = %repo, digest = %digest, from = from.map(|f| f.as_str()), "blob mounted");
        }
        Ok(mounted.is_some())
    }

    /// Bytes a session holds. Never waits for another request on the session: while one is in
    /// progress, the bytes held at the end of the last one that succeeded.
    pub async fn upload_offset(&self, repo: &RepoName, id: Uuid, who: Option<&str>) -> Result<u64> {
        if self.shared_sessions().is_some() {
            // The catalog describes every shared session whole between requests, and a request
            // in progress (here or on another replica) up to its last checkpoint.
            return match self.catalog.upload(id).await? {
                Some(record) if usable(&record, repo, who) => Ok(record.offset),
                _ => Err(Error::UploadUnknown),
            };
        }
        let session = self.session(repo, id, who).await?;
        match session.state.try_lock() {
            Ok(state) => state.writer.as_ref().map(StagedWriter::len).ok_or(Error::UploadUnknown),
            Err(_) => Ok(session.offset.load(Ordering::Acquire)),
        }
    }

    /// Appends a chunk (`PATCH`) and returns the new offset.
    pub async fn upload_chunk<S>(&self, repo: &RepoName, id: Uuid, who: Option<&str>, chunk: Chunk<S>) -> Result<u64>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        let session = self.session(repo, id, who).await?;
        let mut state = self.take(id, &session).await?;
        let Some(writer) = state.writer.as_mut() else {
            return Err(Error::UploadUnknown);
        };
        let offset = writer.len();
        if !check_chunk(offset, chunk.range, chunk.content_length) {
            return Err(Error::UploadOutOfOrder {
                repo: repo.clone(),
                id,
                offset,
            });
        }
        let outcome = match self.pump(writer, Some((id, &session)), chunk.body).await {
            // The body did not match its declared range: the staged data no longer matches
            // what the client believes, so the session cannot continue.
            Ok(n) if chunk.range.is_some_and(|r| Some(n) != r.byte_count()) => {
                Err(PumpError::Store(Error::SizeInvalid))
            }
            Ok(_) => self.checkpoint(id, &session, writer).await.map_err(PumpError::Store),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(len) => {
                session.offset.store(len, Ordering::Release);
                Ok(len)
            }
            Err(PumpError::Body(e)) => {
                self.salvage(id, &session, &mut state).await;
                Err(e)
            }
            Err(PumpError::Store(e)) => Err(self.fail(id, &session, &mut state, e).await),
        }
    }

    /// Makes everything a request delivered durable and records it; returns the offset. A
    /// shared session's tail goes to its tail object too, so that the catalog describes the
    /// session whole for the next request, on whichever replica.
    async fn checkpoint(&self, id: Uuid, session: &Session, writer: &mut StagedWriter) -> Result<u64> {
        let mut cp = writer.checkpoint(true).await?;
        if self.shared_sessions().is_some()
            && let Some(spilled) = writer.spill().await?
        {
            cp = spilled;
        }
        self.record(id, session, to_catalog(cp)).await?;
        writer.drop_stale_tails().await;
        Ok(writer.len())
    }

    /// Records checkpoint `cp` of session `id`. A shared session's row moves only from the
    /// checkpoint this replica last recorded or read: a row that differs means another replica
    /// moved the session on while this one believed it held the session's lock (the lock
    /// connection broke), and the answer is [`Error::UploadMoved`], with the row left as it is.
    async fn record(&self, id: Uuid, session: &Session, cp: UploadCheckpoint) -> Result<()> {
        if self.shared_sessions().is_some() {
            let from = session.last_recorded().ok_or(Error::UploadMoved)?;
            if !self.catalog.checkpoint_upload_from(id, from, cp.clone()).await? {
                tracing::warn!(upload = %id, "an upload session moved on elsewhere while this replica wrote it; dropping this copy");
                return Err(Error::UploadMoved);
            }
        } else {
            self.catalog.checkpoint_upload(id, cp.clone()).await?;
        }
        session.recorded(&cp);
        Ok(())
    }

    /// Ends the request's use of session `id` after error `e` and returns what to answer. The
    /// session ends ([`Registry::end_session`]) unless another replica moved it on, in which
    /// case only this replica's copy goes: the data is that replica's now.
    async fn fail(&self, id: Uuid, session: &Session, state: &mut SessionState, e: Error) -> Error {
        if matches!(e, Error::UploadMoved) {
            state.writer = None;
            return e;
        }
        let _ = self.end_session(id, session, state.writer.take()).await;
        ended(e)
    }

    /// After a request whose body failed: keeps what was stored, drops what was only buffered,
    /// so the session holds no part in memory for a client that may never come back. Ends the
    /// session if even that fails.
    async fn salvage(&self, id: Uuid, session: &Session, state: &mut SessionState) {
        let Some(writer) = state.writer.as_mut() else {
            return;
        };
        let shared = self.shared_sessions().is_some();
        let kept = async {
            let mut cp = writer.checkpoint(true).await?;
            // A shared session keeps what was received (the next request may reach another
            // replica); otherwise it is dropped rather than held for a client that may not
            // come back.
            if shared && let Some(spilled) = writer.spill().await? {
                cp = spilled;
            }
            writer.discard_buffered();
            self.record(id, session, to_catalog(cp)).await?;
            writer.drop_stale_tails().await;
            Ok::<_, Error>(writer.len())
        }
        .await;
        match kept {
            Ok(len) => {
                session.offset.store(len, Ordering::Release);
                tracing::debug!(upload = %id, offset = len, "upload request interrupted; session kept");
            }
            Err(e) => {
                tracing::warn!(upload = %id, error = %e, "upload request interrupted and its data could not be kept");
                let _ = self.fail(id, session, state, e).await;
            }
        }
    }

    /// Closes a session (`PUT ?digest=`), optionally with a last chunk, and publishes the blob.
    pub async fn finish_upload<S>(
        &self,
        repo: &RepoName,
        id: Uuid,
        who: Option<&str>,
        digest: &Digest,
        chunk: Chunk<S>,
    ) -> Result<()>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        let session = self.session(repo, id, who).await?;
        let mut state = self.take(id, &session).await?;
        let Some(writer) = state.writer.as_mut() else {
            return Err(Error::UploadUnknown);
        };
        let before = writer.len();
        if !check_chunk(before, chunk.range, chunk.content_length) {
            return Err(Error::UploadOutOfOrder {
                repo: repo.clone(),
                id,
                offset: before,
            });
        }
        let pumped = match self.pump(writer, None, chunk.body).await {
            Ok(n) if chunk.range.is_some_and(|r| Some(n) != r.byte_count()) => {
                Err(PumpError::Store(Error::SizeInvalid))
            }
            other => other,
        };
        match pumped {
            Ok(_) => {}
            Err(PumpError::Body(e)) => {
                self.salvage(id, &session, &mut state).await;
                return Err(e);
            }
            Err(PumpError::Store(e)) => return Err(self.fail(id, &session, &mut state, e).await),
        }
        // A tail kept in its object (S3, an idle session) is read back now, while running out
        // of memory still leaves the session as it was.
        if let Some(writer) = state.writer.as_mut()
            && let Err(e) = writer.prepare_finish().await
        {
            if matches!(e, Error::UploadMemoryBusy { .. }) {
                if self.shared_sessions().is_some() {
                    // The copy holds this request's body, which the row does not: the next
                    // request resumes from the row (invariant 7).
                    state.writer = None;
                }
                return Err(e);
            }
            return Err(self.fail(id, &session, &mut state, e).await);
        }
        // A shared session's row goes before the commit consumes the staged data (the tail
        // object, the multipart upload): a replica taking over after this one dies mid-commit
        // then finds the session gone (404: the client starts again) instead of resuming data
        // that is no longer there. It goes only if it is still the checkpoint this replica
        // started from (invariant 11). Nothing is consumed yet if this fails, and the copy,
        // which holds this request's body, is dropped so that the session goes on from its row.
        if self.shared_sessions().is_some() {
            match self.forget_recorded(id, &session).await {
                Ok(true) => {}
                Ok(false) => {
                    state.writer = None;
                    return Err(Error::UploadMoved);
                }
                Err(e) => {
                    state.writer = None;
                    return Err(e);
                }
            }
        }
        // From here the session is ended for every other request (its writer is gone), and the
        // lock is held until the commit has either linked the blob (deleting the session's
        // catalog row in the same transaction) or forgotten the session.
        let writer = state.writer.take().ok_or(Error::UploadUnknown)?;
        let committed = self.publish_staged(repo, id, writer, Some(digest)).await;
        let row_gone = committed.is_ok() || self.forget_session(id, None).await;
        if row_gone {
            self.uploads.remove(id);
        }
        drop(state);
        committed.map(|_| ()).map_err(ended)
    }

    /// Cancels a session and deletes its data.
    pub async fn cancel_upload(&self, repo: &RepoName, id: Uuid, who: Option<&str>) -> Result<()> {
        let session = self.session(repo, id, who).await?;
        let mut state = self.take(id, &session).await?;
        let writer = state.writer.take();
        self.end_session(id, &session, writer).await?;
        tracing::debug!(repo = %repo, upload = %id, "upload cancelled");
        Ok(())
    }

    /// Ends a session whose writer the caller took out under the session's lock: deletes the
    /// staged data and the catalog row, then drops it from the table. If the row cannot be
    /// deleted, the ended session stays in the table (every request on it gets 404) and expiry
    /// tries again.
    ///
    /// A shared session's row goes first, and only if it is the checkpoint this replica last
    /// recorded; the data goes only after that (invariant 11). If the row is not deleted, the
    /// session goes on as its row describes, on any replica: `Err(UploadMoved)` when another
    /// replica moved it on, the catalog's error when the delete failed.
    async fn end_session(&self, id: Uuid, session: &Session, writer: Option<StagedWriter>) -> Result<()> {
        if self.shared_sessions().is_none() {
            self.end_local_session(id, writer).await;
            return Ok(());
        }
        match self.forget_recorded(id, session).await {
            Ok(true) => {
                self.uploads.remove(id);
                if let Some(w) = writer {
                    w.abort().await;
                }
                if let Err(e) = self.store.discard(id, None).await {
                    tracing::warn!(upload = %id, error = %e, "discarding upload data failed");
                }
                Ok(())
            }
            // The writer is dropped without touching the staged data, which the row describes.
            Ok(false) => Err(Error::UploadMoved),
            Err(e) => {
                tracing::warn!(upload = %id, error = %e, "ending an upload session failed; it goes on from its last checkpoint");
                Err(e)
            }
        }
    }

    /// Deletes shared session `id`'s row if it still holds the checkpoint this replica last
    /// recorded or read (invariant 11); whether it did.
    async fn forget_recorded(&self, id: Uuid, session: &Session) -> Result<bool> {
        match session.last_recorded() {
            Some(at) => self.catalog.delete_upload_at(id, at).await,
            None => Ok(false),
        }
    }

    /// [`Registry::end_session`] for a session one process owns.
    async fn end_local_session(&self, id: Uuid, writer: Option<StagedWriter>) {
        if let Some(w) = writer {
            w.abort().await;
        }
        if self.forget_session(id, None).await {
            self.uploads.remove(id);
        }
    }

    /// Removes a session's staged data and its catalog record. `staging` is the recorded
    /// staging state, for a session this process holds no writer for. Returns whether the
    /// catalog record is gone.
    pub(super) async fn forget_session(&self, id: Uuid, staging: Option<&str>) -> bool {
        if let Err(e) = self.store.discard(id, staging).await {
            tracing::warn!(upload = %id, error = %e, "discarding upload data failed");
        }
        match self.catalog.delete_upload(id).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(upload = %id, error = %e, "forgetting an upload session failed");
                false
            }
        }
    }

    /// Moves the bytes that sessions idle for at least `idle` hold in memory (a tail smaller
    /// than the store's smallest part, S3 only) into their tail objects and records the new
    /// checkpoint, so an abandoned session holds no memory and a restart keeps those bytes.
    /// A session a request is using is skipped. Returns how many sessions were spilled.
    pub async fn spill_idle_uploads(&self, idle: Duration) -> usize {
        // A shared session's tail is moved at the end of every request already.
        if self.shared_sessions().is_some() {
            return 0;
        }
        let mut spilled = 0;
        for (id, session) in self.uploads.idle(idle) {
            let Ok(mut state) = session.state.try_lock() else {
                continue;
            };
            let Some(writer) = state.writer.as_mut() else {
                continue;
            };
            match writer.spill().await {
                Ok(None) => {}
                Ok(Some(cp)) => {
                    // Without the record the tail object is ignored after a restart, and the
                    // bytes are read back from it as long as this process runs: nothing is lost.
                    let cp = to_catalog(cp);
                    match self.catalog.checkpoint_upload(id, cp.clone()).await {
                        Ok(()) => {
                            session.recorded(&cp);
                            writer.drop_stale_tails().await;
                        }
                        Err(e) => tracing::warn!(upload = %id, error = %e, "recording a spilled upload tail failed"),
                    }
                    spilled += 1;
                }
                Err(e) => tracing::warn!(upload = %id, error = %e, "moving an idle upload's tail out of memory failed"),
            }
        }
        spilled
    }

    /// Expires shared session `rec`, listed as idle since before `before` (unix seconds), unless
    /// a request on any replica is using it or used it since: its record goes first, then its
    /// data (data left by a failure there is the start-up sweep's and the bucket's lifecycle
    /// rules' to remove). Returns whether it did.
    pub(super) async fn expire_shared_upload(
        &self,
        locks: &LockService,
        rec: &UploadRecord,
        before: i64,
    ) -> Result<bool> {
        let Some(_lock) = locks.try_acquire(lock_key(rec.id)).await? else {
            return Ok(false);
        };
        if !self.catalog.delete_upload_if_idle(rec.id, before).await? {
            return Ok(false);
        }
        self.uploads.remove(rec.id);
        if let Err(e) = self.store.discard(rec.id, Some(&rec.staging)).await {
            tracing::warn!(upload = %rec.id, error = %e, "discarding an expired upload's data failed");
        }
        tracing::info!(upload = %rec.id, "expired an idle upload session");
        Ok(true)
    }

    /// Ends idle sessions (see `Registry::expire_uploads`).
    pub(super) async fn expire_held_uploads(&self) {
        if self.shared_sessions().is_some() {
            // Expiry goes by the catalog (`Registry::expire_uploads`), which every replica sees;
            // a copy idle here is only dropped.
            self.uploads.drop_idle_copies(SHARED_COPY_IDLE);
            return;
        }
        for (id, writer) in self.uploads.end_expired(self.settings.upload_timeout) {
            self.end_local_session(id, writer).await;
            tracing::info!(upload = %id, "expired an idle upload session");
        }
    }

    /// Completes staging, verifies the digest, publishes and links the blob; on any failure the
    /// staged data is removed.
    async fn commit(&self, repo: &RepoName, id: Uuid, writer: StagedWriter, expected: &Digest) -> Result<()> {
        self.commit_as(repo, id, writer, Some(expected)).await.map(|_| ())
    }

    /// Completes a staged upload and publishes it as a blob of `repo`: under `expected`, which
    /// the data must match, or (`None`) under whatever SHA-256 digest the data has. Returns
    /// the digest and size. On failure the staged data and the session's catalog row are gone.
    pub(super) async fn commit_as(
        &self,
        repo: &RepoName,
        id: Uuid,
        writer: StagedWriter,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64)> {
        let published = self.publish_staged(repo, id, writer, expected).await;
        if published.is_err() {
            self.forget_session(id, None).await;
        }
        published.map_err(ended)
    }

    /// [`Registry::commit_as`] without the clean-up of a failure: the caller forgets the
    /// session (staged data and catalog row) when this fails.
    async fn publish_staged(
        &self,
        repo: &RepoName,
        id: Uuid,
        writer: StagedWriter,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64)> {
        let started = Instant::now();
        // `finish` checks that the staged object holds exactly the bytes hashed.
        let (mut actual, size) = writer.finish().await?;
        if let Some(expected) = expected {
            if actual.algorithm() != expected.algorithm() {
                actual = self.store.rehash_upload(id, expected.algorithm()).await?;
            }
            if &actual != expected {
                return Err(Error::DigestMismatch {
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        // Garbage collection must not delete the object between the publish finding it
        // already stored and the link that makes it reachable again.
        let _publishing = self.blob_locks.lock(&actual.to_string()).await?;
        // Only an object the catalog records was verified when it was published: anything
        // else at the blob's key (left by a crash, or damaged) is replaced.
        let verified = self.catalog.recorded_blob_size(&actual).await? == Some(size);
        self.store.publish(id, &actual, size, verified).await?;
        self.catalog.link_uploaded_blob(repo, &actual, size, id).await?;
        tracing::info!(
            repo = %repo, digest = %actual, bytes = size,
            duration_ms = started.elapsed().as_millis() as u64, "blob stored"
        );
        Ok((actual, size))
    }
}
