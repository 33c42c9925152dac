//! The metrics a run keeps. They are Prometheus metrics (one registry per
//! run, `clipstream_` prefix, units in the names, low-cardinality labels
//! only) and also feed the progress display and the final summary.
//!
//! Each stage owns its metrics as a small type with methods, beside its
//! logic, so that call sites say what happened (`s3.request(op, ok, took)`)
//! and label values come from one closed set ([`labels`]):
//!
//! | field | type | beside |
//! |---|---|---|
//! | `records` | [`RecordMetrics`] | here (every stage counts records) |
//! | `fetch` | [`crate::fetch::metrics::FetchMetrics`] | the fetch stage |
//! | `prep` | [`crate::prep::metrics::PrepMetrics`] | the CPU stage |
//! | `encoder` | [`crate::batch::metrics::EncoderMetrics`] | batching and the encoders |
//! | `queues` | [`crate::engine::metrics::QueueMetrics`] | the channels and the memory budget |
//! | `parquet` | [`crate::sink::parquet::metrics::ParquetMetrics`] | the Parquet writer |
//! | `outputs` | [`crate::sink::kafka::metrics::OutputMetrics`] | the Kafka outputs |
//! | `s3` | [`crate::s3::metrics::S3Metrics`] | the S3 client |
//! | `kafka` | [`crate::source::kafka::metrics::KafkaMetrics`] | the Kafka source |
//! | `review` | [`crate::review::ReviewMetrics`] | review routing |
//! | `night` | [`crate::catalog::progress::NightMetrics`] | nightly progress |
//!
//! Histogram buckets are set in one place ([`register`]).

pub mod labels;
pub mod register;

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};

pub use self::labels::{
    Direction, Output, Queue, ResultLabel, ReviewDecision, S3Op, Tower, label_values,
};
pub use self::register::{BATCH_BUCKETS, Register, SECONDS_BUCKETS};
use crate::batch::metrics::EncoderMetrics;
use crate::catalog::progress::NightMetrics;
use crate::dead_letter::{Kind, Stage};
use crate::engine::metrics::QueueMetrics;
use crate::fetch::metrics::FetchMetrics;
use crate::prep::metrics::PrepMetrics;
use crate::review::ReviewMetrics;
use crate::s3::metrics::S3Metrics;
use crate::sink::kafka::metrics::OutputMetrics;
use crate::sink::parquet::metrics::ParquetMetrics;
use crate::source::kafka::metrics::KafkaMetrics;

/// Records through the pipeline: what every stage counts.
#[derive(Debug)]
pub struct RecordMetrics {
    /// Records the source emitted into the pipeline.
    pub read: IntCounter,
    /// Records skipped because an earlier run already wrote them.
    pub skipped: IntCounter,
    /// Records whose result reached the sinks (row buffered or dead letter).
    pub finished: IntCounter,
    /// Rows in complete (renamed) files.
    pub rows: IntCounter,
    /// Images encoded.
    pub images: IntCounter,
    /// Texts encoded.
    pub texts: IntCounter,
    /// Dead letters written.
    pub dead_letters: IntCounter,
    /// Records that failed (not written; to be retried by a rerun).
    pub failed: IntCounter,
    /// Input size, when the source knows it.
    pub total: IntGauge,
    /// Records read and not yet finished.
    pub in_flight: IntGauge,
    dead_by_stage_kind: IntCounterVec,
}

impl RecordMetrics {
    fn register(r: &Register) -> Self {
        RecordMetrics {
            read: r.counter(
                "clipstream_records_read_total",
                "Records read from the source.",
            ),
            skipped: r.counter(
                "clipstream_records_skipped_total",
                "Records skipped because an earlier run wrote them.",
            ),
            finished: r.counter(
                "clipstream_records_finished_total",
                "Records whose result reached the sinks.",
            ),
            rows: r.counter(
                "clipstream_rows_written_total",
                "Rows in complete Parquet files.",
            ),
            images: r.counter("clipstream_images_encoded_total", "Images encoded."),
            texts: r.counter("clipstream_texts_encoded_total", "Texts encoded."),
            dead_letters: r.counter(
                "clipstream_dead_letters_written_total",
                "Dead letters written, all kinds.",
            ),
            failed: r.counter(
                "clipstream_records_failed_total",
                "Records that failed (retried by a rerun).",
            ),
            total: r.gauge(
                "clipstream_input_records",
                "Records in the input, when the source knows.",
            ),
            in_flight: r.gauge(
                "clipstream_in_flight_records",
                "Records read and not yet finished.",
            ),
            dead_by_stage_kind: r.counter_vec(
                "clipstream_dead_letters_total",
                "Records set aside as dead letters, by stage and kind.",
                &["stage", "kind"],
            ),
        }
    }
}

/// Live metrics of a run. All methods are cheap and thread-safe.
#[derive(Debug)]
pub struct Stats {
    /// The registry every metric below is in.
    pub registry: Registry,
    /// Records through the pipeline.
    pub records: RecordMetrics,
    /// The fetch stage.
    pub fetch: FetchMetrics,
    /// Decoding and tokenizing.
    pub prep: PrepMetrics,
    /// Batches and the encoders.
    pub encoder: EncoderMetrics,
    /// The queues between stages, and the memory budget.
    pub queues: QueueMetrics,
    /// Parquet files.
    pub parquet: ParquetMetrics,
    /// The Kafka output topics.
    pub outputs: OutputMetrics,
    /// S3 requests.
    pub s3: S3Metrics,
    /// The Kafka source: partitions, lag, commits, backpressure.
    pub kafka: KafkaMetrics,
    /// Review decisions.
    pub review: ReviewMetrics,
    /// Nightly re-embedding progress.
    pub night: NightMetrics,
    /// Readiness: the source is assigned (or needs no assignment) and the
    /// sinks answered.
    pub ready: std::sync::atomic::AtomicBool,
    /// Health: set when a stage failed for good (`/healthz` turns red).
    pub fatal: std::sync::Arc<crate::fatal::Fatal>,
    detail: Mutex<Detail>,
}

#[derive(Debug, Default, Clone)]
struct Detail {
    dead_by_kind: BTreeMap<&'static str, u64>,
    top1: BTreeMap<String, u64>,
    files: Vec<String>,
}

/// A consistent copy of the detailed counters.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Dead letters per kind.
    pub dead_by_kind: BTreeMap<&'static str, u64>,
    /// Top-1 label counts.
    pub top1: BTreeMap<String, u64>,
    /// Files completed, in order.
    pub files: Vec<String>,
}

impl Default for Stats {
    fn default() -> Self {
        let registry = Registry::new();
        let r = Register(&registry);
        r.gauge_vec(
            "clipstream_build_info",
            "clipstream's version (value 1).",
            &["version"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
        Stats {
            records: RecordMetrics::register(&r),
            fetch: FetchMetrics::register(&r),
            prep: PrepMetrics::register(&r),
            encoder: EncoderMetrics::register(&r),
            queues: QueueMetrics::register(&r),
            parquet: ParquetMetrics::register(&r),
            outputs: OutputMetrics::register(&r),
            s3: S3Metrics::register(&r),
            kafka: KafkaMetrics::register(&r),
            review: ReviewMetrics::register(&r),
            night: NightMetrics::register(&r),
            ready: std::sync::atomic::AtomicBool::new(false),
            fatal: std::sync::Arc::new(crate::fatal::Fatal::default()),
            detail: Mutex::new(Detail::default()),
            registry,
        }
    }
}

impl Stats {
    /// Adds `n` to a counter.
    pub fn add(counter: &IntCounter, n: u64) {
        counter.inc_by(n);
    }

    /// Reads a counter.
    pub fn get(counter: &IntCounter) -> u64 {
        counter.get()
    }

    fn detail(&self) -> std::sync::MutexGuard<'_, Detail> {
        self.detail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a dead letter.
    pub fn dead_letter(&self, stage: Stage, kind: Kind) {
        self.records.dead_letters.inc();
        self.records
            .dead_by_stage_kind
            .with_label_values(&[stage.as_str(), kind.as_str()])
            .inc();
        *self.detail().dead_by_kind.entry(kind.as_str()).or_default() += 1;
    }

    /// Counts a row's best label.
    pub fn top1(&self, label: &str) {
        let mut d = self.detail();
        match d.top1.get_mut(label) {
            Some(n) => *n += 1,
            None => {
                d.top1.insert(label.to_string(), 1);
            }
        }
    }

    /// Records a completed output file of `rows` rows.
    pub fn file(&self, name: String, rows: u64, bytes: u64) {
        self.records.rows.inc_by(rows);
        self.parquet.completed(bytes);
        self.detail().files.push(name);
    }

    /// The detailed counters.
    pub fn snapshot(&self) -> Snapshot {
        let d = self.detail();
        Snapshot {
            dead_by_kind: d.dead_by_kind.clone(),
            top1: d.top1.clone(),
            files: d.files.clone(),
        }
    }

    /// Every metric in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        use prometheus::Encoder as _;
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stage's metrics register in one registry without a clash, and
    /// the series of closed label sets exist from the start (at zero), so
    /// that a panel shows 0 rather than "No data".
    #[test]
    fn every_metric_registers_and_closed_sets_start_at_zero() {
        let text = Stats::default().render();
        for series in [
            "clipstream_s3_bytes_total{direction=\"read\"} 0",
            "clipstream_kafka_commits_total{result=\"error\"} 0",
            "clipstream_s3_requests_total{operation=\"upload_part\",result=\"ok\"} 0",
            "clipstream_s3_retries_total{operation=\"list_objects\"} 0",
            "clipstream_kafka_messages_produced_total{output=\"review\"} 0",
            "clipstream_queue_items{queue=\"fetched\"} 0",
            "clipstream_queue_capacity{queue=\"done\"} 0",
            "clipstream_batch_size_count{tower=\"text\"} 0",
            "clipstream_queue_wait_seconds_count{tower=\"vision\"} 0",
            "clipstream_inference_duration_seconds_count{tower=\"vision\"} 0",
            "clipstream_review_total{decision=\"routed\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing");
        }
    }
}
