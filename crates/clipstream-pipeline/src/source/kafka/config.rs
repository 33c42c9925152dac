//! `[source]` with `kind = "kafka"`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::file::{HOUR_MS, Problems};
use crate::source::files::config::default_max_event_bytes;

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
    /// `session_timeout_ms`. Default 20000. ([`KafkaSourceConfig::rebalance_drain`];
    /// the drain on stop is `[shutdown] drain_deadline_secs`.)
    #[serde(default = "default_rebalance_drain")]
    pub drain_deadline_ms: u64,
    /// Where a group without a committed offset starts: `earliest` or
    /// `latest`. Default `earliest`.
    #[serde(default)]
    pub auto_offset_reset: OffsetReset,
    /// Messages larger than this are dead letters. Default 1 MiB.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    /// Raw librdkafka properties, applied last (security, tuning).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

/// `auto_offset_reset`: where a partition without a committed offset starts.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    /// The oldest retained message.
    #[default]
    Earliest,
    /// Only messages produced from now on.
    Latest,
}

impl OffsetReset {
    /// librdkafka's value.
    pub fn as_str(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
        }
    }
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

impl KafkaSourceConfig {
    /// How long revoked partitions' records may take to finish.
    pub fn rebalance_drain(&self) -> Duration {
        Duration::from_millis(self.drain_deadline_ms)
    }

    /// How often acknowledged offsets are committed.
    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.commit_interval_ms)
    }

    pub(crate) fn check(&self, p: &mut Problems) {
        if self.brokers.trim().is_empty() {
            p.bad(
                "source.brokers",
                "list the bootstrap servers, `host:port,...`",
            );
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| t.trim().is_empty()) {
            p.bad("source.topics", "name at least one topic, none empty");
        }
        if self.group_id.trim().is_empty() {
            p.bad("source.group_id", "must not be empty");
        }
        if self.max_event_bytes == 0 {
            p.bad("source.max_event_bytes", "must be positive");
        }
        // librdkafka's own range for the session timeout; the other
        // durations are held to an hour, so that no deadline computed from
        // them can overflow.
        for (key, v) in [
            ("source.commit_interval_ms", self.commit_interval_ms),
            ("source.session_timeout_ms", self.session_timeout_ms),
        ] {
            if v == 0 || v > HOUR_MS {
                p.bad(
                    key,
                    format!("{v} must be between 1 and {HOUR_MS} (one hour)"),
                );
            }
        }
        if self.drain_deadline_ms >= self.session_timeout_ms {
            p.bad(
                "source.drain_deadline_ms",
                format!(
                    "{} must be below source.session_timeout_ms ({}), or the group evicts the worker while it drains",
                    self.drain_deadline_ms, self.session_timeout_ms
                ),
            );
        }
    }
}
