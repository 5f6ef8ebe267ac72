//! Composite blobs: a blob whose bytes are the concatenation of byte runs of other blobs.
//!
//! The Spack index is the one user (`registry::spack`): a fresh index at 500,000 specs is
//! 490 MB, of which a push changes a few runs. Writing a new 490 MB object per build costs more
//! than a second here (the page-cache copy, then the `fsync`); a composite writes only the runs
//! that changed (a small plain blob of their own) and names the rest where they already lie.
//!
//! Invariants:
//! - A composite is recorded (catalog migration 0018: `blobs.composite`, `blob_pieces`) only
//!   after its digest was computed by reading its pieces back through the store ([`hash`]), so
//!   its digest is what [`stream`] serves, byte for byte.
//! - Its pieces are plain, immutable blobs: the catalog keeps every blob a composite names.
//! - Nothing here buffers more than one store read; a range is served by reading only the
//!   pieces it overlaps, each from the offset needed.

use std::ops::Range;

use futures_util::{StreamExt, TryStreamExt};

use super::{BlobStore, ByteStream, hash_stream};
use crate::error::Result;
use crate::oci::{Algorithm, Digest};

/// One run of a composite: `len` bytes of blob `blob` from offset `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub blob: Digest,
    pub start: u64,
    pub len: u64,
}

/// The total length of `pieces`.
pub fn size(pieces: &[Piece]) -> u64 {
    pieces.iter().map(|p| p.len).sum()
}

/// `pieces` with empty runs dropped and each run that continues the previous one in the same
/// blob joined to it: the fewest store reads for the same bytes.
pub fn coalesce(pieces: impl IntoIterator<Item = Piece>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    for p in pieces {
        if p.len == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.blob == p.blob && last.start + last.len == p.start => last.len += p.len,
            _ => out.push(p),
        }
    }
    out
}

/// The parts of `pieces` that `range` (of the composite's bytes) covers, as (blob, byte range
/// in that blob), in order.
fn covering(pieces: &[Piece], range: Range<u64>) -> Vec<(Digest, Range<u64>)> {
    let mut out = Vec::new();
    let mut at = 0u64;
    for p in pieces {
        let (from, to) = (at, at + p.len);
        at = to;
        if to <= range.start {
            continue;
        }
        if from >= range.end {
            break;
        }
        let a = range.start.max(from) - from;
        let b = range.end.min(to) - from;
        out.push((p.blob.clone(), p.start + a..p.start + b));
    }
    out
}

/// Streams the composite made of `pieces` (or the byte `range` of it), opening each piece's
/// store read only when the previous one is done.
pub fn stream(store: &BlobStore, pieces: &[Piece], range: Option<Range<u64>>) -> ByteStream {
    let range = range.unwrap_or(0..size(pieces));
    let store = store.clone();
    futures_util::stream::iter(covering(pieces, range))
        .then(move |(blob, run)| {
            let store = store.clone();
            async move { store.get(&blob, Some(run)).await.map_err(std::io::Error::other) }
        })
        .try_flatten()
        .boxed()
}

/// Reads the composite made of `pieces` through the store and hashes it: its size and digest.
pub async fn hash(store: &BlobStore, pieces: &[Piece], algorithm: Algorithm) -> Result<(u64, Digest)> {
    hash_stream(stream(store, pieces, None), algorithm).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::sha256_of(&[n])
    }

    fn p(n: u8, start: u64, len: u64) -> Piece {
        Piece { blob: d(n), start, len }
    }

    #[test]
    fn coalesce_joins_contiguous_runs_of_one_blob_only() {
        let got = coalesce([
            p(1, 0, 10),
            p(1, 10, 5),
            p(2, 15, 5),
            p(2, 20, 0),
            p(2, 20, 1),
            p(1, 16, 4),
        ]);
        assert_eq!(got, vec![p(1, 0, 15), p(2, 15, 6), p(1, 16, 4)]);
    }

    #[test]
    fn a_range_reads_only_the_pieces_it_overlaps() {
        let pieces = [p(1, 100, 10), p(2, 0, 5), p(3, 50, 10)];
        assert_eq!(
            covering(&pieces, 0..25),
            vec![(d(1), 100..110), (d(2), 0..5), (d(3), 50..60)]
        );
        assert_eq!(covering(&pieces, 12..13), vec![(d(2), 2..3)]);
        assert_eq!(
            covering(&pieces, 8..17),
            vec![(d(1), 108..110), (d(2), 0..5), (d(3), 50..52)]
        );
        assert_eq!(covering(&pieces, 15..25), vec![(d(3), 50..60)]);
        assert_eq!(covering(&pieces, 10..15), vec![(d(2), 0..5)]);
    }
}
