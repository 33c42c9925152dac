//! Retrying transient faults: the one split between a permanent failure (a
//! property of the input: a dead letter) and a transient one (retried), and
//! backoff that doubles up to a cap, with ±50% jitter so that workers that
//! failed together do not retry together. The fetch stage and the S3 client
//! both use it (neither imports the other for it); Kafka deliveries have
//! their own split (`sink::kafka::DeliveryError`).

use std::time::Duration;

use crate::dead_letter::Kind;

/// A permanent problem (dead letter) or a transient one (retry), of a file
/// read or an S3 request.
#[derive(Debug, Clone, PartialEq)]
pub enum FetchError {
    /// Retrying will not help.
    Permanent(Kind, String),
    /// May succeed later: throttling, 5xx, timeouts, connection failures.
    Transient(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Transient(m) => write!(f, "{m} (transient)"),
            FetchError::Permanent(k, m) => write!(f, "{m} ({})", k.as_str()),
        }
    }
}

impl std::error::Error for FetchError {}

/// Retries `attempt` on transient errors: up to `tries` attempts, backoff
/// doubling from `base` (at most 20 s) with ±50% jitter.
pub async fn with_retries<T, F, Fut>(
    tries: u32,
    base: Duration,
    mut attempt: F,
) -> Result<T, FetchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, FetchError>>,
{
    let mut n = 0;
    loop {
        n += 1;
        match attempt().await {
            Err(FetchError::Transient(why)) if n < tries => {
                let backoff = base
                    .saturating_mul(2u32.saturating_pow(n - 1))
                    .min(Duration::from_secs(20));
                let factor = 0.5 + crate::retry::jitter();
                tracing::debug!(attempt = n, %why, "transient error, retrying");
                tokio::time::sleep(backoff.mul_f64(factor)).await;
            }
            other => return other,
        }
    }
}

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
