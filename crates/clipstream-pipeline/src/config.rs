//! Pipeline configuration: one TOML file per pipeline (see `pipelines/`).
//!
//! Parsing is strict (`deny_unknown_fields`), `${VAR}` / `${VAR:-default}`
//! in the text are replaced from the environment first (secrets and
//! endpoints), and validation is pure: every problem is listed with its path
//! in the file before anything touches a model, a broker or a disk. Relative
//! paths are relative to the directory of the config file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clipstream_model::{DecodeLimits, RuntimeOptions, Variant};
use serde::{Deserialize, Serialize};

/// The whole pipeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// The model and its label set.
    pub model: ModelConfig,
    /// ONNX Runtime: library, execution providers, threads.
    #[serde(default)]
    pub runtime: RuntimeOptions,
    /// Where events come from.
    pub source: SourceConfig,
    /// The S3 client (fetching images, writing Parquet).
    #[serde(default)]
    pub s3: S3Config,
    /// How referenced objects are fetched.
    #[serde(default)]
    pub fetch: FetchConfig,
    /// Image decoding limits and options.
    #[serde(default)]
    pub image: ImageConfig,
    /// Concurrency, queues and batching.
    #[serde(default)]
    pub engine: EngineConfig,
    /// Outputs.
    pub sink: SinkConfig,
    /// Where bad input goes.
    #[serde(default)]
    pub dead_letter: DeadLetterConfig,
    /// Stopping.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Prometheus metrics and health endpoints.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `[metrics]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP server for `/metrics`, `/healthz` and `/readyz`
    /// (e.g. `"0.0.0.0:9464"`). Default: no server.
    #[serde(default)]
    pub listen: Option<String>,
}

/// `[model]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Model directory (Hugging Face / transformers.js ONNX layout).
    pub dir: PathBuf,
    /// Export variant: `fp32` (default), `fp16`, `quantized`, ...
    #[serde(default)]
    pub variant: Variant,
    /// Zero-shot label set (TOML); no labels when absent.
    #[serde(default)]
    pub labels: Option<PathBuf>,
    /// Labels kept per image. Default 5.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Route a row to review when its top-1 score is below this (0 to 1;
    /// `clipstream eval` prints the value for a target precision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review_min_score: Option<f32>,
    /// Route a row to review when its top-1 score is less than this above
    /// the second label's (0 to 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review_min_margin: Option<f32>,
}

fn default_top_k() -> usize {
    5
}

/// `[source]`: `kind = "files"` or `kind = "kafka"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// Local input: a JSONL manifest of events, or a directory of images.
    Files(FilesSourceConfig),
    /// A Kafka consumer group.
    Kafka(KafkaSourceConfig),
}

/// `[source]` with `kind = "kafka"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap servers, `host:port,host:port`.
    pub brokers: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Consumer group: workers sharing it share the partitions.
    pub group_id: String,
    /// How often acknowledged offsets are committed, in ms. Default 1000.
    #[serde(default = "default_commit_interval")]
    pub commit_interval_ms: u64,
    /// Group session timeout, in ms. Default 45000.
    #[serde(default = "default_session_timeout")]
    pub session_timeout_ms: u64,
    /// On a rebalance, how long the records of revoked partitions may take
    /// to finish before their offsets are committed, in ms; below
    /// `session_timeout_ms`. Default 20000.
    #[serde(default = "default_rebalance_drain")]
    pub drain_deadline_ms: u64,
    /// Where a group without a committed offset starts: `earliest` or
    /// `latest`. Default `earliest`.
    #[serde(default = "default_offset_reset")]
    pub auto_offset_reset: String,
    /// Messages larger than this are dead letters. Default 1 MiB.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    /// Raw librdkafka properties, applied last (security, tuning).
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
}

fn default_commit_interval() -> u64 {
    1000
}
fn default_session_timeout() -> u64 {
    45_000
}
fn default_rebalance_drain() -> u64 {
    20_000
}
fn default_offset_reset() -> String {
    "earliest".into()
}

/// `[s3]`: the S3 client. Credentials come from the standard AWS chain
/// (environment, profile, web identity, instance metadata).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL for S3-compatible stores (MinIO, Ceph, ...). Default:
    /// AWS.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region. Default: from the environment, else `us-east-1`.
    #[serde(default)]
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), which most
    /// S3-compatible stores need. Default false.
    #[serde(default)]
    pub force_path_style: bool,
    /// Time limit of one request attempt, in ms. Default 10000.
    #[serde(default = "default_s3_timeout")]
    pub request_timeout_ms: u64,
    /// Attempts per request (throttling, 5xx and timeouts are retried with
    /// exponential backoff and jitter). Default 5.
    #[serde(default = "default_s3_attempts")]
    pub max_attempts: u32,
    /// First backoff, in ms; doubles per attempt. Default 100.
    #[serde(default = "default_s3_backoff")]
    pub backoff_ms: u64,
}

fn default_s3_timeout() -> u64 {
    10_000
}
fn default_s3_attempts() -> u32 {
    5
}
fn default_s3_backoff() -> u64 {
    100
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: None,
            region: None,
            force_path_style: false,
            request_timeout_ms: default_s3_timeout(),
            max_attempts: default_s3_attempts(),
            backoff_ms: default_s3_backoff(),
        }
    }
}

/// `[source]` with `kind = "files"`. Exactly one of `manifest` / `dir`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilesSourceConfig {
    /// JSONL file, one event per line: `{"id", "image", "text", "attributes"}`.
    /// Relative image paths are relative to the manifest's directory.
    #[serde(default)]
    pub manifest: Option<PathBuf>,
    /// Directory of images (searched recursively); id = path relative to it;
    /// a `NAME.txt` beside `NAME.jpg` is its caption.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Events larger than this are dead letters. Default 1 MiB.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
}

fn default_max_event_bytes() -> usize {
    1 << 20
}

/// `[fetch]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FetchConfig {
    /// URI schemes events may reference: `file`, `s3`. Default `["file"]`
    /// for the files source.
    #[serde(default = "default_schemes")]
    pub allowed_schemes: Vec<String>,
    /// Buckets `s3://` URIs may name; required when `s3` is allowed.
    #[serde(default)]
    pub allowed_buckets: Vec<String>,
    /// Objects larger than this are dead letters. Default 64 MiB.
    #[serde(default = "default_max_object_bytes")]
    pub max_object_bytes: u64,
    /// Concurrent fetches. Default 16.
    #[serde(default = "default_fetch_concurrency")]
    pub concurrency: usize,
    /// Local files (`file://` and bare paths) must lie under this directory
    /// once `..` and symbolic links are resolved. Default: the manifest's
    /// directory (or the images directory).
    #[serde(default)]
    pub root: Option<PathBuf>,
}

fn default_schemes() -> Vec<String> {
    vec!["file".into()]
}
fn default_max_object_bytes() -> u64 {
    64 << 20
}
fn default_fetch_concurrency() -> usize {
    16
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            allowed_schemes: default_schemes(),
            allowed_buckets: Vec::new(),
            max_object_bytes: default_max_object_bytes(),
            concurrency: default_fetch_concurrency(),
            root: None,
        }
    }
}

/// `[image]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// Byte and pixel limits (`max_bytes`, `max_pixels`).
    #[serde(default, flatten)]
    pub limits: DecodeLimits,
    /// Apply EXIF orientation (transformers does not). Default false.
    #[serde(default)]
    pub apply_exif_orientation: bool,
    /// `exact` (default: bit-identical to transformers) or `fast` (large
    /// JPEGs decoded at a reduced DCT scale; several times less CPU on big
    /// photos, embeddings within a small cosine distance of exact).
    #[serde(default)]
    pub mode: clipstream_model::preprocess::ImageMode,
}

/// `[engine]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Records being processed at once (read but not yet written); bounds
    /// memory whatever the backlog. Default 256.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Threads decoding, resizing and tokenizing. 0 = one per core. Default 0.
    #[serde(default)]
    pub prep_threads: usize,
    /// Capacity of each queue between stages. Default 64.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// The memory budget of the records in flight, in bytes: their events,
    /// fetched objects, decoded images, model inputs, and rows until their
    /// files are written. The source and the fetch stage wait while it is
    /// spent. Default 1 GiB.
    #[serde(default = "default_max_bytes_in_flight")]
    pub max_bytes_in_flight: u64,
    /// Image tower batching.
    #[serde(default = "default_vision_batch")]
    pub vision_batch: BatchConfig,
    /// Text tower batching.
    #[serde(default = "default_text_batch")]
    pub text_batch: BatchConfig,
}

fn default_max_in_flight() -> usize {
    256
}
fn default_queue() -> usize {
    64
}
fn default_max_bytes_in_flight() -> u64 {
    1 << 30
}
fn default_vision_batch() -> BatchConfig {
    BatchConfig {
        max_size: 32,
        max_wait_ms: 20,
    }
}
fn default_text_batch() -> BatchConfig {
    BatchConfig {
        max_size: 64,
        max_wait_ms: 20,
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_in_flight: default_max_in_flight(),
            prep_threads: 0,
            queue_capacity: default_queue(),
            max_bytes_in_flight: default_max_bytes_in_flight(),
            vision_batch: default_vision_batch(),
            text_batch: default_text_batch(),
        }
    }
}

/// Dynamic batching of one tower.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Largest batch.
    pub max_size: usize,
    /// Longest a batch waits for more items after its first, in ms.
    pub max_wait_ms: u64,
}

impl BatchConfig {
    /// `max_wait_ms` as a duration.
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }
}

/// `[sink]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Parquet output.
    pub parquet: ParquetConfig,
    /// Kafka output topics.
    #[serde(default)]
    pub kafka: Option<KafkaSinkConfig>,
}

/// `[sink.kafka]`: one JSON message per record, keyed by id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Bootstrap servers. Default: the source's.
    #[serde(default)]
    pub brokers: Option<String>,
    /// Topic for embeddings.
    #[serde(default)]
    pub embeddings_topic: Option<String>,
    /// Topic for top-k labels (records with an image, when a label set is
    /// configured).
    #[serde(default)]
    pub labels_topic: Option<String>,
    /// Topic for the records routed to review (`[model] review_min_score`
    /// / `review_min_margin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review_topic: Option<String>,
    /// Raw librdkafka producer properties, applied last.
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
}

/// `[sink.parquet]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParquetConfig {
    /// Output directory (local). Exactly one of `dir` / `url`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Output on S3: `s3://bucket/prefix/`. Files are built in
    /// `spool_dir`, then uploaded with a multipart upload: an object
    /// appears only when complete.
    #[serde(default)]
    pub url: Option<String>,
    /// Local directory for files being built before upload. Default: the
    /// system temp directory.
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
    /// Size of multipart upload parts. Default 16 MiB (S3's minimum is 5).
    #[serde(default = "default_part_bytes")]
    pub part_bytes: usize,
    /// Hive-style folders by the record's date (`dt=YYYY-MM-DD/`, from the
    /// event time). Default false.
    #[serde(default)]
    pub partition_by_date: bool,
    /// Roll a file when a record's event time is this many seconds after
    /// the file's first (record time, never wall-clock time, so replays
    /// make the same files). Default: no limit.
    #[serde(default)]
    pub max_file_span_secs: Option<u64>,
    /// Rows per file before rolling. Default 10,000.
    #[serde(default = "default_rows_per_file")]
    pub max_rows_per_file: usize,
    /// Bytes per file (compressed, approximate) before rolling. Default 256 MiB.
    #[serde(default = "default_bytes_per_file")]
    pub max_bytes_per_file: u64,
    /// Rows per row group. Default 1,024.
    #[serde(default = "default_row_group")]
    pub row_group_rows: usize,
    /// zstd level (1-22). Default 3.
    #[serde(default = "default_zstd")]
    pub zstd_level: i32,
}

fn default_part_bytes() -> usize {
    16 << 20
}
fn default_rows_per_file() -> usize {
    10_000
}
fn default_bytes_per_file() -> u64 {
    256 << 20
}
fn default_row_group() -> usize {
    1024
}
fn default_zstd() -> i32 {
    3
}

/// `[dead_letter]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// JSONL file for dead letters. Default: `_dead_letters.jsonl` in the
    /// Parquet directory (local output).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Kafka dead-letter topic: the original key, value and headers, plus
    /// `clipstream.*` headers saying why. Uses `[sink.kafka]`'s brokers.
    #[serde(default)]
    pub topic: Option<String>,
}

/// `[shutdown]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// On SIGINT/SIGTERM, how long in-flight records may take to drain, in
    /// seconds. Default 20.
    #[serde(default = "default_drain")]
    pub drain_deadline_secs: f64,
}

fn default_drain() -> f64 {
    20.0
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_deadline_secs: default_drain(),
        }
    }
}

/// Removes `.` and `dir/..` pairs without touching the file system, so that
/// messages show `out/local` rather than `pipelines/../out/local`; a path
/// that cancels out entirely is `.`.
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !matches!(out.components().next_back(), Some(Component::Normal(_))) || !out.pop()
                {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// A problem found in a config, with its path in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Dotted path (`engine.vision_batch.max_size`), or `-` for the file.
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Problems of a config file, all of them.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {} problem(s):\n{}", .problems.len(), .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// Every problem.
    pub problems: Vec<Problem>,
}

/// Replaces `${VAR}` and `${VAR:-default}` from `env`. A variable that is
/// unset and has no default is a problem (reported by name and line).
pub fn interpolate(
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, Vec<Problem>> {
    let mut out = String::with_capacity(text.len());
    let mut problems = Vec::new();
    for (lineno, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                problems.push(Problem {
                    path: format!("line {}", lineno + 1),
                    message: "unterminated `${`".into(),
                });
                out.push_str(&rest[start..]);
                rest = "";
                break;
            };
            let inner = &after[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            match (valid, env(name), default) {
                (false, _, _) => problems.push(Problem {
                    path: format!("line {}", lineno + 1),
                    message: format!("`${{{inner}}}` is not a valid variable reference"),
                }),
                (true, Some(v), _) => out.push_str(&v),
                (true, None, Some(d)) => out.push_str(d),
                (true, None, None) => problems.push(Problem {
                    path: format!("line {}", lineno + 1),
                    message: format!("environment variable {name} is not set (use ${{{name}:-default}} for a default)"),
                }),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

impl PipelineConfig {
    /// Reads, interpolates, parses and validates a config file, making its
    /// relative paths absolute.
    pub fn load(path: &Path) -> Result<PipelineConfig, ConfigError> {
        let fail = |problems| ConfigError {
            file: path.to_path_buf(),
            problems,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            fail(vec![Problem {
                path: "-".into(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::from_toml(&text, &base, |k| std::env::var(k).ok()).map_err(fail)
    }

    /// Parses TOML text; relative paths are resolved against `base`.
    pub fn from_toml(
        text: &str,
        base: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<PipelineConfig, Vec<Problem>> {
        let text = interpolate(text, env)?;
        let mut cfg: PipelineConfig = toml::from_str(&text).map_err(|e| {
            let path = e
                .span()
                .map(|s| format!("line {}", text[..s.start].matches('\n').count() + 1))
                .unwrap_or_else(|| "-".into());
            vec![Problem {
                path,
                message: e.message().to_string(),
            }]
        })?;
        cfg.resolve_paths(base);
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = normalize(&base.join(&*p));
            }
        };
        abs(&mut self.model.dir);
        if let Some(l) = &mut self.model.labels {
            abs(l);
        }
        if let Some(l) = &mut self.runtime.library {
            abs(l);
        }
        match &mut self.source {
            SourceConfig::Files(f) => {
                if let Some(m) = &mut f.manifest {
                    abs(m);
                }
                if let Some(d) = &mut f.dir {
                    abs(d);
                }
            }
            SourceConfig::Kafka(_) => {}
        }
        if let Some(d) = &mut self.sink.parquet.dir {
            abs(d);
        }
        if let Some(r) = &mut self.fetch.root {
            abs(r);
        }
        if let Some(d) = &mut self.sink.parquet.spool_dir {
            abs(d);
        }
        if let Some(p) = &mut self.dead_letter.path {
            abs(p);
        }
    }

    /// Checks every value; no I/O.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut p = Vec::new();
        let mut bad = |path: &str, message: String| {
            p.push(Problem {
                path: path.into(),
                message,
            })
        };
        if self.model.top_k == 0 {
            bad("model.top_k", "must be at least 1".into());
        }
        for (key, v) in [
            ("model.review_min_score", self.model.review_min_score),
            ("model.review_min_margin", self.model.review_min_margin),
        ] {
            if let Some(v) = v {
                if !(0.0..=1.0).contains(&v) {
                    bad(key, format!("must be between 0 and 1, got {v}"));
                }
                if self.model.labels.is_none() {
                    bad(
                        key,
                        "review routing needs labels: set `labels` (a label set) in [model]".into(),
                    );
                }
            }
        }
        let reviewing = self.review().active();
        let review_topic = self
            .sink
            .kafka
            .as_ref()
            .and_then(|k| k.review_topic.as_ref());
        if reviewing && review_topic.is_none() && self.sink.parquet.dir.is_none() {
            bad(
                "sink.kafka.review_topic",
                "records routed to review need a place: set `review_topic`, or write Parquet locally \
                 (`[sink.parquet] dir`, which gets `_review.jsonl`)"
                    .into(),
            );
        }
        if let Some(t) = review_topic {
            if t.trim().is_empty() {
                bad("sink.kafka.review_topic", "must not be empty".into());
            }
            if let SourceConfig::Kafka(k) = &self.source
                && k.topics.contains(t)
            {
                bad(
                    "sink.kafka.review_topic",
                    format!(
                        "{t:?} is a topic this pipeline reads: the workers would read their own reviews"
                    ),
                );
            }
        }
        if reviewing && review_topic.is_none() && matches!(self.source, SourceConfig::Kafka(_)) {
            bad(
                "sink.kafka.review_topic",
                "a Kafka fleet routes to a topic (one `_review.jsonl` cannot take the lines of \
                 several workers): set `review_topic`"
                    .into(),
            );
        }
        if review_topic.is_some() && !reviewing {
            bad(
                "sink.kafka.review_topic",
                "nothing is routed to it: set `[model] review_min_score` and/or `review_min_margin`"
                    .into(),
            );
        }
        match &self.source {
            SourceConfig::Files(f) => {
                match (&f.manifest, &f.dir) {
                    (Some(_), Some(_)) => bad("source", "set `manifest` or `dir`, not both".into()),
                    (None, None) => bad(
                        "source",
                        "set `manifest` (a JSONL file) or `dir` (a directory of images)".into(),
                    ),
                    _ => {}
                }
                if f.max_event_bytes == 0 {
                    bad("source.max_event_bytes", "must be positive".into());
                }
            }
            SourceConfig::Kafka(k) => {
                if k.brokers.trim().is_empty() {
                    bad(
                        "source.brokers",
                        "list the bootstrap servers, `host:port,...`".into(),
                    );
                }
                if k.topics.is_empty() || k.topics.iter().any(|t| t.trim().is_empty()) {
                    bad(
                        "source.topics",
                        "name at least one topic, none empty".into(),
                    );
                }
                if k.group_id.trim().is_empty() {
                    bad("source.group_id", "must not be empty".into());
                }
                if k.max_event_bytes == 0 {
                    bad("source.max_event_bytes", "must be positive".into());
                }
                if k.commit_interval_ms == 0 {
                    bad("source.commit_interval_ms", "must be positive".into());
                }
                if k.drain_deadline_ms >= k.session_timeout_ms {
                    bad(
                        "source.drain_deadline_ms",
                        format!(
                            "{} must be below source.session_timeout_ms ({}), or the group evicts the worker while it drains",
                            k.drain_deadline_ms, k.session_timeout_ms
                        ),
                    );
                }
                if !matches!(k.auto_offset_reset.as_str(), "earliest" | "latest") {
                    bad(
                        "source.auto_offset_reset",
                        format!("{:?}: use \"earliest\" or \"latest\"", k.auto_offset_reset),
                    );
                }
                if self.fetch.allowed_schemes.iter().any(|s| s == "file") {
                    bad(
                        "fetch.allowed_schemes",
                        "`file` lets any event read this worker's files; Kafka pipelines allow only \"s3\"".into(),
                    );
                }
            }
        }
        if self.fetch.allowed_schemes.iter().any(|s| s == "s3")
            && self.fetch.allowed_buckets.is_empty()
        {
            bad(
                "fetch.allowed_buckets",
                "list the buckets events may reference (an allow-list), e.g. [\"my-images\"]"
                    .into(),
            );
        }
        if self.s3.max_attempts == 0 {
            bad("s3.max_attempts", "must be at least 1".into());
        }
        if self.s3.request_timeout_ms == 0 {
            bad("s3.request_timeout_ms", "must be positive".into());
        }
        if let Some(e) = &self.s3.endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            bad(
                "s3.endpoint",
                format!("{e:?} must start with http:// or https://"),
            );
        }
        for (i, s) in self.fetch.allowed_schemes.iter().enumerate() {
            if !matches!(s.as_str(), "file" | "s3") {
                bad(
                    &format!("fetch.allowed_schemes[{i}]"),
                    format!("unknown scheme {s:?}; use \"file\" or \"s3\""),
                );
            }
        }
        if self.fetch.concurrency == 0 {
            bad("fetch.concurrency", "must be at least 1".into());
        }
        if self.fetch.max_object_bytes == 0 {
            bad("fetch.max_object_bytes", "must be positive".into());
        }
        if self.image.limits.max_pixels == 0 || self.image.limits.max_bytes == 0 {
            bad(
                "image",
                "`max_pixels` and `max_bytes` must be positive".into(),
            );
        }
        let e = &self.engine;
        if e.max_in_flight == 0 {
            bad("engine.max_in_flight", "must be at least 1".into());
        }
        if e.queue_capacity == 0 {
            bad("engine.queue_capacity", "must be at least 1".into());
        }
        if e.max_bytes_in_flight < 16 << 20 {
            bad(
                "engine.max_bytes_in_flight",
                "must be at least 16 MiB (16777216)".into(),
            );
        }
        for (name, b) in [
            ("engine.vision_batch", e.vision_batch),
            ("engine.text_batch", e.text_batch),
        ] {
            if b.max_size == 0 {
                bad(&format!("{name}.max_size"), "must be at least 1".into());
            }
            if b.max_size > e.max_in_flight {
                bad(
                    &format!("{name}.max_size"),
                    format!(
                        "{} exceeds engine.max_in_flight ({}): batches could never fill",
                        b.max_size, e.max_in_flight
                    ),
                );
            }
        }
        let pq = &self.sink.parquet;
        match (&pq.dir, &pq.url) {
            (Some(_), Some(_)) => bad("sink.parquet", "set `dir` or `url`, not both".into()),
            (None, None) => bad(
                "sink.parquet",
                "set `dir` (a local directory) or `url` (s3://bucket/prefix/)".into(),
            ),
            (None, Some(u)) => {
                if let Err(m) = parse_s3_url(u) {
                    bad("sink.parquet.url", m);
                }
            }
            _ => {}
        }
        if pq.part_bytes < 5 << 20 {
            bad(
                "sink.parquet.part_bytes",
                "must be at least 5 MiB (5242880), S3's smallest multipart part".into(),
            );
        }
        if pq.max_file_span_secs == Some(0) {
            bad("sink.parquet.max_file_span_secs", "must be positive".into());
        }
        let kafka_source = matches!(self.source, SourceConfig::Kafka(_));
        if let Some(k) = &self.sink.kafka {
            if k.embeddings_topic.is_none() && k.labels_topic.is_none() && k.review_topic.is_none()
            {
                bad(
                    "sink.kafka",
                    "set `embeddings_topic`, `labels_topic` and/or `review_topic`, or remove the \
                     section"
                        .into(),
                );
            }
            if k.brokers.is_none() && !kafka_source {
                bad(
                    "sink.kafka.brokers",
                    "needed when the source is not Kafka".into(),
                );
            }
        }
        if let Some(t) = &self.dead_letter.topic {
            if t.trim().is_empty() {
                bad("dead_letter.topic", "must not be empty".into());
            }
            if self.dead_letter.path.is_some() {
                bad("dead_letter", "set `path` or `topic`, not both".into());
            }
            if self.kafka_sink_brokers().is_none() {
                bad(
                    "dead_letter.topic",
                    "needs brokers: a Kafka source or `[sink.kafka] brokers`".into(),
                );
            }
        } else if self.dead_letter.path.is_none() && pq.dir.is_none() {
            bad(
                "dead_letter",
                "with Parquet on S3, set `topic` (a Kafka dead-letter topic) or `path` (a local file)".into(),
            );
        }
        if pq.max_rows_per_file == 0 {
            bad(
                "sink.parquet.max_rows_per_file",
                "must be at least 1".into(),
            );
        }
        if pq.row_group_rows == 0 {
            bad("sink.parquet.row_group_rows", "must be at least 1".into());
        }
        if pq.max_bytes_per_file < 1024 {
            bad(
                "sink.parquet.max_bytes_per_file",
                "must be at least 1024".into(),
            );
        }
        if !(1..=22).contains(&pq.zstd_level) {
            bad(
                "sink.parquet.zstd_level",
                format!("{} is not a zstd level (1-22)", pq.zstd_level),
            );
        }
        if let Some(addr) = &self.metrics.listen
            && addr.parse::<std::net::SocketAddr>().is_err()
        {
            bad(
                "metrics.listen",
                format!("{addr:?} is not HOST:PORT with an IP address (e.g. \"0.0.0.0:9464\")"),
            );
        }
        let d = self.shutdown.drain_deadline_secs;
        if !(d.is_finite() && d > 0.0) {
            bad(
                "shutdown.drain_deadline_secs",
                "must be a positive number of seconds".into(),
            );
        }
        if p.is_empty() { Ok(()) } else { Err(p) }
    }

    /// The review thresholds of `[model]`.
    pub fn review(&self) -> crate::review::ReviewPolicy {
        crate::review::ReviewPolicy {
            min_score: self.model.review_min_score,
            min_margin: self.model.review_min_margin,
        }
    }

    /// Where a local run writes the records routed to review: beside its
    /// Parquet files, unless they go to `[sink.kafka] review_topic`.
    pub fn review_path(&self) -> Option<PathBuf> {
        let to_topic = self
            .sink
            .kafka
            .as_ref()
            .is_some_and(|k| k.review_topic.is_some());
        if !self.review().active() || to_topic {
            return None;
        }
        self.sink
            .parquet
            .dir
            .as_ref()
            .map(|d| d.join("_review.jsonl"))
    }

    /// The dead-letter file, when dead letters go to a file.
    pub fn dead_letter_path(&self) -> Option<PathBuf> {
        if self.dead_letter.topic.is_some() {
            return None;
        }
        self.dead_letter.path.clone().or_else(|| {
            self.sink
                .parquet
                .dir
                .as_ref()
                .map(|d| d.join("_dead_letters.jsonl"))
        })
    }

    /// Brokers of the Kafka outputs: `[sink.kafka] brokers`, else the
    /// source's.
    pub fn kafka_sink_brokers(&self) -> Option<String> {
        self.sink
            .kafka
            .as_ref()
            .and_then(|k| k.brokers.clone())
            .or_else(|| match &self.source {
                SourceConfig::Kafka(k) => Some(k.brokers.clone()),
                SourceConfig::Files(_) => None,
            })
    }

    /// Where Parquet files go, for messages.
    pub fn output_location(&self) -> String {
        match (&self.sink.parquet.dir, &self.sink.parquet.url) {
            (Some(d), _) => d.display().to_string(),
            (None, Some(u)) => u.clone(),
            (None, None) => "-".into(),
        }
    }
}

/// Splits `s3://bucket/prefix` into bucket and prefix (no leading or
/// trailing slash; may be empty).
pub fn parse_s3_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("{url:?} is not an s3://bucket/prefix URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!("{url:?} has no bucket"));
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [model]
        dir = "models/clip"
        [source]
        kind = "files"
        manifest = "events.jsonl"
        [sink.parquet]
        dir = "${OUT_DIR:-out}"
    "#;

    fn parse(text: &str) -> Result<PipelineConfig, Vec<Problem>> {
        PipelineConfig::from_toml(text, Path::new("/base"), |k| {
            (k == "SET").then(|| "v".to_string())
        })
    }

    #[test]
    fn minimal_config_gets_defaults_and_absolute_paths() {
        let c = parse(MINIMAL).expect("valid");
        assert_eq!(c.model.dir, PathBuf::from("/base/models/clip"));
        assert_eq!(c.sink.parquet.dir, Some(PathBuf::from("/base/out")));
        assert_eq!(c.engine.vision_batch.max_size, 32);
        assert_eq!(
            c.dead_letter_path(),
            Some(PathBuf::from("/base/out/_dead_letters.jsonl"))
        );
    }

    #[test]
    fn review_thresholds_need_labels_and_a_place_for_what_they_route() {
        let with = |model: &str, sink: &str| {
            parse(&format!(
                "[model]\ndir = \"m\"\n{model}\n[source]\nkind = \"files\"\nmanifest = \"e.jsonl\"\n{sink}"
            ))
        };
        let local = "[sink.parquet]\ndir = \"out\"";
        let c = with("labels = \"l.toml\"\nreview_min_score = 0.8", local).expect("valid");
        assert_eq!(
            c.review_path(),
            Some(PathBuf::from("/base/out/_review.jsonl"))
        );
        assert!(c.review().active());
        let problems = |r: Result<PipelineConfig, Vec<Problem>>| {
            r.expect_err("invalid")
                .iter()
                .map(|p| format!("{}: {}", p.path, p.message))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let e = problems(with("review_min_score = 0.8", local));
        assert!(
            e.contains("model.review_min_score: review routing needs labels"),
            "{e}"
        );
        let e = problems(with("labels = \"l.toml\"\nreview_min_margin = 1.5", local));
        assert!(
            e.contains("model.review_min_margin: must be between 0 and 1"),
            "{e}"
        );
        let s3 = "[dead_letter]\ntopic = \"d\"\n[sink.parquet]\nurl = \"s3://b/p/\"\n[sink.kafka]\nbrokers = \"k:9092\"\nembeddings_topic = \"e\"";
        let e = problems(with("labels = \"l.toml\"\nreview_min_score = 0.8", s3));
        assert!(
            e.contains("sink.kafka.review_topic: records routed to review need a place"),
            "{e}"
        );
        let c = with(
            "labels = \"l.toml\"\nreview_min_score = 0.8",
            &format!("{s3}\nreview_topic = \"r\""),
        )
        .expect("valid");
        assert_eq!(c.review_path(), None);
        let e = problems(with(
            "labels = \"l.toml\"",
            &format!("{s3}\nreview_topic = \"r\""),
        ));
        assert!(e.contains("nothing is routed to it"), "{e}");
    }

    #[test]
    fn relative_paths_are_normalised() {
        assert_eq!(
            normalize(Path::new("pipelines/../out/local")),
            PathBuf::from("out/local")
        );
        assert_eq!(normalize(Path::new("../a/./b")), PathBuf::from("../a/b"));
        assert_eq!(normalize(Path::new("/x/y/../../z")), PathBuf::from("/z"));
        // A path that cancels out is the current directory, not an empty
        // path (which no system call accepts): `root = ".."` next to a
        // pipeline in `pipelines/`.
        assert_eq!(normalize(Path::new("pipelines/..")), PathBuf::from("."));
        assert_eq!(normalize(Path::new("./.")), PathBuf::from("."));
    }

    #[test]
    fn unknown_fields_are_rejected_with_a_line() {
        let text = format!("{MINIMAL}\n[engine]\nmax_in_flite = 3\n");
        let p = parse(&text).expect_err("typo");
        assert_eq!(p.len(), 1);
        assert!(p[0].message.contains("max_in_flite"), "{p:?}");
        assert!(p[0].path.starts_with("line "), "{p:?}");
    }

    #[test]
    fn every_problem_is_listed() {
        let text = format!(
            "{MINIMAL}\n[engine]\nmax_in_flight = 4\nvision_batch = {{ max_size = 0, max_wait_ms = 1 }}\ntext_batch = {{ max_size = 9, max_wait_ms = 1 }}\n[fetch]\nallowed_schemes = [\"http\"]\nconcurrency = 0\n"
        );
        let p = parse(&text).expect_err("invalid");
        let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "fetch.allowed_schemes[0]",
                "fetch.concurrency",
                "engine.vision_batch.max_size",
                "engine.text_batch.max_size"
            ],
            "{p:?}"
        );
    }

    const KAFKA: &str = r#"
        [model]
        dir = "m"
        [source]
        kind = "kafka"
        brokers = "127.0.0.1:9092"
        topics = ["events"]
        group_id = "g"
        [source.options]
        "fetch.min.bytes" = "1"
        [fetch]
        allowed_schemes = ["s3"]
        allowed_buckets = ["images"]
        [sink.parquet]
        url = "s3://out/embeddings/"
        [sink.kafka]
        embeddings_topic = "emb"
        [dead_letter]
        topic = "dlq"
    "#;

    #[test]
    fn kafka_pipeline_parses() {
        let c = parse(KAFKA).expect("valid");
        let SourceConfig::Kafka(k) = &c.source else {
            panic!("kafka source expected");
        };
        assert_eq!(k.options["fetch.min.bytes"], "1");
        assert_eq!(c.kafka_sink_brokers().as_deref(), Some("127.0.0.1:9092"));
        assert_eq!(c.dead_letter_path(), None);
        assert_eq!(
            parse_s3_url(c.sink.parquet.url.as_deref().unwrap_or_default()),
            Ok(("out".into(), "embeddings".into()))
        );
    }

    #[test]
    fn kafka_pipelines_refuse_unsafe_settings() {
        let text = KAFKA
            .replace(
                "allowed_schemes = [\"s3\"]",
                "allowed_schemes = [\"s3\", \"file\"]",
            )
            .replace("allowed_buckets = [\"images\"]", "")
            .replace(
                "group_id = \"g\"",
                "group_id = \"g\"\ndrain_deadline_ms = 50000",
            )
            .replace("topic = \"dlq\"", "");
        let p = parse(&text).expect_err("invalid");
        let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "source.drain_deadline_ms",
                "fetch.allowed_schemes",
                "fetch.allowed_buckets",
                "dead_letter"
            ],
            "{p:?}"
        );
    }

    #[test]
    fn environment_is_interpolated() {
        assert_eq!(
            interpolate("a=${SET} b=${UNSET:-d}", |k| (k == "SET")
                .then(|| "v".into())),
            Ok("a=v b=d".into())
        );
        let p = interpolate("x\ny=${NOPE}", |_| None).expect_err("unset");
        assert_eq!(p[0].path, "line 2");
        assert!(p[0].message.contains("NOPE"));
    }
}
