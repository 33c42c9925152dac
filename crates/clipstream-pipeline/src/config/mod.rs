//! Pipeline configuration: one TOML file per pipeline (see `pipelines/`).
//!
//! Parsing is strict (`deny_unknown_fields`, closed sets as enums), `${VAR}`
//! / `${VAR:-default}` in the text are replaced from the environment first
//! (secrets and endpoints), and validation is pure: every problem is listed
//! with its path in the file before anything touches a model, a broker or a
//! disk. Relative paths are relative to the directory of the config file.
//!
//! Each section lives beside the stage it configures, with its defaults and
//! its own checks (`check`); this module holds the whole file, the rules
//! that span sections, and re-exports every section:
//!
//! | section | type | beside |
//! |---|---|---|
//! | `[model]` | [`ModelConfig`] | here (the model crate loads it) |
//! | `[runtime]` | [`RuntimeOptions`] | `clipstream_model::runtime` |
//! | `[source]` | [`SourceConfig`] | [`crate::source::config`], [`crate::source::files::config`], [`crate::source::kafka::config`] |
//! | `[s3]` | [`S3Config`] | [`crate::s3::config`] |
//! | `[fetch]` | [`FetchConfig`] | [`crate::fetch::config`] |
//! | `[image]` | [`ImageConfig`] | [`crate::prep::config`] |
//! | `[engine]`, `[shutdown]` | [`EngineConfig`], [`ShutdownConfig`] | [`crate::engine::config`] (batching: [`crate::batch::config`]) |
//! | `[sink]` | [`SinkConfig`] | [`crate::sink::config`], [`crate::sink::parquet::config`], [`crate::sink::kafka::config`] |
//! | `[dead_letter]` | [`DeadLetterConfig`] | [`crate::dead_letter`] |
//! | `[metrics]` | [`MetricsConfig`] | here (the CLI serves it) |
//!
//! "Exactly one of" pairs have one rule each, which validation reports and
//! the run uses: [`FilesSourceConfig::input`], [`ParquetConfig::output`],
//! [`DeadLetterConfig::destination`].

pub mod file;

use std::path::{Path, PathBuf};

use clipstream_model::{RuntimeOptions, Variant};
use serde::{Deserialize, Serialize};

pub use self::file::{ConfigError, Problem, Problems, absolute, interpolate, normalize};
pub use crate::batch::config::BatchConfig;
pub use crate::dead_letter::{DeadLetterConfig, DeadLetters};
pub use crate::engine::config::{EngineConfig, ShutdownConfig};
pub use crate::fetch::config::{FetchConfig, Scheme};
pub use crate::prep::config::ImageConfig;
pub use crate::s3::config::{S3Config, parse_s3_url};
pub use crate::sink::config::{KafkaSinkConfig, ParquetConfig, ParquetOutput, SinkConfig};
pub use crate::source::config::{
    FilesInput, FilesSourceConfig, KafkaSourceConfig, OffsetReset, SourceConfig,
};

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

impl ModelConfig {
    fn check(&self, p: &mut Problems) {
        if self.top_k == 0 {
            p.bad("model.top_k", "must be at least 1");
        }
        for (key, v) in [
            ("model.review_min_score", self.review_min_score),
            ("model.review_min_margin", self.review_min_margin),
        ] {
            if let Some(v) = v {
                if !(0.0..=1.0).contains(&v) {
                    p.bad(key, format!("must be between 0 and 1, got {v}"));
                }
                if self.labels.is_none() {
                    p.bad(
                        key,
                        "review routing needs labels: set `labels` (a label set) in [model]",
                    );
                }
            }
        }
    }
}

impl MetricsConfig {
    fn check(&self, p: &mut Problems) {
        if let Some(addr) = &self.listen
            && addr.parse::<std::net::SocketAddr>().is_err()
        {
            p.bad(
                "metrics.listen",
                format!("{addr:?} is not HOST:PORT with an IP address (e.g. \"0.0.0.0:9464\")"),
            );
        }
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
        absolute(base, &mut self.model.dir);
        for p in [
            &mut self.model.labels,
            &mut self.runtime.library,
            &mut self.fetch.root,
            &mut self.dead_letter.path,
        ]
        .into_iter()
        .flatten()
        {
            absolute(base, p);
        }
        if let SourceConfig::Files(f) = &mut self.source {
            f.resolve_paths(base);
        }
        self.sink.parquet.resolve_paths(base);
    }

    /// Checks every value; no I/O. Each section checks itself; the rules
    /// below are the ones that span sections.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut p = Problems::default();
        self.model.check(&mut p);
        self.source.check(&mut p);
        self.s3.check(&mut p);
        self.fetch.check(&mut p);
        self.image.check(&mut p);
        self.engine.check(&mut p);
        self.sink.parquet.check(&mut p);
        if let Some(k) = &self.sink.kafka {
            k.check(&mut p);
        }
        self.dead_letter
            .check(self.sink.parquet.local_dir(), &mut p);
        self.metrics.check(&mut p);
        self.shutdown.check(&mut p);
        self.check_source_rules(&mut p);
        self.check_review_routing(&mut p);
        self.check_brokers(&mut p);
        p.into_result()
    }

    /// A Kafka fleet reads no local files.
    fn check_source_rules(&self, p: &mut Problems) {
        if self.source.kafka().is_some() && self.fetch.allows(Scheme::File) {
            p.bad(
                "fetch.allowed_schemes",
                "`file` lets any event read this worker's files; Kafka pipelines allow only \"s3\"",
            );
        }
    }

    /// Review thresholds need a place for what they route, and a topic
    /// needs thresholds.
    fn check_review_routing(&self, p: &mut Problems) {
        let reviewing = self.review().active();
        let review_topic = self
            .sink
            .kafka
            .as_ref()
            .and_then(|k| k.review_topic.as_ref());
        if reviewing && review_topic.is_none() && self.sink.parquet.local_dir().is_none() {
            p.bad(
                "sink.kafka.review_topic",
                "records routed to review need a place: set `review_topic`, or write Parquet locally \
                 (`[sink.parquet] dir`, which gets `_review.jsonl`)",
            );
        }
        if let (Some(t), Some(k)) = (review_topic, self.source.kafka())
            && k.topics.contains(t)
        {
            p.bad(
                "sink.kafka.review_topic",
                format!(
                    "{t:?} is a topic this pipeline reads: the workers would read their own reviews"
                ),
            );
        }
        if reviewing && review_topic.is_none() && self.source.kafka().is_some() {
            p.bad(
                "sink.kafka.review_topic",
                "a Kafka fleet routes to a topic (one `_review.jsonl` cannot take the lines of \
                 several workers): set `review_topic`",
            );
        }
        if review_topic.is_some() && !reviewing {
            p.bad(
                "sink.kafka.review_topic",
                "nothing is routed to it: set `[model] review_min_score` and/or `review_min_margin`",
            );
        }
    }

    /// Output topics need brokers: their own, or the source's.
    fn check_brokers(&self, p: &mut Problems) {
        if let Some(k) = &self.sink.kafka
            && k.brokers.is_none()
            && self.source.kafka().is_none()
        {
            p.bad("sink.kafka.brokers", "needed when the source is not Kafka");
        }
        if self.dead_letter.topic.is_some() && self.kafka_sink_brokers().is_none() {
            p.bad(
                "dead_letter.topic",
                "needs brokers: a Kafka source or `[sink.kafka] brokers`",
            );
        }
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
            .local_dir()
            .map(|d| d.join("_review.jsonl"))
    }

    /// Where dead letters go (`None` only for a config that failed
    /// validation).
    pub fn dead_letters(&self) -> Option<DeadLetters> {
        self.dead_letter
            .destination(self.sink.parquet.local_dir())
            .ok()
    }

    /// The dead-letter file, when dead letters go to a file.
    pub fn dead_letter_path(&self) -> Option<PathBuf> {
        match self.dead_letters()? {
            DeadLetters::File(p) => Some(p),
            DeadLetters::Topic(_) => None,
        }
    }

    /// Brokers of the Kafka outputs: `[sink.kafka] brokers`, else the
    /// source's.
    pub fn kafka_sink_brokers(&self) -> Option<String> {
        self.sink
            .kafka
            .as_ref()
            .and_then(|k| k.brokers.clone())
            .or_else(|| self.source.kafka().map(|k| k.brokers.clone()))
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

#[cfg(test)]
mod tests;
