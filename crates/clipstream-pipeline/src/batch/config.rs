//! Dynamic batching of one tower (`[engine] vision_batch` / `text_batch`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Dynamic batching of one tower (`[engine] vision_batch` / `text_batch`).
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
