//! A small, fast pseudo-random generator for offsets, op mixes and verify payloads.
//!
//! SplitMix64 (Steele, Lea and Flood): one add and a 64-bit mix per value, no allocation,
//! statistically good enough for load generation, and cheap to seed per queue and per
//! sector. It is not cryptographic.

/// The SplitMix64 generator.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

/// The golden-ratio increment of SplitMix64.
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// The SplitMix64 output function: a bijective mix of a 64-bit value.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator whose stream is determined by `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// A generator for stream `stream` of `seed` (e.g. one per queue); streams of the same seed
    /// do not overlap in practice.
    pub fn stream(seed: u64, stream: u64) -> Rng {
        Rng::new(mix64(seed ^ mix64(stream.wrapping_add(GAMMA))))
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        mix64(self.state)
    }

    /// A value uniformly distributed in `0..n` (`n > 0`), by multiply-and-shift (Lemire);
    /// no division, and a bias below 2^-64 * n.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// True with probability `pct` percent (0..=100).
    #[inline]
    pub fn percent(&mut self, pct: u8) -> bool {
        self.below(100) < u64::from(pct)
    }

    /// Fill `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = Rng::new(7);
        for n in [1u64, 2, 3, 10, 1000, 1 << 33, u64::MAX] {
            for _ in 0..10_000 {
                assert!(r.below(n) < n, "n={n}");
            }
        }
        // Every value of a small range shows up, roughly uniformly.
        let mut seen = [0u32; 10];
        for _ in 0..100_000 {
            seen[r.below(10) as usize] += 1;
        }
        for (v, &c) in seen.iter().enumerate() {
            assert!((9_000..11_000).contains(&c), "value {v} seen {c} times");
        }
    }

    #[test]
    fn aligned_offsets_stay_in_the_region() {
        // The way the load generator draws offsets: block index * bs + region start.
        let (start, size, bs) = (1u64 << 20, 10 * 4096 + 100, 4096u64);
        let blocks = size / bs;
        let mut r = Rng::new(1);
        let mut hit_last = false;
        for _ in 0..10_000 {
            let off = start + r.below(blocks) * bs;
            assert_eq!(off % bs, 0);
            assert!(off >= start && off + bs <= start + size);
            hit_last |= off == start + (blocks - 1) * bs;
        }
        assert!(hit_last);
    }

    #[test]
    fn streams_differ_and_are_reproducible() {
        let a: Vec<u64> = (0..4).map(|_| Rng::stream(1, 0).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(Rng::stream(1, 0).next_u64(), Rng::stream(1, 1).next_u64());
        assert_ne!(Rng::stream(1, 0).next_u64(), Rng::stream(2, 0).next_u64());
    }

    #[test]
    fn percent_and_fill() {
        let mut r = Rng::new(3);
        let reads = (0..100_000).filter(|_| r.percent(70)).count();
        assert!((68_000..72_000).contains(&reads), "{reads}");
        assert!((0..1000).all(|_| !r.percent(0)));
        assert!((0..1000).all(|_| r.percent(100)));
        let mut buf = [0u8; 13];
        r.fill(&mut buf);
        assert!(buf.iter().any(|&b| b != 0));
    }
}
