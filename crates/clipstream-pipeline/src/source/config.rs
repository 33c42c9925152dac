//! `[source]`: which source, and its settings (beside each source:
//! [`crate::source::files::config`], [`crate::source::kafka::config`]).

use serde::{Deserialize, Serialize};

pub use crate::source::files::config::{FilesInput, FilesSourceConfig};
pub use crate::source::kafka::config::{KafkaSourceConfig, OffsetReset};

/// `[source]`: `kind = "files"` or `kind = "kafka"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// Local input: a JSONL manifest of events, or a directory of images.
    Files(FilesSourceConfig),
    /// A Kafka consumer group.
    Kafka(KafkaSourceConfig),
}

impl SourceConfig {
    pub(crate) fn check(&self, p: &mut crate::config::file::Problems) {
        match self {
            SourceConfig::Files(f) => f.check(p),
            SourceConfig::Kafka(k) => k.check(p),
        }
    }

    /// The Kafka source's settings, when it is one.
    pub fn kafka(&self) -> Option<&KafkaSourceConfig> {
        match self {
            SourceConfig::Kafka(k) => Some(k),
            SourceConfig::Files(_) => None,
        }
    }
}
