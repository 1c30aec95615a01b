//! The node's only source of randomness: a ChaCha stream seeded by the
//! caller, so a run replays exactly from its seed.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Random(ChaCha8Rng);

impl Random {
    pub fn from_seed(seed: [u8; 32]) -> Random {
        Random(ChaCha8Rng::from_seed(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` (n > 0), without modulo bias (Lemire's method).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let n = n.max(1);
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn duration_between(&mut self, lo: Duration, hi: Duration) -> Duration {
        if hi <= lo {
            return lo;
        }
        let span = (hi - lo).as_micros().min(u128::from(u64::MAX - 1)) as u64;
        lo + Duration::from_micros(self.below(span + 1))
    }

    /// Up to `k` distinct items, in random order.
    pub fn pick<T: Copy>(&mut self, items: &[T], k: usize) -> Vec<T> {
        let mut pool: Vec<T> = items.to_vec();
        let k = k.min(pool.len());
        for i in 0..k {
            let j = i + self.below((pool.len() - i) as u64) as usize;
            pool.swap(i, j);
        }
        pool.truncate(k);
        pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream() {
        let mut a = Random::from_seed([7; 32]);
        let mut b = Random::from_seed([7; 32]);
        let xs: Vec<u64> = (0..8).map(|_| a.below(1000)).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.below(1000)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| *x < 1000));
    }

    #[test]
    fn pick_returns_distinct_items() {
        let mut r = Random::from_seed([1; 32]);
        let mut p = r.pick(&[1, 2, 3, 4, 5], 3);
        assert_eq!(p.len(), 3);
        p.sort();
        p.dedup();
        assert_eq!(p.len(), 3);
        assert_eq!(r.pick(&[1, 2], 5).len(), 2);
    }

    #[test]
    fn durations_stay_in_bounds() {
        let mut r = Random::from_seed([2; 32]);
        let (lo, hi) = (Duration::from_millis(500), Duration::from_secs(1));
        for _ in 0..100 {
            let d = r.duration_between(lo, hi);
            assert!(d >= lo && d <= hi);
        }
    }
}
