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
