//! Seeded pseudo-random choices and bytes for tests: the same seed, the same run.

/// SplitMix64: a small seeded generator, enough for schedules, choices and test bytes.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn range(&mut self, r: std::ops::Range<u64>) -> u64 {
        r.start + self.below(r.end - r.start)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// `len` bytes that differ with `seed` (xorshift), so that no two blobs of a test are
/// satisfied by deduplication.
pub fn seeded_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut x = (seed + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        for (b, v) in chunk.iter_mut().zip(x.to_le_bytes()) {
            *b = v;
        }
    }
    data
}
