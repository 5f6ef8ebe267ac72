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
//! - No reservation is larger than the budget (the configuration keeps the budget at two parts
//!   or more), so every wait can end.
//! - An upload never waits for memory while holding a reservation that only its own client can
//!   release (see `StagedWriter`'s module doc): what it holds while waiting is either being
//!   written by the store, which ends on its own, or a whole part's reservation taken before
//!   the first byte of that part (object stores), which its client fills without needing more.
//!   So waits cannot form a cycle; they end when parts are written or clients time out.
//! - A wait is bounded (`storage.upload_memory_wait_secs`): past it the request gets 503
//!   `UNAVAILABLE` with `Retry-After`, and its session keeps everything received so far.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};

/// Granularity of reservations: permits are counted in units of this many bytes, so that a
/// budget of terabytes still fits the semaphore's `u32` acquisitions.
pub const UNIT: usize = 4096;

/// Default budget (`storage.upload_memory`).
pub const DEFAULT_BYTES: usize = 256 * 1024 * 1024;

/// Default longest wait for memory (`storage.upload_memory_wait_secs`).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

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
    /// Units reserved now, and the most ever reserved at once (for metrics).
    reserved: AtomicU64,
    peak: AtomicU64,
}

impl std::fmt::Debug for UploadMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadMemory")
            .field("bytes", &self.limit())
            .field("wait", &self.inner.wait)
            .finish()
    }
}

impl Default for UploadMemory {
    fn default() -> Self {
        UploadMemory::new(DEFAULT_BYTES, DEFAULT_WAIT)
    }
}

/// Bytes of an [`UploadMemory`] budget, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
    memory: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").field("units", &self.units).finish()
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
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let (Some(permit), Some(memory)) = (&self.permit, &self.memory) {
            let units = permit.num_permits() as u64;
            let now = memory.reserved.fetch_sub(units, Ordering::Relaxed) - units;
            crate::metrics::get()
                .upload_memory_reserved
                .set((now as usize * UNIT) as i64);
        }
    }
}

impl UploadMemory {
    /// A budget of `bytes` (rounded up to [`UNIT`]s); a reservation waits at most `wait`.
    pub fn new(bytes: usize, wait: Duration) -> UploadMemory {
        let units = bytes.div_ceil(UNIT).clamp(1, Semaphore::MAX_PERMITS);
        let metrics = crate::metrics::get();
        metrics.upload_memory_limit.set((units * UNIT) as i64);
        UploadMemory {
            inner: Arc::new(Inner {
                permits: Arc::new(Semaphore::new(units)),
                units,
                wait,
                reserved: AtomicU64::new(0),
                peak: AtomicU64::new(0),
            }),
        }
    }

    /// The budget in bytes.
    pub fn limit(&self) -> usize {
        self.inner.units * UNIT
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

    /// Reserves `bytes` if the budget has them now.
    pub fn try_reserve(&self, bytes: usize) -> Option<Reservation> {
        if bytes == 0 {
            return Some(Reservation::none());
        }
        let permit = Arc::clone(&self.inner.permits)
            .try_acquire_many_owned(self.units(bytes))
            .ok()?;
        Some(self.reserved(permit))
    }

    /// Reserves `bytes`, waiting for other uploads to give memory back, at most for the
    /// configured wait ([`Error::UploadMemoryBusy`] after it).
    pub async fn reserve(&self, bytes: usize) -> Result<Reservation> {
        if let Some(r) = self.try_reserve(bytes) {
            return Ok(r);
        }
        let metrics = crate::metrics::get();
        metrics.upload_memory_waits.inc();
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
        let memory = UploadMemory::new(4 * UNIT, Duration::from_millis(50));
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
    async fn a_waiter_gets_memory_as_soon_as_it_is_given_back() {
        let memory = UploadMemory::new(2 * UNIT, Duration::from_secs(30));
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
        let memory = UploadMemory::new(2 * UNIT, Duration::from_millis(10));
        assert_eq!(memory.reserve(100 * UNIT).await.unwrap().bytes(), 2 * UNIT);
        assert_eq!(Reservation::none().bytes(), 0);
    }
}
