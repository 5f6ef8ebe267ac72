//! The tee: a blob being fetched from an upstream is served to the clients that asked for it
//! while it is fetched and stored, from a spool file that grows under the data directory.
//!
//! ```text
//! upstream ──▶ fetch task ──┬─▶ store_whole (staged → verified → published → linked)
//!                           └─▶ <data_dir>/proxy-spool/<uuid>   length ──▶ watch<Progress>
//!                                     ▲   ▲   ▲                 (fetch task owns the Tee)
//!                 client readers (Weak<Tee>), 64 KiB at a time; once Verified, or once the
//!                 Tee is gone, each continues from the stored blob
//! ```
//!
//! Invariants:
//! - Memory does not grow with the number or slowness of the clients: the fetch task writes
//!   each piece to the spool once, and every reader reads the file at its own pace in chunks
//!   of at most [`READ_CHUNK`] bytes; nothing is queued per client.
//! - Readers never hold up the fetch, its upstream permit or the spool: the fetch task owns
//!   the only strong handle of the [`Tee`] (and the upstream request's permit, through the
//!   upstream body), so both are released when the fetch ends, whatever the readers do. A
//!   reader keeps a [`std::sync::Weak`] handle and no open file between two pieces (each piece
//!   opens, reads and closes the file in one blocking call), so a stalled client pins neither
//!   the file nor its disk space. When the fetch reports [`Progress::Verified`], or the spool
//!   is gone, a reader continues from the stored blob at the position it reached.
//! - A response never ends cleanly before the blob is verified: a reader holds back the last
//!   byte of what it serves until the fetch reports [`Progress::Verified`] (the blob is then
//!   published). If the fetch fails (digest mismatch, upstream cut, store failure) or its task
//!   goes away, or the spool cannot be written (the fetch then goes on storing), every reader's
//!   stream ends with an error, which aborts the client's connection instead of finishing a
//!   short or wrong body.
//! - The spool file is removed when the fetch ends (the [`Tee`] is dropped); files and
//!   directories left by a crash are swept at start-up ([`sweep_spool_dir`]). At most
//!   `max_concurrent_requests` spools exist per upstream, since each belongs to a fetch that
//!   holds a permit.
//! - Reads and writes run on the blocking pool, never an executor thread.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::storage::ByteStream;

/// Largest piece a reader reads from the spool at once.
pub(super) const READ_CHUNK: usize = 64 * 1024;

/// How far the fetch has got, as readers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Progress {
    /// This many bytes are in the spool file (and readable there).
    Writing(u64),
    /// Every byte was stored, and the blob was verified and published.
    Verified,
    /// The fetch failed, or the spool could not be written: readers are cut.
    Failed,
}

/// A spool file. Owned by the fetch task alone; the file is removed when it is dropped.
pub(super) struct Tee {
    path: PathBuf,
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

/// What a client needs to read a tee: it keeps neither the spool nor the permit alive.
#[derive(Clone)]
pub(super) struct TeeHandle {
    tee: Weak<Tee>,
    /// The blob's size, as the upstream announced it.
    size: u64,
    progress: watch::Receiver<Progress>,
}

/// Opens the stored blob's bytes `start..end`, once it is published.
pub(super) type StoredRead = Box<dyn FnOnce(u64, u64) -> BoxFuture<'static, std::io::Result<ByteStream>> + Send>;

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
                    let path = entry.path();
                    if entry.file_type()?.is_dir() {
                        std::fs::remove_dir_all(&path)?;
                    } else {
                        std::fs::remove_file(&path)?;
                    }
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
    /// Creates an empty spool file in `dir` for a blob of `size` bytes: the tee (for the fetch
    /// task to keep), the handle readers share, and the writer.
    pub(super) async fn create(dir: &Path, size: u64) -> std::io::Result<(Arc<Tee>, TeeHandle, TeeWriter)> {
        tokio::fs::create_dir_all(dir).await?;
        let path = dir.join(uuid::Uuid::new_v4().to_string());
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await?;
        let (tx, rx) = watch::channel(Progress::Writing(0));
        let tee = Arc::new(Tee { path });
        let handle = TeeHandle {
            tee: Arc::downgrade(&tee),
            size,
            progress: rx,
        };
        Ok((
            tee,
            handle,
            TeeWriter {
                file,
                written: 0,
                size,
                progress: tx,
            },
        ))
    }
}

impl TeeHandle {
    pub(super) fn size(&self) -> u64 {
        self.size
    }

    /// Whether the fetch already failed (or the spool did): a reader would be cut at once.
    pub(super) fn failed(&self) -> bool {
        *self.progress.borrow() == Progress::Failed
    }

    /// The bytes `start..end` of the blob as they arrive (then from `stored`, see the module
    /// doc); the stream ends only after the blob was verified, and with an error if the fetch
    /// fails.
    pub(super) fn reader(
        &self,
        start: u64,
        end: u64,
        stored: StoredRead,
    ) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        let reader = Reader {
            tee: self.tee.clone(),
            progress: self.progress.clone(),
            stored: Some(stored),
            from_store: None,
            pos: start,
            end,
            done: false,
        };
        futures_util::stream::unfold(reader, |mut r| async move {
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
        })
    }
}

struct Reader {
    tee: Weak<Tee>,
    progress: watch::Receiver<Progress>,
    /// How to continue from the stored blob (taken when the reader switches).
    stored: Option<StoredRead>,
    /// The stored blob's bytes from where the tee left off, once switched.
    from_store: Option<ByteStream>,
    pos: u64,
    end: u64,
    done: bool,
}

impl Reader {
    /// The next piece, `None` at the end (only once verified).
    async fn next_piece(&mut self) -> std::io::Result<Option<Bytes>> {
        loop {
            if let Some(stream) = &mut self.from_store {
                return match stream.next().await {
                    Some(Ok(piece)) => {
                        self.pos += piece.len() as u64;
                        Ok(Some(piece))
                    }
                    Some(Err(e)) => Err(e),
                    None if self.pos == self.end => Ok(None),
                    None => Err(std::io::Error::other("the stored blob ended early")),
                };
            }
            let progress = *self.progress.borrow_and_update();
            let writing = match progress {
                Progress::Verified => return self.switch_to_store().await,
                Progress::Failed => return Err(fetch_failed()),
                Progress::Writing(n) => n,
            };
            // The last byte of the response waits for the verification.
            let readable = writing.min(self.end.saturating_sub(1));
            if self.pos < readable {
                let Some(tee) = self.tee.upgrade() else {
                    // The fetch ended: its final word tells how.
                    return self.after_fetch().await;
                };
                let want = usize::try_from(readable - self.pos)
                    .unwrap_or(READ_CHUNK)
                    .min(READ_CHUNK);
                let pos = self.pos;
                let read = crate::metrics::spawn_blocking(move || read_at(&tee.path, pos, want)).await;
                let piece = match read {
                    Ok(Ok(piece)) => piece,
                    // Removed under us: the fetch ended.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return self.after_fetch().await,
                    Ok(Err(e)) => return Err(e),
                    Err(e) => return Err(std::io::Error::other(e)),
                };
                self.pos += piece.len() as u64;
                return Ok(Some(piece));
            }
            if self.progress.changed().await.is_err() {
                return self.after_fetch().await;
            }
        }
    }

    /// The fetch task is gone: continues from the store if it said Verified, else cuts.
    async fn after_fetch(&mut self) -> std::io::Result<Option<Bytes>> {
        if *self.progress.borrow() == Progress::Verified {
            self.switch_to_store().await
        } else {
            Err(fetch_failed())
        }
    }

    async fn switch_to_store(&mut self) -> std::io::Result<Option<Bytes>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let stored = self
            .stored
            .take()
            .ok_or_else(|| std::io::Error::other("the stored blob could not be reopened"))?;
        self.from_store = Some(stored(self.pos, self.end).await?);
        Box::pin(self.next_piece()).await
    }
}

/// Up to `want` bytes of the file at `path` from `pos`: opens, reads and closes (blocking).
fn read_at(path: &Path, pos: u64, want: usize) -> std::io::Result<Bytes> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)?;
    let mut buf = BytesMut::zeroed(want);
    let n = file.read_at(&mut buf, pos)?;
    if n == 0 {
        return Err(std::io::Error::other(format!(
            "the proxy spool file {} ended early",
            path.display()
        )));
    }
    buf.truncate(n);
    Ok(buf.freeze())
}

fn fetch_failed() -> std::io::Error {
    std::io::Error::other("fetching the blob from the upstream failed; the response is cut short")
}

/// A spool write failed (disk full, I/O error): the readers were cut; the fetch went on.
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

    /// The verified blob was published: readers may finish (from the store).
    pub(super) fn verified(self) {
        self.progress.send_if_modified(|p| {
            let cut = *p == Progress::Failed;
            if !cut {
                *p = Progress::Verified;
            }
            !cut
        });
    }

    /// The fetch failed: readers end with an error.
    pub(super) fn failed(self) {
        self.progress.send_replace(Progress::Failed);
    }

    /// `body` passed through, every piece appended to the spool first; a length other than
    /// the announced one is an error at the end. If the spool cannot be written, the readers
    /// are cut at once and the body goes on passing through (the store is what matters). The
    /// writer comes back through `done` when the stream is dropped or ends, with the spool's
    /// failure if there was one.
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
            /// Bytes passed through (the spool may have stopped counting).
            seen: u64,
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
            seen: 0,
            ended: false,
            done: Some(done),
        };
        Box::pin(futures_util::stream::unfold(state, |mut st| async move {
            if st.ended {
                return None;
            }
            let writer = st.writer.as_mut()?;
            let size = writer.size;
            let outcome = match st.body.next().await {
                Some(Ok(piece)) if st.seen + piece.len() as u64 > size => Err(std::io::Error::other(format!(
                    "the upstream sent more than the {size} bytes it announced"
                ))),
                Some(Ok(piece)) => {
                    st.seen += piece.len() as u64;
                    if st.spool_error.is_none()
                        && let Err(e) = writer.append(&piece).await
                    {
                        tracing::warn!(error = %e, "writing a proxy spool file failed; its readers are cut, the fetch goes on");
                        writer.progress.send_replace(Progress::Failed);
                        st.spool_error = Some(SpoolError(e));
                    }
                    Ok(piece)
                }
                Some(Err(e)) => Err(e),
                None if st.seen != size => Err(std::io::Error::other(format!(
                    "the upstream announced {size} bytes and sent {}",
                    st.seen
                ))),
                None => return None,
            };
            st.ended = outcome.is_err();
            Some((outcome, st))
        }))
    }
}
