//! `[engine]` (concurrency, queues, memory, batching) and `[shutdown]`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::batch::config::BatchConfig;
use crate::config::file::Problems;

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

impl EngineConfig {
    pub(crate) fn check(&self, p: &mut Problems) {
        if self.max_in_flight == 0 {
            p.bad("engine.max_in_flight", "must be at least 1");
        }
        if self.queue_capacity == 0 {
            p.bad("engine.queue_capacity", "must be at least 1");
        }
        if self.max_bytes_in_flight < 16 << 20 {
            p.bad(
                "engine.max_bytes_in_flight",
                "must be at least 16 MiB (16777216)",
            );
        }
        for (name, b) in [
            ("engine.vision_batch", self.vision_batch),
            ("engine.text_batch", self.text_batch),
        ] {
            if b.max_size == 0 {
                p.bad(&format!("{name}.max_size"), "must be at least 1");
            }
            if b.max_size > self.max_in_flight {
                p.bad(
                    &format!("{name}.max_size"),
                    format!(
                        "{} exceeds engine.max_in_flight ({}): batches could never fill",
                        b.max_size, self.max_in_flight
                    ),
                );
            }
        }
    }
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

/// The two drains, as one notion: a deadline by which the records in
/// flight must be finished and their offsets committed. On a stop it is
/// `[shutdown] drain_deadline_secs`; on a rebalance, for the revoked
/// partitions only, `[source] drain_deadline_ms`
/// ([`crate::source::KafkaSourceConfig::rebalance_drain`]). The stop drain
/// is checked here (positive, below 1e9 s); the rebalance drain beside the
/// Kafka source (below the session timeout, which is at most an hour).
impl ShutdownConfig {
    /// The whole drain on stop.
    pub fn drain_deadline(&self) -> Duration {
        Duration::from_secs_f64(self.drain_deadline_secs)
    }

    /// The part of the stop drain the source may spend waiting for records
    /// before its last commit (the rest leaves time for that commit).
    pub fn source_drain(&self) -> Duration {
        self.drain_deadline().mul_f64(0.8)
    }

    pub(crate) fn check(&self, p: &mut Problems) {
        let d = self.drain_deadline_secs;
        // `Duration::from_secs_f64` panics beyond its range: refuse it here.
        if !(d.is_finite() && d > 0.0 && d < 1e9) {
            p.bad(
                "shutdown.drain_deadline_secs",
                "must be a positive number of seconds (below 1e9)",
            );
        }
    }
}
