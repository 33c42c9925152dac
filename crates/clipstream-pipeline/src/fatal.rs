//! The one way a stage says it cannot go on: the first fatal error is kept,
//! the engine stops the source, the other stages drain what they can, and
//! the run ends with the error; `/healthz` turns red as soon as it is set.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set when a stage fails for good (a tower, the sink, an output topic).
#[derive(Debug, Default)]
pub struct Fatal {
    failed: AtomicBool,
    message: std::sync::Mutex<Option<String>>,
}

impl Fatal {
    /// Records the first fatal error.
    pub fn set(&self, message: String) {
        let mut m = self.message.lock().unwrap_or_else(|e| e.into_inner());
        if m.is_none() {
            tracing::error!(%message, "pipeline failed");
            *m = Some(message);
        }
        self.failed.store(true, Ordering::Release);
    }

    /// True once a fatal error happened.
    pub fn is_set(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The first fatal error.
    pub fn message(&self) -> Option<String> {
        self.message
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
