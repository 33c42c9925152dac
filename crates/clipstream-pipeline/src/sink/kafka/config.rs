//! `[sink.kafka]`: the output topics.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::file::Problems;

/// `[sink.kafka]`: one JSON message per record, keyed by id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Bootstrap servers. Default: the source's.
    #[serde(default)]
    pub brokers: Option<String>,
    /// Topic for embeddings.
    #[serde(default)]
    pub embeddings_topic: Option<String>,
    /// How embeddings messages are written: `json` (the default: every
    /// field in one JSON object) or `f32le` (the same fields as a JSON
    /// header, then the vectors as little-endian float32: about a quarter
    /// of the bytes and far less CPU; see [`crate::sink::kafka::message`]).
    #[serde(default)]
    pub embeddings_format: EmbeddingsFormat,
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
    pub options: BTreeMap<String, String>,
}

/// `embeddings_format`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingsFormat {
    /// One JSON object, the vectors as arrays of numbers.
    #[default]
    Json,
    /// A JSON header, then the vectors as little-endian float32.
    F32le,
}

impl EmbeddingsFormat {
    /// As written in the config and in the `clipstream.format` header.
    pub fn as_str(self) -> &'static str {
        match self {
            EmbeddingsFormat::Json => "json",
            EmbeddingsFormat::F32le => "f32le",
        }
    }
}

impl KafkaSinkConfig {
    /// What needs no other section; the brokers and the review topic are
    /// checked with the source and the model (`PipelineConfig::validate`).
    pub(crate) fn check(&self, p: &mut Problems) {
        if self.embeddings_topic.is_none()
            && self.labels_topic.is_none()
            && self.review_topic.is_none()
        {
            p.bad(
                "sink.kafka",
                "set `embeddings_topic`, `labels_topic` and/or `review_topic`, or remove the \
                 section",
            );
        }
        if self.embeddings_format != EmbeddingsFormat::Json && self.embeddings_topic.is_none() {
            p.bad(
                "sink.kafka.embeddings_format",
                "formats the embeddings topic's messages: set `embeddings_topic` too",
            );
        }
        for (key, topic) in [
            ("sink.kafka.embeddings_topic", &self.embeddings_topic),
            ("sink.kafka.labels_topic", &self.labels_topic),
            ("sink.kafka.review_topic", &self.review_topic),
        ] {
            if topic.as_ref().is_some_and(|t| t.trim().is_empty()) {
                p.bad(key, "must not be empty");
            }
        }
    }
}
