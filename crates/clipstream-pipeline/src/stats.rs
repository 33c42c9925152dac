//! Counters the engine keeps while it runs. They are Prometheus metrics
//! (one registry per run, `clipstream_` prefix, units in the names, low-
//! cardinality labels only) and also feed the progress display and the final
//! summary. Histogram buckets are set here, in one place.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::dead_letter::{Kind, Stage};

/// A closed set of label values: each is written once, here, and call
/// sites name the variant.
macro_rules! label_values {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $value:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every value.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $value),+
                }
            }
        }
    };
}

label_values! {
    /// `operation` of the S3 metrics.
    S3Op {
        /// GetObject.
        GetObject => "get_object",
        /// HeadObject.
        HeadObject => "head_object",
        /// CreateMultipartUpload.
        CreateMultipartUpload => "create_multipart_upload",
        /// UploadPart.
        UploadPart => "upload_part",
        /// CompleteMultipartUpload.
        CompleteMultipartUpload => "complete_multipart_upload",
        /// ListObjectsV2.
        ListObjects => "list_objects",
        /// DeleteObject.
        DeleteObject => "delete_object",
    }
}

label_values! {
    /// `tower` of the encoder metrics.
    Tower {
        /// The vision tower.
        Vision => "vision",
        /// The text tower.
        Text => "text",
    }
}

label_values! {
    /// `output` of `clipstream_kafka_messages_produced_total`.
    Output {
        /// The embeddings topic.
        Embeddings => "embeddings",
        /// The labels topic.
        Labels => "labels",
        /// The dead-letter topic.
        DeadLetters => "dead_letters",
        /// The review topic.
        Review => "review",
    }
}

label_values! {
    /// `decision` of `clipstream_review_total`.
    ReviewDecision {
        /// Confident enough: no person needs to look.
        Accepted => "accepted",
        /// Routed to a person.
        Routed => "routed",
    }
}

label_values! {
    /// `queue` of the queue gauges.
    Queue {
        /// Source to fetch.
        Records => "records",
        /// Fetch to prep.
        Fetched => "fetched",
        /// Prep to the vision batcher.
        Vision => "vision",
        /// Prep to the text batcher.
        Text => "text",
        /// Results to the outputs stage.
        Done => "done",
    }
}

label_values! {
    /// `result` of the commit and S3 request counters.
    ResultLabel {
        /// Succeeded.
        Ok => "ok",
        /// Failed.
        Error => "error",
    }
}

label_values! {
    /// `direction` of `clipstream_s3_bytes_total`.
    Direction {
        /// Read from S3.
        Read => "read",
        /// Written to S3.
        Written => "written",
    }
}

/// Every labelled metric with the values each of its labels can take — the
/// contract the dashboards and the ops fake exporter are checked against
/// (`clipstream_kafka_consumer_lag_records` takes topics and partitions, and
/// `clipstream_encoder_info` / `clipstream_build_info` names and versions:
/// open sets, not listed).
pub fn label_values() -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    let s3_ops: Vec<&str> = S3Op::ALL.iter().map(|o| o.as_str()).collect();
    let towers: Vec<&str> = Tower::ALL.iter().map(|t| t.as_str()).collect();
    let results: Vec<&str> = ResultLabel::ALL.iter().map(|r| r.as_str()).collect();
    vec![
        (
            "clipstream_dead_letters_total",
            "stage",
            Stage::ALL.iter().map(|s| s.as_str()).collect(),
        ),
        (
            "clipstream_dead_letters_total",
            "kind",
            Kind::ALL.iter().map(|k| k.as_str()).collect(),
        ),
        ("clipstream_batch_size", "tower", towers.clone()),
        (
            "clipstream_inference_duration_seconds",
            "tower",
            towers.clone(),
        ),
        ("clipstream_queue_wait_seconds", "tower", towers),
        (
            "clipstream_queue_items",
            "queue",
            Queue::ALL.iter().map(|q| q.as_str()).collect(),
        ),
        (
            "clipstream_queue_capacity",
            "queue",
            Queue::ALL.iter().map(|q| q.as_str()).collect(),
        ),
        ("clipstream_s3_requests_total", "operation", s3_ops.clone()),
        ("clipstream_s3_requests_total", "result", results.clone()),
        ("clipstream_s3_retries_total", "operation", s3_ops.clone()),
        (
            "clipstream_s3_request_duration_seconds",
            "operation",
            s3_ops,
        ),
        (
            "clipstream_s3_bytes_total",
            "direction",
            Direction::ALL.iter().map(|d| d.as_str()).collect(),
        ),
        ("clipstream_kafka_commits_total", "result", results),
        (
            "clipstream_review_total",
            "decision",
            ReviewDecision::ALL.iter().map(|d| d.as_str()).collect(),
        ),
        (
            "clipstream_kafka_messages_produced_total",
            "output",
            Output::ALL.iter().map(|o| o.as_str()).collect(),
        ),
    ]
}

/// Buckets of `clipstream_batch_size`.
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
/// Buckets of the `_seconds` histograms.
const SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Live counters of a run. All methods are cheap and thread-safe.
#[derive(Debug)]
pub struct Stats {
    /// The registry every metric below is in.
    pub registry: Registry,
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
    batch_size: HistogramVec,
    inference_seconds: HistogramVec,
    /// Time to fetch one object.
    pub fetch_seconds: Histogram,
    /// Time to decode and preprocess one image.
    pub decode_seconds: Histogram,
    /// Time to close (write, sync, rename) one Parquet file.
    pub write_seconds: Histogram,
    /// Parquet files completed.
    pub parquet_files: IntCounter,
    /// Bytes of completed Parquet files.
    pub parquet_bytes: IntCounter,
    encoder_info: IntGaugeVec,
    /// Time to tokenize one text.
    pub tokenize_seconds: Histogram,
    /// Time an input waits in its tower's queue before its batch runs.
    pub queue_wait_seconds: HistogramVec,
    /// Items in each queue between stages (sampled).
    pub queue_items: IntGaugeVec,
    /// Capacity of each queue.
    pub queue_capacity: IntGaugeVec,
    /// S3 requests by operation and result.
    pub s3_requests: IntCounterVec,
    /// S3 retries by operation.
    pub s3_retries: IntCounterVec,
    /// S3 bytes read and written.
    pub s3_bytes: IntCounterVec,
    /// Time per S3 request attempt, by operation.
    pub s3_seconds: HistogramVec,
    /// Consumer lag per assigned partition (from librdkafka statistics).
    pub kafka_lag: IntGaugeVec,
    /// Time of one offset commit.
    pub kafka_commit_seconds: Histogram,
    /// Offset commits by result.
    pub kafka_commits: IntCounterVec,
    /// Partitions assigned to this worker.
    pub kafka_assigned: IntGauge,
    /// 1 while the source has paused its partitions because the pipeline
    /// stayed full (backpressure), else 0.
    pub kafka_paused: IntGauge,
    /// Times the source paused its partitions for backpressure.
    pub kafka_pauses: IntCounter,
    /// Assigned partitions still paused while their committed offset is
    /// read and their leftover files removed.
    pub kafka_starting: IntGauge,
    /// Failed attempts to start a partition (offset lookup, listing,
    /// deletion), each retried.
    pub kafka_start_retries: IntCounter,
    /// Bytes charged to the memory budget (sampled).
    pub memory_in_flight: IntGauge,
    /// The memory budget.
    pub memory_budget: IntGauge,
    /// Messages delivered to output topics, by output.
    pub kafka_produced: IntCounterVec,
    /// Events planned per night (`clipstream plan --publish`'s headers).
    night_planned: IntGaugeVec,
    /// Labelled rows accepted or routed to review.
    review: IntCounterVec,
    /// When each night was published (Unix seconds).
    night_published: IntGaugeVec,
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
    /// The nights shown, least recently seen first.
    nights: Vec<String>,
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

/// Registers a metric and returns it (a handle: clones share the value).
fn register<M: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    m: prometheus::Result<M>,
) -> M {
    let m = m.expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    register(r, IntCounter::new(name, help))
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    register(r, IntGauge::new(name, help))
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    register(
        r,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())),
    )
}

impl Default for Stats {
    fn default() -> Self {
        let r = Registry::new();
        let dead_by_stage_kind = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "clipstream_dead_letters_total",
                    "Records set aside as dead letters, by stage and kind.",
                ),
                &["stage", "kind"],
            ),
        );
        let batch_size = register(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "clipstream_batch_size",
                    "Inputs per encoder batch, by tower.",
                )
                .buckets(BATCH_BUCKETS.to_vec()),
                &["tower"],
            ),
        );
        let inference_seconds = register(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "clipstream_inference_duration_seconds",
                    "ONNX Runtime time per batch, by tower.",
                )
                .buckets(SECONDS_BUCKETS.to_vec()),
                &["tower"],
            ),
        );
        let encoder_info = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "clipstream_encoder_info",
                    "The model and execution provider in use (value 1).",
                ),
                &["model", "provider"],
            ),
        );
        let build_info = register(
            &r,
            IntGaugeVec::new(
                Opts::new("clipstream_build_info", "clipstream's version (value 1)."),
                &["version"],
            ),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let vec_counter = |name: &str, help: &str, labels: &[&str]| {
            register(&r, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let vec_gauge = |name: &str, help: &str, labels: &[&str]| {
            register(&r, IntGaugeVec::new(Opts::new(name, help), labels))
        };
        let vec_seconds = |name: &str, help: &str, labels: &[&str]| {
            register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(SECONDS_BUCKETS.to_vec()),
                    labels,
                ),
            )
        };
        let tokenize_seconds = histogram(
            &r,
            "clipstream_tokenize_duration_seconds",
            "Time to tokenize one text.",
            &SECONDS_BUCKETS,
        );
        let queue_wait_seconds = vec_seconds(
            "clipstream_queue_wait_seconds",
            "Time an input waits for its encoder batch to start, by tower.",
            &["tower"],
        );
        let queue_items = vec_gauge(
            "clipstream_queue_items",
            "Items waiting in each queue between stages.",
            &["queue"],
        );
        let queue_capacity = vec_gauge(
            "clipstream_queue_capacity",
            "Capacity of each queue between stages.",
            &["queue"],
        );
        let s3_requests = vec_counter(
            "clipstream_s3_requests_total",
            "S3 request attempts, by operation and result.",
            &["operation", "result"],
        );
        let s3_retries = vec_counter(
            "clipstream_s3_retries_total",
            "S3 requests retried after a transient error, by operation.",
            &["operation"],
        );
        let s3_bytes = vec_counter(
            "clipstream_s3_bytes_total",
            "Bytes read from and written to S3.",
            &["direction"],
        );
        let s3_seconds = vec_seconds(
            "clipstream_s3_request_duration_seconds",
            "Time of one S3 request attempt, by operation.",
            &["operation"],
        );
        let kafka_lag = vec_gauge(
            "clipstream_kafka_consumer_lag_records",
            "Records behind the end of each assigned partition.",
            &["topic", "partition"],
        );
        let kafka_commit_seconds = histogram(
            &r,
            "clipstream_kafka_commit_duration_seconds",
            "Time of one offset commit.",
            &SECONDS_BUCKETS,
        );
        let kafka_commits = vec_counter(
            "clipstream_kafka_commits_total",
            "Offset commits, by result.",
            &["result"],
        );
        let kafka_produced = vec_counter(
            "clipstream_kafka_messages_produced_total",
            "Messages delivered to output topics, by output.",
            &["output"],
        );
        let night_planned = vec_gauge(
            "clipstream_night_planned",
            "Events a night planned (from the headers of its events; the two nights seen last).",
            &["night"],
        );
        let night_published = vec_gauge(
            "clipstream_night_published_timestamp_seconds",
            "When a night's events were published (from their headers): the newest is tonight's.",
            &["night"],
        );
        let review = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "clipstream_review_total",
                    "Labelled rows by review decision (accepted, routed to a person), with [model] review thresholds.",
                ),
                &["decision"],
            ),
        );
        for d in ReviewDecision::ALL {
            review.with_label_values(&[d.as_str()]);
        }
        let kafka_assigned = gauge(
            &r,
            "clipstream_kafka_assigned_partitions",
            "Partitions assigned to this worker.",
        );
        let kafka_paused = gauge(
            &r,
            "clipstream_kafka_source_paused",
            "1 while the Kafka source has paused its partitions because the pipeline stayed full (backpressure), else 0.",
        );
        let kafka_starting = gauge(
            &r,
            "clipstream_kafka_partitions_starting",
            "Assigned partitions still paused while their committed offset is read and leftover output files are removed.",
        );
        let kafka_start_retries = counter(
            &r,
            "clipstream_kafka_partition_start_retries_total",
            "Failed attempts to start an assigned partition (committed-offset lookup, listing or deleting leftover files); each is retried.",
        );
        let memory_in_flight = gauge(
            &r,
            "clipstream_memory_in_flight_bytes",
            "Bytes of records in flight charged to the memory budget (events, objects, images, model inputs, rows).",
        );
        let memory_budget = gauge(
            &r,
            "clipstream_memory_budget_bytes",
            "The memory budget of records in flight (engine.max_bytes_in_flight).",
        );
        let kafka_pauses = counter(
            &r,
            "clipstream_kafka_source_pauses_total",
            "Times the Kafka source paused its partitions because the pipeline stayed full.",
        );
        // Every series of a closed set exists from the start (at zero), so
        // that a panel shows 0 rather than "No data".
        for d in Direction::ALL {
            s3_bytes.with_label_values(&[d.as_str()]);
        }
        for res in ResultLabel::ALL {
            kafka_commits.with_label_values(&[res.as_str()]);
        }
        for op in S3Op::ALL {
            s3_retries.with_label_values(&[op.as_str()]);
            for res in ResultLabel::ALL {
                s3_requests.with_label_values(&[op.as_str(), res.as_str()]);
            }
        }
        for o in Output::ALL {
            kafka_produced.with_label_values(&[o.as_str()]);
        }
        for q in Queue::ALL {
            queue_items.with_label_values(&[q.as_str()]);
            queue_capacity.with_label_values(&[q.as_str()]);
        }
        for t in Tower::ALL {
            queue_wait_seconds.with_label_values(&[t.as_str()]);
            batch_size.with_label_values(&[t.as_str()]);
            inference_seconds.with_label_values(&[t.as_str()]);
        }
        Stats {
            tokenize_seconds,
            queue_wait_seconds,
            queue_items,
            queue_capacity,
            s3_requests,
            s3_retries,
            s3_bytes,
            s3_seconds,
            kafka_lag,
            kafka_commit_seconds,
            kafka_commits,
            kafka_assigned,
            kafka_paused,
            kafka_pauses,
            kafka_starting,
            kafka_start_retries,
            memory_in_flight,
            memory_budget,
            kafka_produced,
            night_planned,
            night_published,
            review,
            ready: std::sync::atomic::AtomicBool::new(false),
            fatal: std::sync::Arc::new(crate::fatal::Fatal::default()),
            read: counter(
                &r,
                "clipstream_records_read_total",
                "Records read from the source.",
            ),
            skipped: counter(
                &r,
                "clipstream_records_skipped_total",
                "Records skipped because an earlier run wrote them.",
            ),
            finished: counter(
                &r,
                "clipstream_records_finished_total",
                "Records whose result reached the sinks.",
            ),
            rows: counter(
                &r,
                "clipstream_rows_written_total",
                "Rows in complete Parquet files.",
            ),
            images: counter(&r, "clipstream_images_encoded_total", "Images encoded."),
            texts: counter(&r, "clipstream_texts_encoded_total", "Texts encoded."),
            dead_letters: counter(
                &r,
                "clipstream_dead_letters_written_total",
                "Dead letters written, all kinds.",
            ),
            failed: counter(
                &r,
                "clipstream_records_failed_total",
                "Records that failed (retried by a rerun).",
            ),
            total: gauge(
                &r,
                "clipstream_input_records",
                "Records in the input, when the source knows.",
            ),
            in_flight: gauge(
                &r,
                "clipstream_in_flight_records",
                "Records read and not yet finished.",
            ),
            fetch_seconds: histogram(
                &r,
                "clipstream_fetch_duration_seconds",
                "Time to fetch one object.",
                &SECONDS_BUCKETS,
            ),
            decode_seconds: histogram(
                &r,
                "clipstream_decode_duration_seconds",
                "Time to decode and preprocess one image.",
                &SECONDS_BUCKETS,
            ),
            write_seconds: histogram(
                &r,
                "clipstream_parquet_close_duration_seconds",
                "Time to complete one Parquet file (write, sync, rename).",
                &SECONDS_BUCKETS,
            ),
            parquet_files: counter(
                &r,
                "clipstream_parquet_files_total",
                "Parquet files completed.",
            ),
            parquet_bytes: counter(
                &r,
                "clipstream_parquet_bytes_total",
                "Bytes of completed Parquet files.",
            ),
            dead_by_stage_kind,
            batch_size,
            inference_seconds,
            encoder_info,
            registry: r,
            detail: Mutex::new(Detail::default()),
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
        self.dead_letters.inc();
        self.dead_by_stage_kind
            .with_label_values(&[stage.as_str(), kind.as_str()])
            .inc();
        *self.detail().dead_by_kind.entry(kind.as_str()).or_default() += 1;
    }

    /// Records one encoder batch.
    pub fn batch(&self, tower: &str, size: usize, took: Duration) {
        self.batch_size
            .with_label_values(&[tower])
            .observe(size as f64);
        self.inference_seconds
            .with_label_values(&[tower])
            .observe(took.as_secs_f64());
    }

    /// Records the model in use.
    pub fn encoder(&self, model: &str, provider: &str) {
        self.encoder_info
            .with_label_values(&[model, provider])
            .set(1);
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

    /// Records a completed output file.
    pub fn file(&self, name: String, bytes: u64) {
        self.parquet_files.inc();
        self.parquet_bytes.inc_by(bytes);
        self.detail().files.push(name);
    }

    /// Shows how many events a night planned, keeping the two nights seen
    /// last: a fleet that runs every night does not grow a series a night.
    pub fn night(&self, mark: &crate::catalog::progress::NightMark) {
        let mut d = self.detail();
        d.nights.retain(|n| *n != mark.night);
        d.nights.push(mark.night.clone());
        while d.nights.len() > 2 {
            let old = d.nights.remove(0);
            let _ = self.night_planned.remove_label_values(&[&old]);
            let _ = self.night_published.remove_label_values(&[&old]);
        }
        self.night_planned
            .with_label_values(&[&mark.night])
            .set(i64::try_from(mark.planned).unwrap_or(i64::MAX));
        self.night_published
            .with_label_values(&[&mark.night])
            .set(i64::try_from(mark.published).unwrap_or(i64::MAX));
    }

    /// Counts a labelled row's review decision.
    pub fn review(&self, routed: bool) {
        let d = if routed {
            ReviewDecision::Routed
        } else {
            ReviewDecision::Accepted
        };
        self.review.with_label_values(&[d.as_str()]).inc();
    }

    /// Rows routed to review so far.
    pub fn routed(&self) -> u64 {
        self.review
            .with_label_values(&[ReviewDecision::Routed.as_str()])
            .get()
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
