//! The tee: a blob being fetched from an upstream is served to the clients that asked for it
//! while it is fetched and stored, from a spool file that grows under the data directory.
//!
//! ```text
//! upstream ──▶ fetch task ──┬─▶ store_whole (staged → verified → published → linked)
//!                           └─▶ <data_dir>/proxy-spool/<uuid>   length ──▶ watch<Progress>
//!                                     ▲   ▲   ▲
//!                         client readers, each from its own file handle, 64 KiB at a time
//! ```
//!
//! Invariants:
//! - Memory does not grow with the number or slowness of the clients: the fetch task writes
//!   each piece to the spool once, and every reader reads the file at its own pace in chunks
//!   of at most [`READ_CHUNK`] bytes; nothing is queued per client.
//! - A response never ends cleanly before the blob is verified: a reader holds back the last
//!   byte of what it serves until the fetch reports [`Progress::Verified`] (the blob is then
//!   published). If the fetch fails (digest mismatch, upstream cut, spool or store failure) or
//!   its task goes away, every reader's stream ends with an error, which aborts the client's
//!   connection instead of finishing a short or wrong body.
//! - The spool file is removed when the last [`Tee`] handle goes, that is when the fetch and
//!   every reader are done; files left by a crash are swept at start-up
//!   ([`sweep_spool_dir`]). While a spool exists it holds the upstream request's permit, so
//!   at most `max_concurrent_requests` spools exist per upstream.
//! - Reads and writes use `tokio::fs`, that is the blocking pool, never an executor thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, watch};

/// Largest piece a reader reads from the spool at once.
pub(super) const READ_CHUNK: usize = 64 * 1024;

/// How far the fetch has got, as readers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Progress {
    /// This many bytes are in the spool file (and readable there).
    Writing(u64),
    /// Every byte is in the spool and the blob was verified and published.
    Verified,
    /// The fetch failed; nothing was published.
    Failed,
}

/// A spool file and the progress of the fetch writing it. Shared by the fetch task and every
/// reader; the file is removed when the last handle is dropped.
pub(super) struct Tee {
    path: PathBuf,
    /// The blob's size, as the upstream announced it.
    size: u64,
    progress: watch::Receiver<Progress>,
    /// The upstream request's permit, held while the spool exists.
    _permit: Arc<OwnedSemaphorePermit>,
}

impl Drop for Tee {
    fn drop(&mut self) {
        let path = std::mem::take(&mut self.path);
        let remove = move || {
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "removing a proxy spool file failed");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(remove);
            }
            Err(_) => remove(),
        }
    }
}

/// The fetch task's side: appends to the spool and reports progress.
pub(super) struct TeeWriter {
    file: tokio::fs::File,
    written: u64,
    size: u64,
    progress: watch::Sender<Progress>,
}

/// Removes everything in the spool directory (left by a previous process) and creates it.
pub async fn sweep_spool_dir(dir: &Path) -> std::io::Result<usize> {
    let dir = dir.to_owned();
    crate::metrics::spawn_blocking(move || {
        let mut removed = 0;
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry?;
                    std::fs::remove_file(entry.path())?;
                    removed += 1;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(&dir)?;
        Ok(removed)
    })
    .await
    .map_err(std::io::Error::other)?
}

impl Tee {
    /// Creates an empty spool file in `dir` for a blob of `size` bytes.
    pub(super) async fn create(
        dir: &Path,
        size: u64,
        permit: Arc<OwnedSemaphorePermit>,
    ) -> std::io::Result<(Arc<Tee>, TeeWriter)> {
        tokio::fs::create_dir_all(dir).await?;
        let path = dir.join(uuid::Uuid::new_v4().to_string());
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await?;
        let (tx, rx) = watch::channel(Progress::Writing(0));
        let tee = Arc::new(Tee {
            path,
            size,
            progress: rx,
            _permit: permit,
        });
        Ok((
            tee,
            TeeWriter {
                file,
                written: 0,
                size,
                progress: tx,
            },
        ))
    }

    pub(super) fn size(&self) -> u64 {
        self.size
    }

    /// The bytes `start..end` of the blob as they arrive; the stream ends only after the blob
    /// was verified, and with an error if the fetch fails.
    pub(super) async fn reader(
        self: &Arc<Self>,
        start: u64,
        end: u64,
    ) -> std::io::Result<impl Stream<Item = std::io::Result<Bytes>> + Send + 'static> {
        let mut file = tokio::fs::File::open(&self.path).await?;
        if start > 0 {
            file.seek(std::io::SeekFrom::Start(start)).await?;
        }
        let reader = Reader {
            tee: self.clone(),
            progress: self.progress.clone(),
            file,
            pos: start,
            end,
            done: false,
        };
        Ok(futures_util::stream::unfold(reader, |mut r| async move {
            if r.done {
                return None;
            }
            match r.next_piece().await {
                Ok(Some(piece)) => Some((Ok(piece), r)),
                Ok(None) => None,
                Err(e) => {
                    r.done = true;
                    Some((Err(e), r))
                }
            }
        }))
    }
}

struct Reader {
    /// Keeps the spool file (and its permit) while this reader lives.
    tee: Arc<Tee>,
    progress: watch::Receiver<Progress>,
    file: tokio::fs::File,
    pos: u64,
    end: u64,
    done: bool,
}

impl Reader {
    /// The next piece, `None` at the end (only once verified).
    async fn next_piece(&mut self) -> std::io::Result<Option<Bytes>> {
        loop {
            let progress = *self.progress.borrow_and_update();
            let readable = match progress {
                // The last byte of the response waits for the verification.
                Progress::Writing(n) => n.min(self.end.saturating_sub(1)),
                Progress::Verified => self.end,
                Progress::Failed => return Err(fetch_failed()),
            };
            if self.pos < readable {
                let want = usize::try_from(readable - self.pos)
                    .unwrap_or(READ_CHUNK)
                    .min(READ_CHUNK);
                let mut buf = BytesMut::zeroed(want);
                let n = self.file.read(&mut buf).await?;
                if n == 0 {
                    return Err(std::io::Error::other(format!(
                        "the proxy spool file {} ended early",
                        self.tee.path.display()
                    )));
                }
                buf.truncate(n);
                self.pos += n as u64;
                return Ok(Some(buf.freeze()));
            }
            if self.pos >= self.end && progress == Progress::Verified {
                return Ok(None);
            }
            if self.progress.changed().await.is_err() {
                // The fetch task went away without saying how it ended.
                return Err(fetch_failed());
            }
        }
    }
}

fn fetch_failed() -> std::io::Error {
    std::io::Error::other("fetching the blob from the upstream failed; the response is cut short")
}

/// A spool write failed (disk full, I/O error): the fetch fails, as a local failure.
#[derive(Debug)]
pub(super) struct SpoolError(pub std::io::Error);

impl TeeWriter {
    /// Appends a piece and makes it visible to readers.
    async fn append(&mut self, piece: &[u8]) -> std::io::Result<()> {
        self.file.write_all(piece).await?;
        // Waits until the bytes are in the file, so readers' own handles see them.
        self.file.flush().await?;
        self.written += piece.len() as u64;
        self.progress.send_replace(Progress::Writing(self.written));
        Ok(())
    }

    /// The verified blob was published: readers may finish.
    pub(super) fn verified(self) {
        self.progress.send_replace(Progress::Verified);
    }

    /// The fetch failed: readers end with an error.
    pub(super) fn failed(self) {
        self.progress.send_replace(Progress::Failed);
    }

    /// `body` passed through, every piece appended to the spool first; a length other than
    /// the announced one is an error at the end. The writer comes back through `done` when the
    /// stream is dropped or ends, with the spool's failure if there was one.
    pub(super) fn wrap<S>(
        self,
        body: S,
        done: tokio::sync::oneshot::Sender<(TeeWriter, Option<SpoolError>)>,
    ) -> impl Stream<Item = std::io::Result<Bytes>> + Send + Unpin + 'static
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + Unpin + 'static,
    {
        struct State<S> {
            body: S,
            writer: Option<TeeWriter>,
            spool_error: Option<SpoolError>,
            ended: bool,
            done: Option<tokio::sync::oneshot::Sender<(TeeWriter, Option<SpoolError>)>>,
        }
        impl<S> Drop for State<S> {
            fn drop(&mut self) {
                if let (Some(w), Some(tx)) = (self.writer.take(), self.done.take()) {
                    let _ = tx.send((w, self.spool_error.take()));
                }
            }
        }
        let state = State {
            body,
            writer: Some(self),
            spool_error: None,
            ended: false,
            done: Some(done),
        };
        Box::pin(futures_util::stream::unfold(state, |mut st| async move {
            if st.ended {
                return None;
            }
            let writer = st.writer.as_mut()?;
            let outcome = match st.body.next().await {
                Some(Ok(piece)) if writer.written + piece.len() as u64 > writer.size => Err(std::io::Error::other(
                    format!("the upstream sent more than the {} bytes it announced", writer.size),
                )),
                Some(Ok(piece)) => match writer.append(&piece).await {
                    Ok(()) => Ok(piece),
                    Err(e) => {
                        let told = std::io::Error::other(format!("writing the proxy spool file: {e}"));
                        st.spool_error = Some(SpoolError(e));
                        Err(told)
                    }
                },
                Some(Err(e)) => Err(e),
                None if writer.written != writer.size => Err(std::io::Error::other(format!(
                    "the upstream announced {} bytes and sent {}",
                    writer.size, writer.written
                ))),
                None => return None,
            };
            st.ended = outcome.is_err();
            Some((outcome, st))
        }))
    }
}
