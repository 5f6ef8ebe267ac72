//! Blob uploads: sessions (POST, PATCH, PUT, GET status, DELETE), single-request uploads and
//! cross-repository mounts.
//!
//! Life cycle of a session: POST opens it and starts staging ([`StagedWriter`]); each PATCH
//! appends at the session's offset (a `Content-Range` that does not start there is refused with
//! 416 and changes nothing); the closing PUT appends its body, completes the staged object,
//! verifies the digest the client names, publishes the blob and links it into the repository.
//! Every failure path after staging began discards what was staged. Sessions live in memory and
//! expire after `registry.upload_timeout` of inactivity.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use uuid::Uuid;

use super::Registry;
use crate::error::{Error, Internal, Result};
use crate::oci::{Algorithm, Digest, RepoName};
use crate::storage::StagedWriter;

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
}

impl Uploads {
    fn get(&self, repo: &RepoName, id: Uuid) -> Result<std::sync::Arc<Session>> {
        let sessions = self
            .sessions
            .lock()
            .map_err(|_| Internal::Other("upload table poisoned"))?;
        let session = sessions
            .get(&id)
            .filter(|s| &s.repo == repo)
            .cloned()
            .ok_or(Error::UploadUnknown)?;
        if let Ok(mut t) = session.last_used.lock() {
            *t = Instant::now();
        }
        Ok(session)
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

/// Streams a request body into a writer.
async fn pump<S>(writer: &mut StagedWriter, mut body: S) -> Result<u64>
where
    S: Stream<Item = std::io::Result<Bytes>> + Unpin,
{
    let mut n = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Error::BodyRead(e.to_string()))?;
        n += chunk.len() as u64;
        writer.write(chunk).await?;
    }
    Ok(n)
}

impl Registry {
    /// Opens an upload session.
    pub async fn start_upload(&self, repo: &RepoName) -> Result<Uuid> {
        let id = Uuid::new_v4();
        let writer = self.store.start_upload(id, Algorithm::Sha256).await?;
        let session = Session {
            repo: repo.clone(),
            state: tokio::sync::Mutex::new(SessionState { writer: Some(writer) }),
            last_used: Mutex::new(Instant::now()),
        };
        self.uploads.insert(id, session)?;
        tracing::debug!(repo = %repo, upload = %id, "upload started");
        Ok(id)
    }

    /// A whole blob in one request (`POST ?digest=`).
    pub async fn upload_whole<S>(&self, repo: &RepoName, digest: &Digest, body: S) -> Result<()>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        let id = Uuid::new_v4();
        let mut writer = self.store.start_upload(id, digest.algorithm()).await?;
        if let Err(e) = pump(&mut writer, body).await {
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
        let session = self.uploads.get(repo, id)?;
        let state = session.state.lock().await;
        state.writer.as_ref().map(StagedWriter::len).ok_or(Error::UploadUnknown)
    }

    /// Appends a chunk (`PATCH`) and returns the new offset. `location` is used in a 416 answer.
    pub async fn upload_chunk<S>(&self, repo: &RepoName, id: Uuid, chunk: Chunk<S>) -> Result<u64>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        let session = self.uploads.get(repo, id)?;
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
        let received = pump(writer, chunk.body).await;
        match (received, chunk.range) {
            (Ok(n), Some(r)) if Some(n) != r.byte_count() => {
                // The body did not match its declared range: the staged data no longer
                // matches what the client believes, so the session cannot continue.
                self.drop_session(id, state.writer.take()).await;
                Err(Error::SizeInvalid)
            }
            (Ok(_), _) => Ok(writer_len(&state)),
            (Err(e), _) => Err(e),
        }
    }

    /// Closes a session (`PUT ?digest=`), optionally with a last chunk, and publishes the blob.
    pub async fn finish_upload<S>(&self, repo: &RepoName, id: Uuid, digest: &Digest, chunk: Chunk<S>) -> Result<()>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        let session = self.uploads.get(repo, id)?;
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
        if let Err(e) = pump(writer, chunk.body).await {
            self.drop_session(id, state.writer.take()).await;
            return Err(e);
        }
        if let Some(r) = chunk.range {
            if Some(writer.len() - before) != r.byte_count() {
                self.drop_session(id, state.writer.take()).await;
                return Err(Error::SizeInvalid);
            }
        }
        let writer = state.writer.take().ok_or(Error::UploadUnknown)?;
        self.uploads.remove(id);
        self.commit(repo, id, writer, digest).await
    }

    /// Cancels a session and deletes its data.
    pub async fn cancel_upload(&self, repo: &RepoName, id: Uuid) -> Result<()> {
        let session = self.uploads.get(repo, id)?;
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
        if let Err(e) = self.store.discard(id).await {
            tracing::warn!(upload = %id, error = %e, "discarding upload data failed");
        }
    }

    /// Completes staging, verifies the digest, publishes and links the blob; on any failure the
    /// staged data is removed.
    async fn commit(&self, repo: &RepoName, id: Uuid, writer: StagedWriter, expected: &Digest) -> Result<()> {
        let started = Instant::now();
        // `finish` aborts (removes the staged data) itself when it fails.
        let (mut actual, size) = writer.finish().await?;
        let result = async {
            if actual.algorithm() != expected.algorithm() {
                actual = self.store.rehash_upload(id, expected.algorithm()).await?;
            }
            if &actual != expected {
                return Err(Error::DigestMismatch {
                    expected: expected.clone(),
                    actual: actual.clone(),
                });
            }
            self.store.publish(id, expected).await?;
            self.catalog.link_blob(repo, expected, size).await
        }
        .await;
        if result.is_err() {
            if let Err(e) = self.store.discard(id).await {
                tracing::warn!(upload = %id, error = %e, "discarding upload data failed");
            }
        } else {
            tracing::info!(
                repo = %repo, digest = %expected, bytes = size,
                duration_ms = started.elapsed().as_millis() as u64, "blob stored"
            );
        }
        result
    }
}

fn writer_len(state: &SessionState) -> u64 {
    state.writer.as_ref().map_or(0, StagedWriter::len)
}
