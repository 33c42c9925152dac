//! Sources: where records come from. Each source assigns positions, issues
//! acknowledgement tokens, takes an in-flight permit per record (so memory
//! is bounded whatever the backlog), and stops when asked.

pub mod files;
pub mod kafka;

use std::sync::Arc;

use tokio::sync::{Semaphore, watch};

use crate::ack::AckTracker;
use crate::record::{Done, Record};
use crate::stats::Stats;

/// What every source is given.
#[derive(Debug, Clone)]
pub struct SourceContext {
    /// Records go to the fetch stage.
    pub records: flume::Sender<Record>,
    /// Events rejected at the source go straight to the sinks.
    pub done: flume::Sender<Done>,
    /// Issues acknowledgement tokens.
    pub tracker: Arc<AckTracker>,
    /// In-flight slots.
    pub in_flight: Arc<Semaphore>,
    /// Becomes true when the pipeline must stop reading.
    pub stop: watch::Receiver<bool>,
    /// Counters.
    pub stats: Arc<Stats>,
}

impl SourceContext {
    /// Waits for an in-flight slot; `None` when asked to stop.
    pub async fn permit(&mut self) -> Option<crate::record::Permit> {
        if *self.stop.borrow() {
            return None;
        }
        tokio::select! {
            p = Arc::clone(&self.in_flight).acquire_owned() => p.ok(),
            _ = self.stop.wait_for(|s| *s) => None,
        }
    }
}
