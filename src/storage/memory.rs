//! [`UploadMemory`]: the one budget every upload's part buffers are reserved from
//! (`storage.upload_memory`), so that memory is bounded by a setting, not by the number of
//! uploads in flight.
//!
//! A [`Reservation`] is a number of bytes of the budget, returned when it is dropped. Part
//! buffers own theirs ([`super::aligned::PartBuf`]), so a part's bytes count against the budget
//! from the moment they are received until the store has taken them and the last reference to
//! the buffer is gone.
//!
//! Invariants:
//! - No reservation is larger than the budget, so every wait can end: a request for more is
//!   capped at the whole budget, and on object stores, where a part is reserved whole, the
//!   configuration keeps the budget at two parts or more. (On local disk parts are reserved in
//!   steps; the default budget there is two parts when the part size is raised past its
//!   default.)
//! - An upload never waits for memory while holding a reservation that only its own client can
//!   release (see `StagedWriter`'s module doc): what it holds while waiting is either being
//!   written by the store, which ends on its own, or a whole part's reservation taken before
//!   the first byte of that part (object stores), which its client fills without needing more.
//!   So waits cannot form a cycle; they end when parts are written or clients time out.
//! - On local disk, under pressure, only uploads whose bytes are arriving hold budget: one
//!   whose body is idle gives its partly filled part's memory back once it is wanted
//!   ([`UploadMemory::wanted_back`]: someone waits, or less than half the budget is free;
//!   `StagedWriter::release_idle`), keeping a tail of under one [`ALIGN`] block outside the
//!   budget (bounded by the session limit). So the default budget is small there
//!   ([`DEFAULT_LOCAL_BYTES`]); on object stores a stalled upload keeps its whole part, and the
//!   default is larger ([`DEFAULT_OBJECT_STORE_BYTES`]).
//! - A wait is bounded (`storage.upload_memory_wait_secs`): past it the request gets 503
//!   `UNAVAILABLE` with `Retry-After`, and its session keeps everything received so far.
//! - Idle part buffers are pooled for reuse (faulting in fresh pages for every 8 MiB part costs
//!   about 0.7 s of CPU per GiB uploaded): a freed buffer whose whole size was reserved keeps
//!   its reservation in the pool, at most [`POOL_PARTS`] of them, so pooled memory counts
//!   against the budget like any other. Before anyone is refused memory or made to wait, the
//!   pool is emptied (unmapped, reservations given back), so pooling never makes an upload
//!   wait.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::aligned::{ALIGN, Mapping, PartBuf};
use crate::error::{Error, Result};

/// Granularity of reservations: permits are counted in units of this many bytes, so that a
/// budget of terabytes still fits the semaphore's `u32` acquisitions.
pub const UNIT: usize = 4096;

/// Default budget on local disk (`storage.upload_memory`): parts are reserved step by step and
/// an idle upload gives its part's memory back, so only uploads whose bytes are arriving hold
/// any, and a few MiB keep the disk busy. (Two parts instead when `storage.part_size` is raised
/// past its default: see `StorageConfig::upload_memory`.)
pub const DEFAULT_LOCAL_BYTES: usize = 8 * 1024 * 1024;

/// Default budget on object stores: every upload filling a part holds a whole part (5 MiB or
/// more) until it is full, stalled or not, so the budget bounds how many can upload at once.
pub const DEFAULT_OBJECT_STORE_BYTES: usize = 256 * 1024 * 1024;

/// Smallest budget on local disk: a few steps of reservation.
pub const MIN_LOCAL_BYTES: usize = 512 * 1024;

/// Default longest wait for memory (`storage.upload_memory_wait_secs`).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// Most idle part buffers kept for reuse.
pub const POOL_PARTS: usize = 16;

/// The budget shared by every upload of one blob store.
#[derive(Clone)]
pub struct UploadMemory {
    inner: Arc<Inner>,
}

struct Inner {
    permits: Arc<Semaphore>,
    /// The budget, in [`UNIT`]s.
    units: usize,
    wait: Duration,
    /// Units reserved now (pooled parts included), and the most ever reserved at once.
    reserved: AtomicU64,
    peak: AtomicU64,
    /// Size of the parts pooled (the store's part size, as mapped).
    pool_size: usize,
    /// Idle part buffers, each with the permit for its whole size (still counted in
    /// `reserved`).
    pool: Mutex<Vec<(Mapping, OwnedSemaphorePermit)>>,
    /// Reservations waiting: while any is, nothing is pooled (freed memory goes to them).
    waiting: AtomicU64,
}

impl std::fmt::Debug for UploadMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadMemory")
            .field("bytes", &self.limit())
            .field("wait", &self.inner.wait)
            .finish()
    }
}

/// Bytes of an [`UploadMemory`] budget, given back when dropped.
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
    memory: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation").field("bytes", &self.bytes()).finish()
    }
}

impl Reservation {
    /// A reservation of nothing.
    pub fn none() -> Reservation {
        Reservation {
            permit: None,
            memory: None,
        }
    }

    /// Bytes reserved.
    pub fn bytes(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits() * UNIT)
    }

    /// Adds `other` to this reservation.
    pub fn merge(&mut self, mut other: Reservation) {
        match (&mut self.permit, other.permit.take()) {
            (Some(mine), Some(theirs)) => mine.merge(theirs),
            (None, Some(theirs)) => {
                self.permit = Some(theirs);
                self.memory = other.memory.take();
            }
            (_, None) => {}
        }
    }

    /// Gives back a freed buffer's memory: to the pool, with this reservation, when the
    /// reservation pays for all of it, it has the pooled size and the pool has room; otherwise
    /// the mapping is unmapped and the reservation returned.
    pub(super) fn recycle(mut self, mem: Mapping) {
        let Some(inner) = self.memory.clone() else { return };
        if mem.size() != inner.pool_size || self.bytes() < mem.size() {
            return;
        }
        let Ok(mut pool) = inner.pool.lock() else { return };
        // Checked under the pool's lock, which a new waiter takes (to empty the pool) only
        // after counting itself: either it sees this part pooled or this sees it waiting.
        if pool.len() >= POOL_PARTS || inner.waiting.load(Ordering::SeqCst) > 0 {
            return;
        }
        if let Some(permit) = self.permit.take() {
            // Still counted as reserved: the pool holds it.
            pool.push((mem, permit));
            inner.pooled(pool.len());
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let (Some(permit), Some(memory)) = (&self.permit, &self.memory) {
            memory.released(permit.num_permits() as u64);
        }
    }
}

impl Inner {
    /// Forgets `units` reserved (a reservation given back).
    fn released(&self, units: u64) {
        let now = self.reserved.fetch_sub(units, Ordering::Relaxed) - units;
        crate::metrics::get()
            .upload_memory_reserved
            .set((now as usize * UNIT) as i64);
    }

    /// Reports `parts` pooled.
    fn pooled(&self, parts: usize) {
        crate::metrics::get()
            .upload_memory_pooled
            .set((parts * self.pool_size) as i64);
    }

    /// Unmaps every pooled buffer and gives its reservation back; whether there was any.
    fn drain_pool(&self) -> bool {
        let drained = match self.pool.lock() {
            Ok(mut pool) => std::mem::take(&mut *pool),
            Err(_) => return false,
        };
        self.pooled(0);
        let any = !drained.is_empty();
        for (mem, permit) in drained {
            let units = permit.num_permits() as u64;
            drop(mem);
            drop(permit);
            self.released(units);
        }
        any
    }
}

/// A reservation waiting, counted while it lives.
struct Waiting<'a>(&'a Inner);

impl<'a> Waiting<'a> {
    fn enter(inner: &'a Inner) -> Waiting<'a> {
        inner.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(inner)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl UploadMemory {
    /// A budget of `bytes` (rounded up to [`UNIT`]s) for parts of `part_size` bytes; a
    /// reservation waits at most `wait`.
    pub fn new(bytes: usize, wait: Duration, part_size: usize) -> UploadMemory {
        let units = bytes.div_ceil(UNIT).clamp(1, Semaphore::MAX_PERMITS);
        crate::metrics::get().upload_memory_limit.set((units * UNIT) as i64);
        UploadMemory {
            inner: Arc::new(Inner {
                permits: Arc::new(Semaphore::new(units)),
                units,
                wait,
                reserved: AtomicU64::new(0),
                peak: AtomicU64::new(0),
                pool_size: part_size.max(1).next_multiple_of(ALIGN),
                pool: Mutex::new(Vec::new()),
                waiting: AtomicU64::new(0),
            }),
        }
    }

    /// The budget in bytes.
    pub fn limit(&self) -> usize {
        self.inner.units * UNIT
    }

    /// Bytes reserved now, idle pooled parts included.
    pub fn reserved_bytes(&self) -> usize {
        self.inner.reserved.load(Ordering::Relaxed) as usize * UNIT
    }

    /// Whether memory is wanted back from idle uploads: someone is waiting for it, or less than
    /// half the budget is free (idle pooled parts count as free: they are given up before
    /// anyone waits). Otherwise an idle upload keeps what it holds, so that clients pausing
    /// briefly (slow links, a client compressing the next chunk) do not pay for a short write
    /// and fresh memory on every pause.
    pub fn wanted_back(&self) -> bool {
        if self.inner.waiting.load(Ordering::SeqCst) > 0 {
            return true;
        }
        let pooled = self.inner.pool.lock().map_or(0, |p| p.len()) * self.inner.pool_size / UNIT;
        self.inner.permits.available_permits() + pooled < self.inner.units / 2
    }

    /// Bytes held by idle part buffers kept for reuse (counted in [`Self::reserved_bytes`]).
    pub fn pooled_bytes(&self) -> usize {
        self.inner.pool.lock().map_or(0, |p| p.len()) * self.inner.pool_size
    }

    /// Units covering `bytes`, capped at the budget (so that a wait can always end).
    fn units(&self, bytes: usize) -> u32 {
        let units = bytes.div_ceil(UNIT).min(self.inner.units);
        u32::try_from(units).unwrap_or(u32::MAX)
    }

    fn reserved(&self, permit: OwnedSemaphorePermit) -> Reservation {
        let units = permit.num_permits() as u64;
        let now = self.inner.reserved.fetch_add(units, Ordering::Relaxed) + units;
        let peak = self.inner.peak.fetch_max(now, Ordering::Relaxed).max(now);
        let metrics = crate::metrics::get();
        metrics.upload_memory_reserved.set((now as usize * UNIT) as i64);
        metrics.upload_memory_peak.set((peak as usize * UNIT) as i64);
        Reservation {
            permit: Some(permit),
            memory: Some(Arc::clone(&self.inner)),
        }
    }

    /// Reserves `bytes` if the budget has them now (emptying the pool of idle parts first if
    /// that is what it takes).
    pub fn try_reserve(&self, bytes: usize) -> Option<Reservation> {
        if bytes == 0 {
            return Some(Reservation::none());
        }
        let units = self.units(bytes);
        let permits = &self.inner.permits;
        let permit = match Arc::clone(permits).try_acquire_many_owned(units) {
            Ok(p) => p,
            Err(_) if self.inner.drain_pool() => Arc::clone(permits).try_acquire_many_owned(units).ok()?,
            Err(_) => return None,
        };
        Some(self.reserved(permit))
    }

    /// Like [`Self::whole_part`], but only while at least half the budget would stay free:
    /// for stores that can take parts reserved step by step, so that under load (or against
    /// clients that start bodies and stall) a part holds only what it received.
    pub fn whole_part_if_plenty(&self, part_size: usize) -> Option<PartBuf> {
        let pooled = self.inner.pool.lock().map(|p| p.len()).unwrap_or(0) * self.inner.pool_size / UNIT;
        let free = self.inner.permits.available_permits() + pooled;
        if free.saturating_sub(part_size.div_ceil(UNIT)) < self.inner.units / 2 {
            return None;
        }
        self.whole_part(part_size)
    }

    /// A buffer for a whole part of `part_size` bytes if one can be had now: an idle one from
    /// the pool (its pages already touched), else fresh memory if the budget has a part's worth.
    pub fn whole_part(&self, part_size: usize) -> Option<PartBuf> {
        if part_size.max(1).next_multiple_of(ALIGN) == self.inner.pool_size
            && let Some((mem, permit)) = self.inner.pool.lock().ok().and_then(|mut p| {
                let popped = p.pop();
                self.inner.pooled(p.len());
                popped
            })
        {
            // Its units are counted as reserved already.
            let reservation = Reservation {
                permit: Some(permit),
                memory: Some(Arc::clone(&self.inner)),
            };
            return Some(PartBuf::in_mapping(mem, reservation));
        }
        self.try_reserve(part_size)
            .map(|r| PartBuf::with_capacity(part_size, r))
    }

    /// Reserves `bytes`, waiting for other uploads to give memory back, at most for the
    /// configured wait ([`Error::UploadMemoryBusy`] after it).
    pub async fn reserve(&self, bytes: usize) -> Result<Reservation> {
        if let Some(r) = self.try_reserve(bytes) {
            return Ok(r);
        }
        let metrics = crate::metrics::get();
        metrics.upload_memory_waits.inc();
        // Counted as waiting before the pool is emptied, so that nothing freed from now on is
        // pooled instead of coming to this wait (see `Reservation::recycle`).
        let _waiting = Waiting::enter(&self.inner);
        self.inner.drain_pool();
        let acquire = Arc::clone(&self.inner.permits).acquire_many_owned(self.units(bytes));
        match tokio::time::timeout(self.inner.wait, acquire).await {
            Ok(Ok(permit)) => Ok(self.reserved(permit)),
            // The semaphore is never closed; treat it like a timeout all the same.
            Ok(Err(_)) | Err(_) => {
                metrics.upload_memory_timeouts.inc();
                Err(Error::UploadMemoryBusy {
                    retry_after: self.inner.wait.as_secs().clamp(1, 60),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_come_back_when_dropped() {
        let memory = UploadMemory::new(4 * UNIT, Duration::from_millis(50), UNIT);
        let a = memory.reserve(3 * UNIT).await.unwrap();
        assert_eq!(a.bytes(), 3 * UNIT);
        assert!(memory.try_reserve(2 * UNIT).is_none());
        let mut b = memory.try_reserve(1).unwrap();
        assert_eq!(b.bytes(), UNIT);
        assert!(matches!(
            memory.reserve(UNIT).await,
            Err(Error::UploadMemoryBusy { retry_after: 1 })
        ));
        drop(a);
        b.merge(memory.reserve(3 * UNIT).await.unwrap());
        assert_eq!(b.bytes(), 4 * UNIT);
        drop(b);
        assert_eq!(memory.try_reserve(4 * UNIT).unwrap().bytes(), 4 * UNIT);
    }

    #[tokio::test]
    async fn memory_is_wanted_back_when_someone_waits_or_less_than_half_is_free() {
        let memory = UploadMemory::new(8 * UNIT, Duration::from_secs(30), UNIT);
        let half = memory.try_reserve(4 * UNIT).unwrap();
        assert!(!memory.wanted_back(), "half the budget is still free");
        let more = memory.try_reserve(UNIT).unwrap();
        assert!(memory.wanted_back(), "less than half is free");
        drop(more);
        assert!(!memory.wanted_back());
        let rest = memory.try_reserve(4 * UNIT).unwrap();
        drop(half);
        assert!(!memory.wanted_back());
        // Someone waiting wants memory back, however much is free.
        let waiter = tokio::spawn({
            let memory = memory.clone();
            async move { memory.reserve(8 * UNIT).await.map(|r| r.bytes()) }
        });
        while memory.inner.waiting.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(memory.wanted_back(), "someone waits");
        drop(rest);
        assert_eq!(waiter.await.unwrap().unwrap(), 8 * UNIT);
        assert!(!memory.wanted_back());
    }

    #[tokio::test]
    async fn a_waiter_gets_memory_as_soon_as_it_is_given_back() {
        let memory = UploadMemory::new(2 * UNIT, Duration::from_secs(30), UNIT);
        let held = memory.reserve(2 * UNIT).await.unwrap();
        let waiter = tokio::spawn({
            let memory = memory.clone();
            async move { memory.reserve(UNIT).await.map(|r| r.bytes()) }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        assert_eq!(waiter.await.unwrap().unwrap(), UNIT);
    }

    #[tokio::test]
    async fn more_than_the_budget_is_capped_to_it() {
        let memory = UploadMemory::new(2 * UNIT, Duration::from_millis(10), UNIT);
        assert_eq!(memory.reserve(100 * UNIT).await.unwrap().bytes(), 2 * UNIT);
        assert_eq!(Reservation::none().bytes(), 0);
    }

    #[tokio::test]
    async fn idle_parts_are_reused_and_given_up_before_anyone_waits() {
        let memory = UploadMemory::new(3 * UNIT, Duration::from_millis(50), UNIT);
        let mut a = memory.whole_part(UNIT).unwrap();
        a.fill(b"first use");
        let address = a.as_ref().as_ptr();
        drop(a);
        // Pooled with its reservation: the same pages come back.
        assert_eq!(memory.inner.pool.lock().unwrap().len(), 1);
        let b = memory.whole_part(UNIT).unwrap();
        let mut b = b;
        b.fill(b"x");
        assert_eq!(b.as_ref().as_ptr(), address);
        drop(b);
        // The pooled part's unit is free for anyone who needs it.
        let all = memory.try_reserve(3 * UNIT).expect("the pool is emptied first");
        assert_eq!(all.bytes(), 3 * UNIT);
        assert!(memory.inner.pool.lock().unwrap().is_empty());
        drop(all);
        // A part paid for only in part is never pooled.
        let mut short = PartBuf::with_capacity(2 * UNIT, memory.try_reserve(UNIT).unwrap());
        short.fill(b"y");
        drop(short);
        assert!(memory.inner.pool.lock().unwrap().is_empty());
        assert_eq!(memory.inner.reserved.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_part_freed_while_someone_waits_goes_to_them_not_to_the_pool() {
        let memory = UploadMemory::new(2 * UNIT, Duration::from_secs(30), UNIT);
        let a = memory.whole_part(UNIT).unwrap();
        let _b = memory.whole_part(UNIT).unwrap();
        let waiter = tokio::spawn({
            let memory = memory.clone();
            async move { memory.reserve(UNIT).await.map(|r| r.bytes()) }
        });
        while memory.inner.waiting.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        drop(a);
        assert_eq!(waiter.await.unwrap().unwrap(), UNIT);
        assert!(memory.inner.pool.lock().unwrap().is_empty());
    }
}
