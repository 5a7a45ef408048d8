//! A log-linear latency histogram (HDR-style buckets).
//!
//! Values (nanoseconds) below 2^(P+1) get one bucket each; above, every power of two is split
//! into 2^P equal buckets, so a bucket's width is at most 1/2^P of its lower bound. Reporting a
//! bucket's midpoint bounds the relative error by 1/2^(P+1) (0.4% with P = 7). Recording is a
//! few integer instructions and one counter increment; the bucket array is allocated once.
//! Per-thread histograms are merged at the end.

/// Sub-bucket bits: 2^P buckets per power of two.
const P: u32 = 7;
const SUB: usize = 1 << P;
/// Enough buckets for any u64: 2 * SUB exact ones, then SUB for each shift 1..=63-P.
const BUCKETS: usize = (64 - P as usize + 1) * SUB;

/// Counts of values (e.g. latencies in ns) in log-linear buckets, plus exact count, sum, min
/// and max.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count)
            .field("min", &self.min)
            .field("max", &self.max)
            .field("mean", &self.mean())
            .finish()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// The bucket holding `v`.
#[inline]
fn index(v: u64) -> usize {
    if v < (2 * SUB) as u64 {
        return v as usize;
    }
    let shift = 63 - v.leading_zeros() - P; // >= 1
    // (v >> shift) is in [SUB, 2*SUB): buckets of consecutive shifts are contiguous.
    ((shift as usize) << P) + (v >> shift) as usize
}

/// The lowest value of bucket `i` and the bucket's width.
fn bucket_range(i: usize) -> (u64, u64) {
    if i < 2 * SUB {
        return (i as u64, 1);
    }
    let shift = (i >> P) as u32 - 1;
    let sub = (i - ((shift as usize) << P)) as u64;
    (sub << shift, 1 << shift)
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Count one value.
    #[inline]
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.count += 1;
        self.sum += u128::from(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Add another histogram's counts to this one.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Exact mean, or 0 when empty.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// Smallest recorded value (0 when empty).
    pub fn min(&self) -> u64 {
        if self.count == 0 { 0 } else { self.min }
    }

    /// Largest recorded value (0 when empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0.0..=1.0): the smallest value such that at least q of all
    /// values are at or below it, within the bucket error; 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        if rank >= self.count {
            return self.max as f64;
        }
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (low, width) = bucket_range(i);
                let mid = low as f64 + (width - 1) as f64 / 2.0;
                return mid.clamp(self.min as f64, self.max as f64);
            }
        }
        self.max as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::rng::Rng;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut prev_end = 0u64;
        for i in 0..index(u64::MAX) + 1 {
            let (low, width) = bucket_range(i);
            assert_eq!(low, prev_end, "bucket {i}");
            assert_eq!(index(low), i);
            assert_eq!(index(low + (width - 1)), i);
            // Reporting the midpoint is off by at most 1/(2 SUB) of the value.
            if low > 0 {
                let err = (width - 1) as f64 / 2.0 / low as f64;
                assert!(err <= 0.5 / SUB as f64, "bucket {i}: {err}");
            }
            prev_end = low.wrapping_add(width);
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
    }

    fn assert_close(got: f64, want: f64, rel: f64) {
        assert!(
            (got - want).abs() <= want * rel + 0.5,
            "got {got}, want {want} (±{}%)",
            rel * 100.0
        );
    }

    #[test]
    fn uniform_distribution_percentiles() {
        // Every value 1..=1_000_000 once: the q-quantile is q * 1e6.
        let mut h = Histogram::new();
        for v in 1..=1_000_000u64 {
            h.record(v);
        }
        assert_eq!(h.count(), 1_000_000);
        assert_eq!(h.min(), 1);
        assert_eq!(h.max(), 1_000_000);
        assert_close(h.mean(), 500_000.5, 1e-9);
        for q in [0.5, 0.9, 0.99, 0.999] {
            assert_close(h.quantile(q), q * 1e6, 0.01);
        }
        assert_eq!(h.quantile(1.0), 1_000_000.0);
        assert_eq!(h.quantile(0.0), 1.0);
    }

    #[test]
    fn exponential_distribution_percentiles_and_merge() {
        // Latencies ~ Exp(mean 50 µs), recorded by 4 "threads" and merged. Compare with the
        // exact sample quantiles.
        let mut rng = Rng::new(42);
        let mut all = Vec::new();
        let mut parts = vec![Histogram::new(); 4];
        for i in 0..400_000 {
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let v = (-(1.0 - u).ln() * 50_000.0) as u64;
            parts[i % 4].record(v);
            all.push(v);
        }
        all.sort_unstable();
        let mut h = Histogram::new();
        for p in &parts {
            h.merge(p);
        }
        assert_eq!(h.count(), all.len() as u64);
        assert_eq!(h.max(), *all.last().unwrap());
        assert_eq!(h.min(), all[0]);
        let exact_mean = all.iter().map(|&v| v as f64).sum::<f64>() / all.len() as f64;
        assert_close(h.mean(), exact_mean, 1e-9);
        for q in [0.5, 0.99, 0.999] {
            let rank = (q * all.len() as f64).ceil() as usize;
            assert_close(h.quantile(q), all[rank - 1] as f64, 0.01);
        }
        // And against the distribution itself: p50 = ln2 * mean, p99 = ln100 * mean.
        assert_close(h.quantile(0.5), 2f64.ln() * 50_000.0, 0.02);
        assert_close(h.quantile(0.99), 100f64.ln() * 50_000.0, 0.03);
    }

    #[test]
    fn empty_and_tiny() {
        let h = Histogram::new();
        assert_eq!((h.count(), h.min(), h.max()), (0, 0, 0));
        assert_eq!(h.quantile(0.99), 0.0);
        assert_eq!(h.mean(), 0.0);
        let mut h = Histogram::new();
        h.record(0);
        h.record(u64::MAX);
        assert_eq!(h.quantile(0.5), 0.0);
        assert_eq!(h.quantile(1.0), u64::MAX as f64);
    }
}
