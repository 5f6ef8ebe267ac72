//! Streaming a byte range of a local file without holding a thread for the transfer.
//!
//! A download is a sequence of short blocking reads: each piece of [`CHUNK`] bytes is one
//! positioned read (`pread`) run on tokio's blocking pool, which returns the thread as soon as
//! the piece is in memory. Between pieces a download holds no thread at all, however slowly its
//! client reads, so thousands of downloads share a handful of blocking threads and never crowd
//! out the other blocking work (password checks, hashing, staging).
//!
//! Invariants:
//! - At most [`READS_IN_FLIGHT`] reads run at once, whatever the number of downloads: a download
//!   waits (asynchronously, holding nothing) for a slot before each read. So downloads occupy at
//!   most that many blocking threads even when the disk is slow and thousands of clients read.
//! - A download has at most one read in flight, and holds at most one piece it has read but not
//!   yet handed to the HTTP layer (the HTTP layer copies each piece into the connection's write
//!   buffer at once, and the buffer goes back to the [`chunks`](super::chunks) pool).
//! - Reading ahead (starting the next piece's read as soon as a piece is handed over, so that
//!   disk reads overlap with sending) needs a permit from one process-wide budget of
//!   [`READ_AHEAD_BUDGET`] bytes. A client that stops reading keeps its one read-ahead piece,
//!   and with it the permit, until it reads on or goes away; once stalled clients hold the whole
//!   budget, every other download reads each piece on demand, when the HTTP layer asks for it
//!   (still overlapped with sending by the connection's own write buffer). So read-ahead memory
//!   is at most [`READ_AHEAD_BUDGET`] (32 MiB) whatever the number of clients, plus one piece per
//!   download whose on-demand read is in flight at that moment.
//! - A read never runs on an async worker thread, and a dropped download leaves no task behind
//!   except a read already in flight, which finishes and frees its piece (and permit).

use std::fs::File;
use std::future::Future as _;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::PollSemaphore;

use super::chunks::{CHUNK, Chunk};

/// Bytes of read-ahead all downloads together may hold (64 pieces).
pub const READ_AHEAD_BUDGET: usize = 32 * 1024 * 1024;

/// Reads running at once, over all downloads: enough to keep a fast disk's queue busy, few
/// enough to leave tokio's blocking pool to its other work.
pub const READS_IN_FLIGHT: usize = 32;

/// Slots for reads in flight.
static READS: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(READS_IN_FLIGHT)));

/// The read-ahead budget, in pieces.
static READ_AHEAD: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(READ_AHEAD_BUDGET / CHUNK)));

/// A piece read off disk, with the read-ahead permit it was read under (if any): the permit is
/// released when the piece is handed over or dropped. (The read slot is released as soon as
/// the read returns.)
type Piece = (io::Result<Bytes>, Option<OwnedSemaphorePermit>);

/// The bytes `range` of a local file, as a stream of [`CHUNK`]-sized pieces.
pub struct FileRange {
    file: Arc<File>,
    /// The read-ahead budget this download draws on.
    budget: Arc<Semaphore>,
    /// Slots for reads in flight, waited for before each read.
    slots: PollSemaphore,
    /// Offset of the next piece to start reading.
    next: u64,
    end: u64,
    /// The read in flight, if any.
    reading: Option<JoinHandle<Piece>>,
    /// Set after an error: the stream ends.
    failed: bool,
}

impl FileRange {
    /// Streams `range` of `file` (clamped to an empty range if it ends before it starts).
    pub fn new(file: File, range: Range<u64>) -> Self {
        Self::with_budget(file, range, Arc::clone(&READ_AHEAD))
    }

    fn with_budget(file: File, range: Range<u64>, budget: Arc<Semaphore>) -> Self {
        FileRange {
            file: Arc::new(file),
            budget,
            slots: PollSemaphore::new(Arc::clone(&READS)),
            next: range.start,
            end: range.end.max(range.start),
            reading: None,
            failed: false,
        }
    }

    /// Starts reading the next piece on the blocking pool in read slot `slot`; `permit` when it
    /// is read ahead.
    fn start_read(&mut self, slot: OwnedSemaphorePermit, permit: Option<OwnedSemaphorePermit>) {
        let offset = self.next;
        let want = (self.end - offset).min(CHUNK as u64) as usize;
        self.next += want as u64;
        let file = Arc::clone(&self.file);
        self.reading = Some(crate::metrics::spawn_blocking(move || {
            let piece = read_piece(&file, offset, want);
            drop(slot);
            (piece, permit)
        }));
    }

    /// Starts reading the next piece ahead of demand, if a read slot and read-ahead budget are
    /// free right now.
    fn read_ahead(&mut self) {
        if self.next >= self.end {
            return;
        }
        let Ok(permit) = Arc::clone(&self.budget).try_acquire_owned() else {
            return;
        };
        if let Ok(slot) = self.slots.clone_inner().try_acquire_owned() {
            self.start_read(slot, Some(permit));
        }
    }
}

/// One positioned read of `want` bytes at `offset` into a pooled buffer.
fn read_piece(file: &File, offset: u64, want: usize) -> io::Result<Bytes> {
    let mut chunk = Chunk::take();
    match file.read_exact_at(&mut chunk.buf_mut()[..want], offset) {
        Ok(()) => Ok(chunk.freeze(want)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "blob shorter than recorded",
        )),
        Err(e) => Err(e),
    }
}

impl Stream for FileRange {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        if this.reading.is_none() {
            if this.next >= this.end {
                return Poll::Ready(None);
            }
            match this.slots.poll_acquire(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(slot)) => this.start_read(slot, None),
                Poll::Ready(None) => {
                    this.failed = true;
                    return Poll::Ready(Some(Err(io::Error::other("download reads are shut down"))));
                }
            }
        }
        let Some(reading) = this.reading.as_mut() else {
            return Poll::Ready(None);
        };
        let (piece, permit) = match Pin::new(reading).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(done)) => done,
            Poll::Ready(Err(join)) => (Err(io::Error::other(join)), None),
        };
        this.reading = None;
        drop(permit);
        match piece {
            Ok(bytes) => {
                this.read_ahead();
                Poll::Ready(Some(Ok(bytes)))
            }
            Err(e) => {
                this.failed = true;
                Poll::Ready(Some(Err(e)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::io::Write;

    fn file_with(data: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(data).unwrap();
        f
    }

    async fn collect(s: FileRange) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut s = s;
        while let Some(piece) = s.next().await {
            let piece = piece?;
            assert!(piece.len() <= CHUNK);
            out.extend_from_slice(&piece);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn streams_exactly_the_range_in_pieces() {
        let data: Vec<u8> = (0..(3 * CHUNK + 1234)).map(|i| (i % 251) as u8).collect();
        for range in [0..data.len(), 10..CHUNK + 10, CHUNK..3 * CHUNK, 5..5, 0..1] {
            let got = collect(FileRange::new(file_with(&data), range.start as u64..range.end as u64))
                .await
                .unwrap();
            assert_eq!(got, data[range.clone()], "range {range:?}");
        }
    }

    #[tokio::test]
    async fn a_short_file_is_an_error_not_a_short_body() {
        let data = vec![7u8; CHUNK + 100];
        let mut s = FileRange::new(file_with(&data), 0..(2 * CHUNK) as u64);
        assert_eq!(s.next().await.unwrap().unwrap().len(), CHUNK);
        let err = s.next().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn stalled_downloads_hold_at_most_the_read_ahead_budget() {
        let data = vec![1u8; 4 * CHUNK];
        let pieces = 8;
        let budget = Arc::new(Semaphore::new(pieces));
        // Twice as many downloads as the budget has pieces, each read once and then left.
        let mut stalled = Vec::new();
        for _ in 0..2 * pieces {
            let mut s = FileRange::with_budget(file_with(&data), 0..data.len() as u64, Arc::clone(&budget));
            s.next().await.unwrap().unwrap();
            stalled.push(s);
        }
        assert_eq!(budget.available_permits(), 0, "budget not in use");
        let read_ahead = stalled.iter().filter(|s| s.reading.is_some()).count();
        assert_eq!(read_ahead, pieces, "read-ahead beyond the budget");
        // A new download still completes, reading on demand.
        let fresh = FileRange::with_budget(file_with(&data), 0..data.len() as u64, Arc::clone(&budget));
        assert_eq!(collect(fresh).await.unwrap(), data);
        drop(stalled);
        // Dropped downloads give their permits back once their reads finish.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while budget.available_permits() < pieces {
            assert!(std::time::Instant::now() < deadline, "permits not returned");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}
