//! A route's service times: its `service_ms`, or drawn around it
//! (`service_dist=exponential`) from a seeded generator, so that a run can
//! be repeated draw for draw.

use crate::route::ServiceDist;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// SplitMix64's increment (Steele, Lea, Flood 2014): the state advances by
/// it, so drawing is one atomic add, lock-free across runtime threads.
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

pub struct ServiceTimes {
    mean: Duration,
    dist: ServiceDist,
    seed: u64,
    state: AtomicU64,
}

impl ServiceTimes {
    pub fn new(mean: Duration, dist: ServiceDist, seed: u64) -> ServiceTimes {
        ServiceTimes {
            mean,
            dist,
            seed,
            state: AtomicU64::new(seed),
        }
    }

    /// The service time of the next request.
    pub fn next(&self) -> Duration {
        match self.dist {
            ServiceDist::Fixed => self.mean,
            ServiceDist::Exponential => {
                // Uniform in [0, 1) from the top 53 bits; 1 - u is in
                // (0, 1], so the logarithm is finite: at most 36.7 × the mean.
                let u = (mix(self.state.fetch_add(GAMMA, Ordering::Relaxed)) >> 11) as f64
                    / (1u64 << 53) as f64;
                self.mean.mul_f64(-(1.0 - u).ln())
            }
        }
    }

    /// Starts the draws again from the seed (`POST /__backend/reset`).
    pub fn reset(&self) {
        self.state.store(self.seed, Ordering::Relaxed);
    }
}

/// SplitMix64's output function.
fn mix(state: u64) -> u64 {
    let mut z = state.wrapping_add(GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(times: &ServiceTimes, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| times.next().as_secs_f64() * 1000.0)
            .collect()
    }

    #[test]
    fn fixed_is_the_mean() {
        let t = ServiceTimes::new(Duration::from_millis(60), ServiceDist::Fixed, 1);
        assert!(draws(&t, 10).iter().all(|&ms| ms == 60.0));
    }

    #[test]
    fn exponential_has_its_mean_and_spread_and_repeats_from_its_seed() {
        let mean = Duration::from_millis(60);
        let t = ServiceTimes::new(mean, ServiceDist::Exponential, 7);
        let ms = draws(&t, 100_000);
        let avg = ms.iter().sum::<f64>() / ms.len() as f64;
        assert!((avg - 60.0).abs() < 1.0, "mean {avg}");
        // An exponential's median is ln 2 × the mean, and P(> 3 × mean) = e^-3.
        let mut sorted = ms.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        assert!((median - 60.0 * 2f64.ln()).abs() < 1.0, "median {median}");
        let over = ms.iter().filter(|&&m| m > 180.0).count() as f64 / ms.len() as f64;
        assert!((over - (-3f64).exp()).abs() < 0.005, "P(> 3 × mean) {over}");
        assert!(ms.iter().all(|m| m.is_finite() && *m >= 0.0));

        t.reset();
        assert_eq!(draws(&t, 50), ms[..50]);
        let other = ServiceTimes::new(mean, ServiceDist::Exponential, 8);
        assert_ne!(draws(&other, 50), ms[..50]);
    }
}
