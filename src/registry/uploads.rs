//! Blob uploads: sessions (POST, PATCH, PUT, GET status, DELETE), single-request uploads and
//! cross-repository mounts.
//!
//! Life cycle of a session: POST opens it and starts staging ([`StagedWriter`]); each PATCH
//! appends at the session's offset (a `Content-Range` that does not start there is refused with
//! 416 and changes nothing); the closing PUT appends its body, completes the staged object,
//! verifies the digest the client names, publishes the blob and links it into the repository.
//! Every failure path after staging began discards what was staged.
//!
//! Sessions survive a restart: each is recorded in the catalog when it opens and checkpointed
//! (durable offset, hash state, staging state) at the end of every PATCH and every
//! `CHECKPOINT_BYTES` within a long one. A session unknown to this process but recorded in the
//! catalog is resumed from its checkpoint on first use, so after a restart a client's status
//! request reports the durable offset and the client continues from there. Bytes received
//! after the last checkpoint are lost in a crash: the reported offset can go back, never beyond
//! what is stored. Sessions expire after `registry.upload_timeout` without use, in memory and,
//! across restarts, by the catalog's `updated_at`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use uuid::Uuid;

use super::Registry;
use crate::catalog::{UploadCheckpoint, UploadRecord};
use crate::error::{Error, Internal, Result};
use crate::oci::{Algorithm, Digest, RepoName};
use crate::storage::{Checkpoint, StagedWriter};

/// One upload session.
struct Session {
    repo: RepoName,
    state: tokio::sync::Mutex<SessionState>,
    last_used: Mutex<Instant>,
}

struct SessionState {
    /// `None` once the session was finished or cancelled by a concurrent request.
    writer: Option<StagedWriter>,
}

/// The upload sessions in progress.
#[derive(Default)]
pub struct Uploads {
    sessions: Mutex<HashMap<Uuid, std::sync::Arc<Session>>>,
    /// Held while a session is resumed from the catalog, so it is resumed once.
    resuming: tokio::sync::Mutex<()>,
}

impl Uploads {
    /// The live session `id` of `repo`: `Ok(None)` if this process does not hold it.
    fn live(&self, repo: &RepoName, id: Uuid) -> Result<Option<std::sync::Arc<Session>>> {
        let sessions = self
            .sessions
            .lock()
            .map_err(|_| Internal::Other("upload table poisoned"))?;
        let Some(session) = sessions.get(&id).cloned() else {
            return Ok(None);
        };
        if &session.repo != repo {
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

    fn insert(&self, id: Uuid, session: Session) -> Result<()> {
        self.sessions
            .lock()
            .map_err(|_| Internal::Other("upload table poisoned"))?
            .insert(id, std::sync::Arc::new(session));
        Ok(())
    }

    fn remove(&self, id: Uuid) {
        if let Ok(mut s) = self.sessions.lock() {
            s.remove(&id);
        }
    }

    /// Removes and returns sessions idle for longer than `timeout` that no request is using.
    pub(super) fn take_expired(&self, timeout: Duration) -> Vec<(Uuid, Option<StagedWriter>)> {
        let Ok(mut sessions) = self.sessions.lock() else {
            return Vec::new();
        };
        let expired: Vec<Uuid> = sessions
            .iter()
            .filter(|(_, s)| s.last_used.lock().map(|t| t.elapsed() > timeout).unwrap_or(false))
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        for id in expired {
            let Some(session) = sessions.get(&id).cloned() else {
                continue;
            };
            // A session a request is using right now is not idle, whatever its clock says.
            let writer = match session.state.try_lock() {
                Ok(mut state) => state.writer.take(),
                Err(_) => continue,
            };
            sessions.remove(&id);
            out.push((id, writer));
        }
        out
    }

    /// Number of sessions in progress.
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

impl Registry {
    /// Streams a request body into a writer. With a session `id`, records a checkpoint each
    /// time enough has been written since the last one.
    async fn pump<S>(&self, writer: &mut StagedWriter, session: Option<Uuid>, mut body: S) -> Result<u64>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Error::BodyRead(e.to_string()))?;
            n += chunk.len() as u64;
            writer.write(chunk).await?;
            if let Some(id) = session
                && writer.checkpoint_due()
            {
                let cp = writer.checkpoint(false).await?;
                self.catalog.checkpoint_upload(id, to_catalog(cp)).await?;
            }
        }
        Ok(n)
    }

    /// Opens an upload session.
    pub async fn start_upload(&self, repo: &RepoName) -> Result<Uuid> {
        let id = Uuid::new_v4();
        let algorithm = Algorithm::Sha256;
        let writer = self.store.start_upload(id, algorithm).await?;
        let cp = writer.start_checkpoint();
        let record = UploadRecord {
            id,
            repo: repo.to_string(),
            algorithm: algorithm.as_str().to_string(),
            offset: cp.offset,
            hash_state: cp.hash_state,
            staging: cp.staging,
        };
        if let Err(e) = self.catalog.create_upload(record).await {
            writer.abort().await;
            return Err(e);
        }
        let session = Session {
            repo: repo.clone(),
            state: tokio::sync::Mutex::new(SessionState { writer: Some(writer) }),
            last_used: Mutex::new(Instant::now()),
        };
        self.uploads.insert(id, session)?;
        tracing::debug!(repo = %repo, upload = %id, "upload started");
        Ok(id)
    }

    /// The session `id` of `repo`, resumed from its catalog record if this process does not
    /// hold it yet (it was opened before a restart).
    async fn session(&self, repo: &RepoName, id: Uuid) -> Result<std::sync::Arc<Session>> {
        if let Some(s) = self.uploads.live(repo, id)? {
            return Ok(s);
        }
        let _guard = self.uploads.resuming.lock().await;
        if let Some(s) = self.uploads.live(repo, id)? {
            return Ok(s);
        }
        let record = self.catalog.upload(id).await?.ok_or(Error::UploadUnknown)?;
        if record.repo != repo.as_str() {
            return Err(Error::UploadUnknown);
        }
        let algorithm = match record.algorithm.as_str() {
            "sha512" => Algorithm::Sha512,
            _ => Algorithm::Sha256,
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
        tracing::info!(repo = %repo, upload = %id, offset = cp.offset, "upload session resumed");
        let session = Session {
            repo: repo.clone(),
            state: tokio::sync::Mutex::new(SessionState { writer: Some(writer) }),
            last_used: Mutex::new(Instant::now()),
        };
        self.uploads.insert(id, session)?;
        self.uploads.live(repo, id)?.ok_or(Error::UploadUnknown)
    }

    /// A whole blob in one request (`POST ?digest=`).
    pub async fn upload_whole<S>(&self, repo: &RepoName, digest: &Digest, body: S) -> Result<()>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        let id = Uuid::new_v4();
        let mut writer = self.store.start_upload(id, digest.algorithm()).await?;
        if let Err(e) = self.pump(&mut writer, None, body).await {
            writer.abort().await;
            return Err(e);
        }
        self.commit(repo, id, writer, digest).await
    }

    /// Links an existing blob into `repo` without uploading it. `Ok(false)` when it cannot be
    /// mounted (unknown in the source), in which case the caller opens a session instead.
    pub async fn mount_blob(&self, repo: &RepoName, digest: &Digest, from: Option<&RepoName>) -> Result<bool> {
        let mounted = self.catalog.mount_blob(repo, digest, from).await?;
        if mounted.is_some() {
            tracing::info!(repo = %repo, digest = %digest, from = from.map(|f| f.as_str()), "blob mounted");
        }
        Ok(mounted.is_some())
    }

    /// Bytes received so far by a session.
    pub async fn upload_offset(&self, repo: &RepoName, id: Uuid) -> Result<u64> {
        let session = self.session(repo, id).await?;
        let state = session.state.lock().await;
        state.writer.as_ref().map(StagedWriter::len).ok_or(Error::UploadUnknown)
    }

    /// Appends a chunk (`PATCH`) and returns the new offset. `location` is used in a 416 answer.
    pub async fn upload_chunk<S>(&self, repo: &RepoName, id: Uuid, chunk: Chunk<S>) -> Result<u64>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        let session = self.session(repo, id).await?;
        let mut state = session.state.lock().await;
        let writer = state.writer.as_mut().ok_or(Error::UploadUnknown)?;
        let offset = writer.len();
        if !check_chunk(offset, chunk.range, chunk.content_length) {
            return Err(Error::UploadOutOfOrder {
                repo: repo.clone(),
                id,
                offset,
            });
        }
        let received = self.pump(writer, Some(id), chunk.body).await;
        match (received, chunk.range) {
            (Ok(n), Some(r)) if Some(n) != r.byte_count() => {
                // The body did not match its declared range: the staged data no longer
                // matches what the client believes, so the session cannot continue.
                self.drop_session(id, state.writer.take()).await;
                Err(Error::SizeInvalid)
            }
            (Ok(_), _) => {
                let cp = writer.checkpoint(true).await?;
                self.catalog.checkpoint_upload(id, to_catalog(cp)).await?;
                Ok(writer_len(&state))
            }
            (Err(e), _) => Err(e),
        }
    }

    /// Closes a session (`PUT ?digest=`), optionally with a last chunk, and publishes the blob.
    pub async fn finish_upload<S>(&self, repo: &RepoName, id: Uuid, digest: &Digest, chunk: Chunk<S>) -> Result<()>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        let session = self.session(repo, id).await?;
        let mut state = session.state.lock().await;
        let writer = state.writer.as_mut().ok_or(Error::UploadUnknown)?;
        if !check_chunk(writer.len(), chunk.range, chunk.content_length) {
            return Err(Error::UploadOutOfOrder {
                repo: repo.clone(),
                id,
                offset: writer.len(),
            });
        }
        let before = writer.len();
        if let Err(e) = self.pump(writer, None, chunk.body).await {
            self.drop_session(id, state.writer.take()).await;
            return Err(e);
        }
        if let Some(r) = chunk.range
            && Some(writer.len() - before) != r.byte_count()
        {
            self.drop_session(id, state.writer.take()).await;
            return Err(Error::SizeInvalid);
        }
        let writer = state.writer.take().ok_or(Error::UploadUnknown)?;
        self.uploads.remove(id);
        self.commit(repo, id, writer, digest).await
    }

    /// Cancels a session and deletes its data.
    pub async fn cancel_upload(&self, repo: &RepoName, id: Uuid) -> Result<()> {
        let session = self.session(repo, id).await?;
        let mut state = session.state.lock().await;
        let writer = state.writer.take().ok_or(Error::UploadUnknown)?;
        self.drop_session(id, Some(writer)).await;
        tracing::debug!(repo = %repo, upload = %id, "upload cancelled");
        Ok(())
    }

    async fn drop_session(&self, id: Uuid, writer: Option<StagedWriter>) {
        self.uploads.remove(id);
        if let Some(w) = writer {
            w.abort().await;
        }
        self.forget_session(id, None).await;
    }

    /// Removes a session's staged data and its catalog record. `staging` is the recorded
    /// staging state, for a session this process holds no writer for.
    pub(super) async fn forget_session(&self, id: Uuid, staging: Option<&str>) {
        if let Err(e) = self.store.discard(id, staging).await {
            tracing::warn!(upload = %id, error = %e, "discarding upload data failed");
        }
        if let Err(e) = self.catalog.delete_upload(id).await {
            tracing::warn!(upload = %id, error = %e, "forgetting an upload session failed");
        }
    }

    /// Completes staging, verifies the digest, publishes and links the blob; on any failure the
    /// staged data is removed.
    async fn commit(&self, repo: &RepoName, id: Uuid, writer: StagedWriter, expected: &Digest) -> Result<()> {
        self.commit_as(repo, id, writer, Some(expected)).await.map(|_| ())
    }

    /// Completes a staged upload and publishes it as a blob of `repo`: under `expected`, which
    /// the data must match, or (`None`) under whatever SHA-256 digest the data has. Returns
    /// the digest and size.
    pub(super) async fn commit_as(
        &self,
        repo: &RepoName,
        id: Uuid,
        writer: StagedWriter,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64)> {
        let started = Instant::now();
        // `finish` aborts (removes the staged data) itself when it fails.
        let (mut actual, size) = writer.finish().await?;
        let result = async {
            if let Some(expected) = expected {
                if actual.algorithm() != expected.algorithm() {
                    actual = self.store.rehash_upload(id, expected.algorithm()).await?;
                }
                if &actual != expected {
                    return Err(Error::DigestMismatch {
                        expected: expected.clone(),
                        actual: actual.clone(),
                    });
                }
            }
            // Garbage collection must not delete the object between the publish finding it
            // already stored and the link that makes it reachable again.
            let _publishing = self.blob_locks.lock(&actual.to_string()).await;
            self.store.publish(id, &actual, size).await?;
            self.catalog.link_uploaded_blob(repo, &actual, size, id).await
        }
        .await;
        if result.is_err() {
            self.forget_session(id, None).await;
        } else {
            tracing::info!(
                repo = %repo, digest = %actual, bytes = size,
                duration_ms = started.elapsed().as_millis() as u64, "blob stored"
            );
        }
        result.map(|()| (actual, size))
    }
}

fn writer_len(state: &SessionState) -> u64 {
    state.writer.as_ref().map_or(0, StagedWriter::len)
}
