//! The fetch stage's metrics.

use std::time::Duration;

use prometheus::Histogram;

use crate::stats::register::Register;

/// `clipstream_fetch_duration_seconds`.
#[derive(Debug)]
pub struct FetchMetrics {
    seconds: Histogram,
}

impl FetchMetrics {
    pub(crate) fn register(r: &Register) -> Self {
        FetchMetrics {
            seconds: r.seconds(
                "clipstream_fetch_duration_seconds",
                "Time to fetch one object.",
            ),
        }
    }

    /// One object fetched in `took`.
    pub fn fetched(&self, took: Duration) {
        self.seconds.observe(took.as_secs_f64());
    }
}
