//! `[sink]`: the outputs.

use serde::{Deserialize, Serialize};

pub use super::kafka::config::KafkaSinkConfig;
pub use super::parquet::config::{ParquetConfig, ParquetOutput};

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
