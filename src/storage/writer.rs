//! [`StagedWriter`]: streams an upload's bytes into its [`Staging`] in fixed-size parts, hashing
//! every part on the blocking pool before it is written.
//!
//! Memory per upload is bounded: one part being filled plus at most [`MAX_IN_FLIGHT`] parts
//! being written. Parts are written concurrently with receiving the next one. Memory across
//! uploads is bounded too: every byte buffered or in flight is reserved from the store's
//! [`UploadMemory`] budget, and an upload that cannot get memory waits for it before it reads
//! more of its body (back-pressure on the client's connection).
//!
//! How a part's memory is reserved keeps those waits free of cycles (an upload never waits
//! while holding memory that only its own client's bytes would give back):
//! - On local disk a part may have any size. While at least half the budget is free, a part
//!   takes a whole part's memory at once (an idle buffer from the pool when there is one: no
//!   fresh pages to fault in). Past that, memory is reserved in steps of [`STEP`] as bytes
//!   arrive, so under load a slow client holds about what it has sent, not a whole part. When
//!   the next step is not available at once, the block-aligned prefix of the partly filled
//!   part is written out (its memory comes back when the write is done) and only then does the
//!   upload wait, holding nothing but parts the store is writing and a tail of under one block
//!   ([`ALIGN`]) that reserves nothing.
//! - On local disk, an upload whose body has been idle for [`IDLE_RELEASE_AFTER`] while it
//!   holds memory for a partly filled part gives that memory back the same way
//!   ([`StagedWriter::release_idle`], called by the request's body pump) once memory is wanted
//!   back: someone waits for memory or less than half the budget is free
//!   ([`UploadMemory::wanted_back`]; checked every [`IDLE_RELEASE_AFTER`] while idle). So under
//!   pressure clients that start a body and stall hold under one block each, outside the
//!   budget, and only uploads whose bytes are arriving hold budget; with the budget mostly free
//!   a pausing upload keeps its part (no short write, no fresh memory after the pause).
//!   Writing whole blocks keeps later parts at aligned offsets (direct I/O); the tail is hashed
//!   with the bytes that follow it, so the hash and the durability rules below are unchanged.
//!   A client that keeps sending a byte more often than [`IDLE_RELEASE_AFTER`] is never idle
//!   and keeps what its part reserved: one step if it started under pressure, a whole part if
//!   it started while half the budget was free. About 128 such clients hold the whole 8 MiB
//!   default budget in steps, and then other uploads wait (503 after the configured wait); a
//!   site expecting that many trickling clients raises `storage.upload_memory`.
//! - Object stores need parts of at least 5 MiB, so a whole part is reserved before its first
//!   byte; filling it then needs nothing more than the client's bytes. A stalled upload keeps
//!   that part (moving it to the tail object and back on every pause would cost two requests of
//!   up to a part each); the session's bytes move to the tail object only once the session is
//!   idle between requests (see `spill`). The S3 default budget is larger for that reason.
//!
//! On local disk the writer also asks the kernel to start writing each part back as soon as it
//! is written ([`Writeback`]), so the final fsync finds little left to do: durable uploads then
//! run at the disk's sequential write speed instead of "receive everything, then wait for one
//! long fsync".
//!
//! Resumability: parts complete in order of submission as far as the writer is concerned (they
//! are joined first in, first out), and each carries the hash state after its last byte. The
//! latest joined part is the point a [`Checkpoint`] describes: its offset, hash state and the
//! staging state (S3: the multipart upload's id and part ids). [`StagedWriter::checkpoint`]
//! makes that point durable and hands it to the caller to record; a restarted server resumes
//! from it ([`StagedWriter::resume`]). Bytes still buffered or in flight are never described by
//! a checkpoint, so a restart may lose them, never invent them.
//!
//! Integrity: every byte is hashed from the same buffer that is then handed to the store, and
//! a part is counted as written only once the store said so. The first error from a part
//! write, a sync or the completion **poisons** the writer: every later call fails, so no
//! caller can go on past a part that may be missing and publish a hole (the registry ends the
//! session and discards its data). [`StagedWriter::finish`] checks that the completed staged
//! object holds exactly the bytes hashed before it reports a digest. [`StagedWriter::len`]
//! counts the bytes accepted: written, in flight, or buffered for the next part; after a
//! request ends, [`StagedWriter::checkpoint`] has either written them or left only a tail too
//! small for the store (S3), which [`StagedWriter::discard_buffered`] drops when the request
//! failed.
//!
//! A writer dropped without [`StagedWriter::finish`] or [`StagedWriter::abort`] leaves staged
//! data behind that the owner must discard.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::multipart::PartId;
use tokio::task::JoinHandle;

use super::aligned::{ALIGN, PartBuf};
use super::memory::{Reservation, UploadMemory};
use super::staging::{PartWrite, Staging, TailKey};
use crate::error::{Error, Internal, Result};
use crate::oci::{Digest, Hasher};

/// Parts written concurrently with receiving the next one.
const MAX_IN_FLIGHT: usize = 2;

/// Steps in which a local-disk part's memory is reserved as its bytes arrive.
const STEP: usize = 64 * 1024;

/// How long an upload's body may stay idle, while the upload holds budget for a partly filled
/// part, before that memory is given back ([`StagedWriter::release_idle`]). Short enough that
/// clients which start a body and dribble or stall hold only a block each, long enough that an
/// upload pausing between TCP windows does not write short parts.
pub const IDLE_RELEASE_AFTER: Duration = Duration::from_millis(200);

/// Durable progress worth recording in the middle of a long request (see `checkpoint_due`).
const CHECKPOINT_BYTES: u64 = 128 * 1024 * 1024;

/// A point an upload can be resumed from.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Bytes durably staged.
    pub offset: u64,
    /// `Hasher::save` after `offset` bytes.
    pub hash_state: Vec<u8>,
    /// `StagingState` as JSON.
    pub staging: String,
}

struct InFlight {
    task: JoinHandle<object_store::Result<Option<PartId>>>,
    /// Offset just past the part.
    end: u64,
    /// Hash state after the part.
    state: Vec<u8>,
}

pub struct StagedWriter {
    staging: Staging,
    part_size: usize,
    /// The budget every buffer is reserved from.
    memory: UploadMemory,
    /// The part being filled, allocated at the first byte it takes.
    buf: Option<PartBuf>,
    hasher: Option<Hasher>,
    in_flight: VecDeque<InFlight>,
    /// Bytes accepted so far (written or buffered).
    len: u64,
    /// Bytes handed to the store so far.
    flushed: u64,
    /// Parts handed to the store so far.
    parts_started: usize,
    /// Ids of the parts written, in order (multipart stores).
    parts: Vec<PartId>,
    /// Offset and hash state after the last part joined.
    written: (u64, Vec<u8>),
    /// Offset of the last checkpoint handed out.
    recorded: u64,
    writeback: Option<Arc<Writeback>>,
    /// Set by the first failure: the staged data may have a hole, nothing may continue.
    poisoned: bool,
    /// Bytes past the last part that sit in the store's tail object instead of `buf` (an idle
    /// session, see [`StagedWriter::spill`]); read back before anything else happens.
    spilled: u64,
    /// Which tail object holds the `spilled` bytes.
    tail_key: TailKey,
    /// Tail objects that may exist (written here, or the one resumed from); deleted when they
    /// are superseded ([`StagedWriter::drop_stale_tails`]) or the upload ends.
    tails: Vec<TailKey>,
    /// Parts named by the last checkpoint handed out.
    described_parts: usize,
}

/// Write-back control of a staged file on local disk.
///
/// The staging file is written with plain positioned writes and fsynced at checkpoints and at
/// the end. Starting write-back of each part right after it is written, and waiting for parts
/// older than the ones in flight, keeps dirty memory bounded and the disk busy during the whole
/// upload. Purely an optimisation: durability still comes from the fsyncs.
pub struct Writeback {
    file: Arc<std::fs::File>,
}

impl Writeback {
    pub fn new(file: Arc<std::fs::File>) -> Self {
        Writeback { file }
    }

    /// Starts write-back of `range` and waits for the write-back of everything before `wait_to`.
    #[cfg(target_os = "linux")]
    fn advance(&self, start: u64, len: u64, wait_to: u64) {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        // SAFETY: plain syscalls on a descriptor this struct owns; no memory is passed.
        unsafe {
            libc::sync_file_range(fd, start as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
            if wait_to > 0 {
                libc::sync_file_range(
                    fd,
                    0,
                    wait_to as i64,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                );
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn advance(&self, _start: u64, _len: u64, _wait_to: u64) {}
}

impl StagedWriter {
    pub(super) fn new(staging: Staging, part_size: usize, memory: UploadMemory, hasher: Hasher) -> Self {
        let state = hasher.save();
        Self::resume(staging, part_size, memory, hasher, 0, state, Vec::new())
    }

    /// A writer continuing a staged upload from a checkpoint.
    pub(super) fn resume(
        staging: Staging,
        part_size: usize,
        memory: UploadMemory,
        hasher: Hasher,
        offset: u64,
        state: Vec<u8>,
        parts: Vec<PartId>,
    ) -> Self {
        let parts_len = parts.len();
        let writeback = match &staging {
            Staging::File(f) => Some(Arc::new(Writeback::new(Arc::clone(&f.file)))),
            Staging::Multipart(_) => None,
        };
        StagedWriter {
            part_size: part_size.max(staging.min_part()),
            staging,
            memory,
            buf: None,
            hasher: Some(hasher),
            in_flight: VecDeque::new(),
            len: offset,
            flushed: offset,
            parts_started: parts.len(),
            parts,
            written: (offset, state),
            recorded: offset,
            writeback,
            poisoned: false,
            spilled: 0,
            tail_key: TailKey::after(parts_len),
            tails: Vec::new(),
            described_parts: parts_len,
        }
    }

    /// The checkpoint of a writer that has not written anything yet (no sync needed: a
    /// session whose staging vanished in a crash is simply unknown after it).
    pub fn start_checkpoint(&self) -> Checkpoint {
        Checkpoint {
            offset: self.written.0,
            hash_state: self.written.1.clone(),
            staging: self.staging.state(&self.parts, None).to_json(),
        }
    }

    /// Marks the `bytes` after the resumed offset as kept in tail object `key`.
    pub(super) fn spilled(&mut self, bytes: u64, key: TailKey) {
        self.spilled = bytes;
        self.len += bytes;
        self.tail_key = key;
        self.note_tail(key);
    }

    fn note_tail(&mut self, key: TailKey) {
        if !self.tails.contains(&key) {
            self.tails.push(key);
        }
    }

    /// Deletes the tail objects a recorded checkpoint no longer names: those before the parts
    /// of the last checkpoint handed out, once the caller has recorded it (their bytes are in
    /// those parts). A tail at the current place is kept: it only ever grows.
    pub async fn drop_stale_tails(&mut self) {
        let parts = self.described_parts;
        let mut kept = Vec::with_capacity(self.tails.len());
        for key in std::mem::take(&mut self.tails) {
            if key.at >= parts {
                kept.push(key);
            } else if let Err(e) = self.staging.delete_tail(key).await {
                tracing::warn!(error = %e, "deleting a superseded upload tail object failed");
            }
        }
        self.tails = kept;
    }

    /// Reads the tail object back into the part buffer, if the bytes past the last part are there.
    async fn unspill(&mut self) -> Result<()> {
        if self.spilled == 0 {
            return Ok(());
        }
        let reservation = self.memory.reserve(self.part_size).await?;
        let data = self.staging.get_tail(self.spilled, self.tail_key).await?;
        let mut buf = PartBuf::with_capacity(self.part_size, reservation);
        buf.fill(&data);
        self.buf = Some(buf);
        self.spilled = 0;
        Ok(())
    }

    /// Moves the bytes buffered past the last part (too few for the store to take as a part)
    /// into the tail object, so that an idle session holds no memory, and returns the
    /// checkpoint describing them for the caller to record. `None` when there is nothing to
    /// move (no buffered bytes, a part in flight, or a store that takes parts of any size). If
    /// storing fails, the bytes stay in memory and nothing changes.
    pub async fn spill(&mut self) -> Result<Option<Checkpoint>> {
        self.check()?;
        if !self.staging.keeps_tails() || !self.in_flight.is_empty() {
            return Ok(None);
        }
        let Some(buf) = self.buf.as_ref() else {
            return Ok(None);
        };
        // A copy, so that the part (and its reservation) stays as it was if storing fails.
        let data = Bytes::copy_from_slice(buf.as_ref());
        // Named by where it starts: a tail recorded before a part was written stays as it was
        // until a checkpoint naming that part is recorded.
        let key = TailKey::after(self.parts.len());
        self.note_tail(key);
        self.staging.put_tail(data.clone(), key).await?;
        self.buf = None;
        self.tail_key = key;
        self.spilled = data.len() as u64;
        self.described_parts = self.parts.len();
        Ok(Some(Checkpoint {
            offset: self.written.0 + self.spilled,
            hash_state: self.written.1.clone(),
            staging: self.staging.state(&self.parts, Some((self.spilled, key))).to_json(),
        }))
    }

    /// Bytes accepted so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fails if an earlier call failed.
    fn check(&self) -> Result<()> {
        if self.poisoned {
            return Err(Internal::Other("an earlier write of this upload failed").into());
        }
        Ok(())
    }

    /// Poisons the writer if `r` is an error.
    fn poison_on_err<T>(&mut self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    /// Appends `data`; full parts are hashed and handed to the store.
    ///
    /// [`Error::UploadMemoryBusy`] (no memory within the configured wait) leaves the writer
    /// usable: the bytes before the one that found no memory were accepted ([`Self::len`]),
    /// the rest were not. Any other error poisons the writer.
    pub async fn write(&mut self, data: Bytes) -> Result<()> {
        self.check()?;
        let before = self.len;
        let r = self.write_inner(data).await;
        crate::metrics::get().bytes_uploaded.inc_by(self.len - before);
        match r {
            Err(e @ Error::UploadMemoryBusy { .. }) => Err(e),
            r => self.poison_on_err(r),
        }
    }

    async fn write_inner(&mut self, data: Bytes) -> Result<()> {
        self.unspill().await?;
        if self.buf.is_none() && data.len() >= self.part_size && data.len().is_multiple_of(self.part_size) {
            // Whole parts arrived in one piece: no copy, but their memory counts all the same.
            let mut data = data;
            while !data.is_empty() {
                let reservation = self.memory.reserve(self.part_size).await?;
                let part = data.split_to(self.part_size);
                self.len += part.len() as u64;
                self.write_part(part, reservation).await?;
            }
            return Ok(());
        }
        // Fill parts allocated at exactly the part size (aligned for direct I/O), so a part in
        // flight never drags a larger allocation along (this is what bounds memory per upload).
        let mut rest = &data[..];
        while !rest.is_empty() {
            let room = self.room_for(rest.len()).await?;
            let Some(buf) = self.buf.as_mut() else {
                return Err(Internal::Other("upload writer lost its part buffer").into());
            };
            let took = buf.fill(&rest[..room]);
            self.len += took as u64;
            rest = &rest[took..];
            if buf.len() == self.part_size
                && let Some(full) = self.buf.take()
            {
                self.write_part(full.freeze(), Reservation::none()).await?;
            }
        }
        Ok(())
    }

    /// Makes sure the part being filled exists and has memory reserved for more bytes; returns
    /// how many of the `want` next bytes it may take now (at least one).
    async fn room_for(&mut self, want: usize) -> Result<usize> {
        if let Some(buf) = self.buf.as_mut() {
            let covered = buf.reserved().min(self.part_size);
            if covered > buf.len() {
                return Ok(want.min(covered - buf.len()));
            }
            // Local disk only: object stores reserved the whole part before its first byte.
            let step = STEP.min(self.part_size - buf.len());
            if let Some(more) = self.memory.try_reserve(step) {
                buf.reserve_more(more);
                // At least one more unit is covered now: the step is never empty.
                let covered = buf.reserved().min(self.part_size);
                return Ok(want.min(covered - buf.len()));
            }
            // The budget is spent: write what this part holds so far rather than wait holding
            // memory only this upload's client could complete (see the module doc). Only a
            // sub-block tail stays, reserving nothing.
            self.flush_partial().await?;
            let wanted = self.step_after_wait();
            if let Some(buf) = self.buf.as_mut() {
                let more = self.memory.reserve(wanted).await?;
                buf.reserve_more(more);
                // A step is larger than the tail (under one block), so it covers more bytes.
                let room = buf.reserved().min(self.part_size).saturating_sub(buf.len());
                if room == 0 {
                    return Err(Internal::Other("upload memory step smaller than a block").into());
                }
                return Ok(want.min(room));
            }
        }
        // A whole part if one is there now (from the pool of idle parts: no fresh pages); on
        // local disk only while the budget has plenty left (see the module doc).
        let whole = if self.staging.min_part() <= 1 {
            self.memory.whole_part_if_plenty(self.part_size)
        } else {
            self.memory.whole_part(self.part_size)
        };
        if let Some(buf) = whole {
            let covered = buf.reserved().min(self.part_size);
            self.buf = Some(buf);
            return Ok(want.min(covered));
        }
        let first = if self.staging.min_part() <= 1 {
            want.next_multiple_of(STEP)
                .max(self.step_after_wait())
                .min(self.part_size)
        } else {
            self.part_size
        };
        let reservation = self.memory.reserve(first).await?;
        // At least one unit: `first` is never 0.
        let covered = reservation.bytes().min(self.part_size);
        self.buf = Some(PartBuf::with_capacity(self.part_size, reservation));
        Ok(want.min(covered))
    }

    /// Whether the part being filled holds budget that [`Self::release_idle`] would give back
    /// (local disk only: see the module doc for object stores).
    pub fn holds_partial_part(&self) -> bool {
        self.staging.min_part() <= 1 && self.buf.as_ref().is_some_and(|b| b.reserved() > 0)
    }

    /// Whether the budget wants memory back from idle uploads now
    /// ([`UploadMemory::wanted_back`]).
    pub fn memory_wanted_back(&self) -> bool {
        self.memory.wanted_back()
    }

    /// Gives back the budget the part being filled holds, for an upload whose body has been
    /// idle for [`IDLE_RELEASE_AFTER`] while memory is wanted back: the part's block-aligned prefix is hashed and written
    /// (as a short part), and the rest, under one block, stays buffered reserving nothing. A
    /// no-op unless [`Self::holds_partial_part`]. A failure poisons the writer, as any write's.
    pub async fn release_idle(&mut self) -> Result<()> {
        self.check()?;
        if !self.holds_partial_part() {
            return Ok(());
        }
        let r = self.flush_partial().await;
        self.poison_on_err(r)
    }

    /// Writes out the block-aligned prefix of the part being filled and keeps the rest (fewer
    /// than [`ALIGN`] bytes) in a fresh buffer that holds no reservation, so the part's memory
    /// comes back once the store has taken the prefix. Writing whole blocks keeps every later
    /// part at an aligned offset, so parts still go to disk with direct I/O.
    ///
    /// The rest is always copied out, even when nothing is written: the old buffer may be a
    /// whole pooled part with all its pages touched, and keeping it without its reservation
    /// would keep that memory resident outside the budget. Dropped with its reservation, it
    /// goes back to the pool (where it counts) or is unmapped.
    async fn flush_partial(&mut self) -> Result<()> {
        let Some(buf) = self.buf.take() else {
            return Ok(());
        };
        let aligned = buf.len() - buf.len() % ALIGN;
        if aligned < buf.len() {
            // Pages are touched only as they are filled: this costs one block, not a part.
            let mut tail = PartBuf::with_capacity(self.part_size, Reservation::none());
            tail.fill(&buf.as_ref()[aligned..]);
            self.buf = Some(tail);
        }
        if aligned == 0 {
            // Nothing worth a write: the bytes are in the tail, the memory goes back.
            drop(buf);
            return Ok(());
        }
        let mut prefix = buf.freeze();
        prefix.truncate(aligned);
        self.write_part(prefix, Reservation::none()).await
    }

    /// What a local-disk part reserves when it may have to wait: a sixteenth of the budget (at
    /// least a step, at most a part), so that under pressure parts are written in pieces of
    /// that size rather than a step each (64 KiB writes cost throughput), while the budget still
    /// goes round many uploads.
    fn step_after_wait(&self) -> usize {
        (self.memory.limit() / 16)
            .next_multiple_of(ALIGN)
            .clamp(STEP, self.part_size.max(STEP))
    }

    /// Hashes `part` on the blocking pool; returns it with the hash state after it.
    async fn hash(&mut self, part: Bytes) -> Result<(Bytes, Vec<u8>)> {
        let mut hasher = self.hasher.take().ok_or(Internal::Other("hasher used after finish"))?;
        let (hasher, part, state) = crate::metrics::spawn_blocking(move || {
            hasher.update(&part);
            let state = hasher.save();
            (hasher, part, state)
        })
        .await?;
        self.hasher = Some(hasher);
        Ok((part, state))
    }

    /// Hashes `part` and hands it to the store; `reservation` (if the part's memory is not
    /// already a [`PartBuf`]'s) is given back when the store has taken it.
    async fn write_part(&mut self, part: Bytes, reservation: Reservation) -> Result<()> {
        let (part, state) = self.hash(part).await?;
        while self.in_flight.len() >= MAX_IN_FLIGHT {
            self.join_one().await?;
        }
        let start = self.flushed;
        let len = part.len() as u64;
        let write: PartWrite = self.staging.put_part(self.parts_started, start, part).await?;
        self.parts_started += 1;
        self.flushed += len;
        let task = match self.writeback.clone() {
            None => tokio::spawn(async move {
                let id = write.await;
                drop(reservation);
                id
            }),
            Some(wb) => {
                // Wait for the parts older than those that may still be in flight.
                // (In whole parts: a short part, written early under memory pressure, must not
                // make the upload wait for everything before it.)
                let wait_to = start.saturating_sub((self.part_size * MAX_IN_FLIGHT) as u64);
                tokio::spawn(async move {
                    let id = write.await;
                    drop(reservation);
                    let id = id?;
                    let _ = crate::metrics::spawn_blocking(move || wb.advance(start, len, wait_to)).await;
                    Ok(id)
                })
            }
        };
        self.in_flight.push_back(InFlight {
            task,
            end: start + len,
            state,
        });
        Ok(())
    }

    /// Waits for the oldest part in flight.
    async fn join_one(&mut self) -> Result<()> {
        let Some(part) = self.in_flight.pop_front() else {
            return Ok(());
        };
        if let Some(id) = part.task.await?? {
            self.parts.push(id);
        }
        self.written = (part.end, part.state);
        Ok(())
    }

    /// Joins the parts in flight that have already finished, oldest first.
    async fn join_finished(&mut self) -> Result<()> {
        while self.in_flight.front().is_some_and(|p| p.task.is_finished()) {
            self.join_one().await?;
        }
        Ok(())
    }

    /// Whether enough has been written since the last checkpoint to take another one in the
    /// middle of a request.
    pub fn checkpoint_due(&self) -> bool {
        self.flushed.saturating_sub(self.recorded) >= CHECKPOINT_BYTES
    }

    /// Makes the parts written so far durable and describes them. With `end_of_request`, first
    /// writes the buffered tail when the store accepts a part that small, and waits for every
    /// part in flight; otherwise only the parts already finished count.
    pub async fn checkpoint(&mut self, end_of_request: bool) -> Result<Checkpoint> {
        self.check()?;
        let r = self.checkpoint_inner(end_of_request).await;
        self.poison_on_err(r)
    }

    /// Drops bytes buffered for a part that was not written (after a request whose body
    /// failed), so that [`StagedWriter::len`] is what was handed to the store.
    pub fn discard_buffered(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.len -= buf.len() as u64;
        }
    }

    async fn checkpoint_inner(&mut self, end_of_request: bool) -> Result<Checkpoint> {
        if self.spilled > 0 {
            // Nothing came since the tail was moved to its object (a write reads it back
            // first): the tail object is durable already, so describe it, without needing
            // memory to read it back.
            self.described_parts = self.parts.len();
            return Ok(Checkpoint {
                offset: self.written.0 + self.spilled,
                hash_state: self.written.1.clone(),
                staging: self
                    .staging
                    .state(&self.parts, Some((self.spilled, self.tail_key)))
                    .to_json(),
            });
        }
        if end_of_request {
            let min_part = self.staging.min_part();
            if let Some(tail) = self.buf.take_if(|b| b.len() >= min_part) {
                self.write_part(tail.freeze(), Reservation::none()).await?;
            }
            while !self.in_flight.is_empty() {
                self.join_one().await?;
            }
        } else {
            self.join_finished().await?;
        }
        self.staging.sync().await?;
        self.recorded = self.written.0;
        self.described_parts = self.parts.len();
        Ok(Checkpoint {
            offset: self.written.0,
            hash_state: self.written.1.clone(),
            staging: self.staging.state(&self.parts, None).to_json(),
        })
    }

    /// Reads a spilled tail back, so that [`Self::finish`] needs no memory it could wait for.
    /// [`Error::UploadMemoryBusy`] leaves the writer usable; any other error poisons it.
    pub async fn prepare_finish(&mut self) -> Result<()> {
        self.check()?;
        match self.unspill().await {
            Err(e @ Error::UploadMemoryBusy { .. }) => Err(e),
            r => self.poison_on_err(r),
        }
    }

    /// Writes the buffered tail, completes the staged object and returns its digest and size.
    /// On failure the staged data is deleted.
    pub async fn finish(mut self) -> Result<(Digest, u64)> {
        let result = match self.check() {
            Ok(()) => self.finish_inner().await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.abort_in_place().await;
        }
        result
    }

    async fn finish_inner(&mut self) -> Result<(Digest, u64)> {
        self.unspill().await?;
        let tail = self.buf.take().map(PartBuf::freeze).unwrap_or_default();
        let direct = self.parts_started == 0 && matches!(self.staging, Staging::Multipart(_));
        let tail = if direct {
            // Smaller than one part: one PUT, no multipart upload.
            let (tail, _) = self.hash(tail).await?;
            Some(tail)
        } else {
            if !tail.is_empty() {
                self.write_part(tail, Reservation::none()).await?;
            }
            None
        };
        while !self.in_flight.is_empty() {
            self.join_one().await?;
        }
        let parts = std::mem::take(&mut self.parts);
        if self.flushed + tail.as_ref().map_or(0, |t| t.len() as u64) != self.len {
            return Err(Internal::Other("upload writer lost track of its bytes").into());
        }
        // The staged object must hold exactly the bytes that were hashed.
        self.staging.complete(parts, tail, self.len).await?;
        self.delete_tail_object().await;
        let hasher = self
            .hasher
            .take()
            .ok_or(Error::Internal(Internal::Other("hasher used after finish")))?;
        Ok((hasher.finish(), self.len))
    }

    /// Abandons the upload, deleting what the store staged.
    pub async fn abort(mut self) {
        self.abort_in_place().await;
    }

    async fn abort_in_place(&mut self) {
        for part in &self.in_flight {
            part.task.abort();
        }
        while let Some(part) = self.in_flight.pop_front() {
            let _ = part.task.await;
        }
        if let Err(e) = self.staging.abort().await {
            tracing::warn!(error = %e, "aborting a staged upload failed");
        }
        self.delete_tail_object().await;
    }

    async fn delete_tail_object(&mut self) {
        for key in std::mem::take(&mut self.tails) {
            if let Err(e) = self.staging.delete_tail(key).await {
                tracing::warn!(error = %e, "deleting an upload's tail object failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::oci::Algorithm;
    use crate::storage::BlobStore;

    const KIB: usize = 1024;

    /// A local-disk store whose parts (1 MiB) are as large as its whole budget, so that parts
    /// are reserved in steps, and a writer of a new upload on it.
    async fn writer(dir: &std::path::Path) -> (BlobStore, StagedWriter) {
        let store = BlobStore::local(dir.to_path_buf(), 1024 * KIB)
            .unwrap()
            .with_upload_memory(1024 * KIB, Duration::from_secs(5));
        let writer = store
            .start_upload(uuid::Uuid::new_v4(), Algorithm::Sha256)
            .await
            .unwrap();
        (store, writer)
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// Waits until every reservation of `memory` has come back, but for idle parts kept for
    /// reuse (parts in flight finish on their own).
    async fn all_given_back(memory: &UploadMemory) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while memory.reserved_bytes() != memory.pooled_bytes() {
            assert!(
                Instant::now() < deadline,
                "{} bytes still reserved",
                memory.reserved_bytes()
            );
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_partial_part_gives_its_memory_back_and_keeps_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut w) = writer(dir.path()).await;
        let memory = store.upload_memory().clone();
        let all = data(3 * 1024 * KIB + 777);
        // 10,000 bytes: two whole blocks and a tail of 1,808.
        w.write(Bytes::copy_from_slice(&all[..10_000])).await.unwrap();
        assert!(w.holds_partial_part());
        assert_eq!(memory.reserved_bytes(), STEP);
        w.release_idle().await.unwrap();
        assert!(!w.holds_partial_part());
        all_given_back(&memory).await;
        // The blocks went to the store; the tail is still buffered, and counted as accepted.
        assert_eq!(w.flushed, 8192);
        assert_eq!(w.len(), 10_000);
        // Releasing again has nothing to do.
        w.release_idle().await.unwrap();
        assert_eq!(w.flushed, 8192);
        // The upload goes on from there, its parts at block-aligned offsets again.
        w.write(Bytes::copy_from_slice(&all[10_000..])).await.unwrap();
        assert!(w.flushed.is_multiple_of(ALIGN as u64), "{}", w.flushed);
        let (digest, len) = w.finish().await.unwrap();
        assert_eq!(len, all.len() as u64);
        assert_eq!(digest, Digest::sha256_of(&all));
        all_given_back(&memory).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tail_under_one_block_is_kept_without_a_reservation() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut w) = writer(dir.path()).await;
        let memory = store.upload_memory().clone();
        let all = data(300 * KIB);
        w.write(Bytes::copy_from_slice(&all[..100])).await.unwrap();
        w.release_idle().await.unwrap();
        // Nothing written (not even a block), yet the whole budget is free at once.
        assert_eq!(w.flushed, 0);
        assert_eq!(memory.reserved_bytes(), 0);
        let everything = memory.try_reserve(memory.limit()).expect("the whole budget is free");
        drop(everything);
        w.write(Bytes::copy_from_slice(&all[100..])).await.unwrap();
        let (digest, len) = w.finish().await.unwrap();
        assert_eq!((digest, len), (Digest::sha256_of(&all), all.len() as u64));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_whole_part_under_one_block_is_not_kept_resident() {
        // A budget of four parts: the first part is a whole one (its mapping as large as a
        // part, reserved in full), as it is whenever the budget has plenty left.
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(dir.path().to_path_buf(), 1024 * KIB)
            .unwrap()
            .with_upload_memory(4 * 1024 * KIB, Duration::from_secs(5));
        let memory = store.upload_memory().clone();
        let mut w = store
            .start_upload(uuid::Uuid::new_v4(), Algorithm::Sha256)
            .await
            .unwrap();
        let all = data(1024 * KIB + 300);
        w.write(Bytes::copy_from_slice(&all[..100])).await.unwrap();
        assert_eq!(memory.reserved_bytes(), 1024 * KIB, "a whole part");
        assert_eq!(memory.pooled_bytes(), 0);
        w.release_idle().await.unwrap();
        assert!(!w.holds_partial_part());
        assert_eq!(w.flushed, 0);
        // The 100 bytes moved to a buffer of their own; the whole part's mapping went back
        // with its reservation (to the pool, where it still counts against the budget), so no
        // part-sized mapping stays with the idle upload outside the budget.
        assert_eq!(memory.pooled_bytes(), 1024 * KIB);
        assert_eq!(memory.reserved_bytes(), memory.pooled_bytes());
        let kept = w.buf.as_ref().expect("the tail is kept");
        assert_eq!(kept.as_ref(), &all[..100]);
        assert_eq!(kept.reserved(), 0);
        // Someone needing the whole budget gets it (the pool is emptied for it).
        let everything = memory.try_reserve(memory.limit()).expect("the whole budget is free");
        assert_eq!(memory.pooled_bytes(), 0);
        drop(everything);
        w.write(Bytes::copy_from_slice(&all[100..])).await.unwrap();
        let (digest, len) = w.finish().await.unwrap();
        assert_eq!((digest, len), (Digest::sha256_of(&all), all.len() as u64));
        all_given_back(&memory).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_the_budget_spent_a_partial_part_is_written_before_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut w) = writer(dir.path()).await;
        let memory = store.upload_memory().clone();
        // Someone else holds all but one step: the writer fills that step, writes it out (a
        // short part) and waits for its own write to give the step back; no cycle.
        let others = memory.try_reserve(memory.limit() - STEP).unwrap();
        let all = data(STEP + 5_000);
        let write = async {
            // In 64 KiB chunks, as request bodies come.
            for chunk in all.chunks(64 * KIB) {
                w.write(Bytes::copy_from_slice(chunk)).await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(10), write)
            .await
            .expect("the write waits only for its own part");
        assert_eq!(w.flushed, STEP as u64);
        assert!(w.holds_partial_part());
        w.release_idle().await.unwrap();
        // 5,000 bytes: one more block written, 904 kept.
        assert_eq!(w.flushed, (STEP + ALIGN) as u64);
        drop(others);
        let (digest, _) = w.finish().await.unwrap();
        assert_eq!(digest, Digest::sha256_of(&all));
        all_given_back(&memory).await;
    }
}
