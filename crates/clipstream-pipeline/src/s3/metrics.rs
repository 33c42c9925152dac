//! The S3 client's metrics: every request attempt, retry and byte.

use std::time::Duration;

use prometheus::{HistogramVec, IntCounterVec};

use crate::stats::labels::{Direction, ResultLabel, S3Op};
use crate::stats::register::{Register, SECONDS_BUCKETS};

/// Requests by operation and result, retries, bytes, and attempt times.
#[derive(Debug)]
pub struct S3Metrics {
    requests: IntCounterVec,
    retries: IntCounterVec,
    bytes: IntCounterVec,
    seconds: HistogramVec,
}

impl S3Metrics {
    pub(crate) fn register(r: &Register) -> Self {
        let m = S3Metrics {
            requests: r.counter_vec(
                "clipstream_s3_requests_total",
                "S3 request attempts, by operation and result.",
                &["operation", "result"],
            ),
            retries: r.counter_vec(
                "clipstream_s3_retries_total",
                "S3 requests retried after a transient error, by operation.",
                &["operation"],
            ),
            bytes: r.counter_vec(
                "clipstream_s3_bytes_total",
                "Bytes read from and written to S3.",
                &["direction"],
            ),
            seconds: r.histogram_vec(
                "clipstream_s3_request_duration_seconds",
                "Time of one S3 request attempt, by operation.",
                &["operation"],
                &SECONDS_BUCKETS,
            ),
        };
        for d in Direction::ALL {
            m.bytes.with_label_values(&[d.as_str()]);
        }
        for op in S3Op::ALL {
            m.retries.with_label_values(&[op.as_str()]);
            for res in ResultLabel::ALL {
                m.requests.with_label_values(&[op.as_str(), res.as_str()]);
            }
        }
        m
    }

    /// One attempt of `op` that took `took`.
    pub fn request(&self, op: S3Op, ok: bool, took: Duration) {
        let result = if ok {
            ResultLabel::Ok
        } else {
            ResultLabel::Error
        };
        self.seconds
            .with_label_values(&[op.as_str()])
            .observe(took.as_secs_f64());
        self.requests
            .with_label_values(&[op.as_str(), result.as_str()])
            .inc();
    }

    /// `op` is tried again after a transient error.
    pub fn retry(&self, op: S3Op) {
        self.retries.with_label_values(&[op.as_str()]).inc();
    }

    /// `n` bytes moved in `direction`.
    pub fn bytes(&self, direction: Direction, n: u64) {
        self.bytes
            .with_label_values(&[direction.as_str()])
            .inc_by(n);
    }
}
