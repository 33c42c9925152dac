//! The Parquet writer's metrics.

use std::time::Duration;

use prometheus::{Histogram, IntCounter};

use crate::stats::register::Register;

/// Files completed, their bytes, and how long each took to publish.
#[derive(Debug)]
pub struct ParquetMetrics {
    close_seconds: Histogram,
    files: IntCounter,
    bytes: IntCounter,
}

impl ParquetMetrics {
    pub(crate) fn register(r: &Register) -> Self {
        ParquetMetrics {
            close_seconds: r.seconds(
                "clipstream_parquet_close_duration_seconds",
                "Time to complete one Parquet file (write, sync, rename).",
            ),
            files: r.counter("clipstream_parquet_files_total", "Parquet files completed."),
            bytes: r.counter(
                "clipstream_parquet_bytes_total",
                "Bytes of completed Parquet files.",
            ),
        }
    }

    /// One file written, synced and published in `took`.
    pub fn published(&self, took: Duration) {
        self.close_seconds.observe(took.as_secs_f64());
    }

    /// One file of `bytes` completed (its range acknowledged).
    pub fn completed(&self, bytes: u64) {
        self.files.inc();
        self.bytes.inc_by(bytes);
    }
}
