//! Retrying transient faults: backoff that doubles up to a cap, with ±50%
//! jitter so that workers that failed together do not retry together.
//! Whether a fault is transient is the caller's call (see `fetch` for
//! objects, `sink::kafka` for deliveries); this module only paces retries.

use std::time::Duration;

/// Delays between attempts: `first`, doubling up to `max`, each scaled by a
/// random factor in [0.5, 1.5).
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `first`, never above `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff { next: first, max }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next.min(self.max);
        self.next = self.next.saturating_mul(2).min(self.max);
        d.mul_f64(0.5 + jitter())
    }
}

/// A cheap, non-cryptographic random number in [0, 1) for jitter.
pub fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let expected = [100u64, 200, 400, 800, 800, 800];
        for e in expected {
            let d = b.next_delay().as_secs_f64() * 1000.0;
            assert!(
                d >= e as f64 * 0.5 && d < e as f64 * 1.5,
                "{d} ms for a nominal {e} ms"
            );
        }
    }
}
