//! [`PartBuf`]: the buffer an upload's part is gathered in, aligned so that local disk can take
//! it with direct I/O.
//!
//! `O_DIRECT` writes need the memory address, the file offset and the length all aligned to
//! the device's logical block size. [`ALIGN`] (4 KiB) covers the usual 512-byte and 4 KiB
//! devices; the staging code checks offset and length and falls back to buffered writes for
//! anything else.

use std::alloc::Layout;
use std::ptr::NonNull;

use bytes::Bytes;

use super::memory::Reservation;

/// Alignment of every part buffer, and the granularity direct writes need.
pub const ALIGN: usize = 4096;

/// A fixed-capacity byte buffer whose start is [`ALIGN`]-aligned, holding the reservation of
/// the upload memory budget that pays for it (given back when the buffer is freed, which for a
/// frozen buffer is when the last [`Bytes`] referring to it goes).
///
/// The memory is an anonymous mapping ([`Mapping`]). When the buffer is freed, a mapping whose
/// whole size was reserved goes back to the budget's pool of idle parts together with its
/// reservation (see `memory`), so the next part reuses pages already touched instead of
/// faulting in fresh ones; any other is unmapped at once. Either way the resident size follows
/// the budget, not an allocator's high-water mark. Fresh pages are touched only as bytes are
/// filled, so a part that never fills up costs no more pages than it holds.
pub struct PartBuf {
    /// `None` only while being dropped.
    mem: Option<Mapping>,
    len: usize,
    reservation: Reservation,
}

/// `size` bytes of anonymous memory aligned to [`ALIGN`], unmapped when dropped.
pub struct Mapping {
    ptr: NonNull<u8>,
    size: usize,
}

// SAFETY: a `Mapping` is owned exclusively, like a `Vec<u8>`'s allocation.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// A fresh mapping of at least `capacity` bytes (at least 1; rounded up to [`ALIGN`]).
    pub fn new(capacity: usize) -> Mapping {
        let size = capacity.max(1).next_multiple_of(ALIGN);
        Mapping { ptr: map(size), size }
    }

    pub fn size(&self) -> usize {
        self.size
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        unmap(self.ptr, self.size);
    }
}

impl PartBuf {
    /// A buffer holding up to `capacity` bytes (at least 1; rounded up to [`ALIGN`]) in fresh
    /// memory, paid for by `reservation`.
    pub fn with_capacity(capacity: usize, reservation: Reservation) -> PartBuf {
        PartBuf::in_mapping(Mapping::new(capacity), reservation)
    }

    /// A buffer in `mem` (its contents are overwritten before they are read), paid for by
    /// `reservation`.
    pub fn in_mapping(mem: Mapping, reservation: Reservation) -> PartBuf {
        PartBuf {
            mem: Some(mem),
            len: 0,
            reservation,
        }
    }

    fn mem(&self) -> (*mut u8, usize) {
        self.mem
            .as_ref()
            .map_or((NonNull::dangling().as_ptr(), 0), |m| (m.ptr.as_ptr(), m.size))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes that still fit.
    pub fn remaining(&self) -> usize {
        self.mem().1 - self.len
    }

    /// Bytes of the upload memory budget this buffer holds.
    pub fn reserved(&self) -> usize {
        self.reservation.bytes()
    }

    /// Adds to the reservation this buffer holds.
    pub fn reserve_more(&mut self, more: Reservation) {
        self.reservation.merge(more);
    }

    /// Appends as much of `data` as fits; returns how many bytes were taken.
    pub fn fill(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.remaining());
        // SAFETY: `len + n` is within the mapping, and `data` cannot overlap memory this
        // buffer owns exclusively.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.mem().0.add(self.len), n);
        }
        self.len += n;
        n
    }

    /// The filled bytes as [`Bytes`], without copying; the memory and its reservation are
    /// given back when the last reference goes.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PartBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes were initialised by `fill`.
        unsafe { std::slice::from_raw_parts(self.mem().0, self.len) }
    }
}

impl Drop for PartBuf {
    fn drop(&mut self) {
        if let Some(mem) = self.mem.take() {
            // Back to the pool if the whole mapping was paid for; unmapped otherwise.
            std::mem::replace(&mut self.reservation, Reservation::none()).recycle(mem);
        }
    }
}

/// `size` bytes (a multiple of [`ALIGN`]) of fresh memory aligned to [`ALIGN`].
#[cfg(unix)]
fn map(size: usize) -> NonNull<u8> {
    // SAFETY: an anonymous private mapping; no existing memory is involved.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            // No commit charge for the whole part up front: on local disk a part's memory is
            // reserved from the budget (and touched) step by step.
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    match NonNull::new(raw.cast::<u8>()) {
        Some(ptr) if raw != libc::MAP_FAILED => ptr,
        _ => std::alloc::handle_alloc_error(layout(size)),
    }
}

#[cfg(unix)]
fn unmap(ptr: NonNull<u8>, size: usize) {
    // SAFETY: `ptr` and `size` are exactly a mapping made by `map`, unmapped only here.
    unsafe {
        libc::munmap(ptr.as_ptr().cast(), size);
    }
}

#[cfg(not(unix))]
fn map(size: usize) -> NonNull<u8> {
    let layout = layout(size);
    // SAFETY: `layout` has a non-zero size.
    let raw = unsafe { std::alloc::alloc(layout) };
    NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
}

#[cfg(not(unix))]
fn unmap(ptr: NonNull<u8>, size: usize) {
    // SAFETY: allocated in `map` with this layout, freed only here.
    unsafe { std::alloc::dealloc(ptr.as_ptr(), layout(size)) }
}

fn layout(size: usize) -> Layout {
    match Layout::from_size_align(size, ALIGN) {
        Ok(l) => l,
        // Only a size near usize::MAX gets here; the configuration caps part sizes.
        Err(_) => std::alloc::handle_alloc_error(Layout::new::<[u8; ALIGN]>()),
    }
}

/// Whether `data` may be written with direct I/O at `offset`.
pub fn direct_io_aligned(data: &[u8], offset: u64) -> bool {
    !data.is_empty()
        && (data.as_ptr() as usize).is_multiple_of(ALIGN)
        && data.len().is_multiple_of(ALIGN)
        && offset.is_multiple_of(ALIGN as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_up_to_capacity_and_freezes_aligned() {
        let mut b = PartBuf::with_capacity(2 * ALIGN, Reservation::none());
        assert_eq!(b.fill(&[1u8; 3 * ALIGN]), 2 * ALIGN);
        assert_eq!(b.remaining(), 0);
        assert_eq!(b.fill(b"more"), 0);
        let bytes = b.freeze();
        assert_eq!(bytes.len(), 2 * ALIGN);
        assert!(bytes.iter().all(|&x| x == 1));
        assert!(direct_io_aligned(&bytes, 0));
        assert!(!direct_io_aligned(&bytes, 512));
        assert!(!direct_io_aligned(&bytes[1..], 0));
        assert!(!direct_io_aligned(&bytes[..100], 0));
    }

    #[test]
    fn capacity_rounds_up_and_partial_fill_keeps_order() {
        let mut b = PartBuf::with_capacity(10, Reservation::none());
        assert_eq!(b.remaining(), ALIGN);
        b.fill(b"abc");
        b.fill(b"def");
        assert_eq!(b.len(), 6);
        assert_eq!(&b.freeze()[..], b"abcdef");
        assert_eq!(PartBuf::with_capacity(0, Reservation::none()).len(), 0);
    }
}
