//! Sources: where records come from. Each source assigns positions, issues
//! acknowledgement tokens, takes an in-flight permit per record (so memory
//! is bounded whatever the backlog), and stops when asked.

pub mod config;
pub mod files;
pub mod kafka;

pub use self::config::{
    FilesInput, FilesSourceConfig, KafkaSourceConfig, OffsetReset, SourceConfig,
};

use std::sync::Arc;

use tokio::sync::{Semaphore, watch};

use crate::ack::{AckTracker, PartitionKey};
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
    /// The memory budget (a source holds back while it is spent).
    pub budget: Arc<crate::budget::Budget>,
    /// Becomes true when the pipeline must stop reading.
    pub stop: watch::Receiver<bool>,
    /// Counters.
    pub stats: Arc<Stats>,
}

impl SourceContext {
    /// Waits for an in-flight slot and for room in the memory budget, then
    /// charges `bytes` (the event); `None` when asked to stop.
    pub async fn permit(&mut self, bytes: u64) -> Option<crate::record::Permit> {
        if *self.stop.borrow() {
            return None;
        }
        let slot = tokio::select! {
            p = Arc::clone(&self.in_flight).acquire_owned() => p.ok()?,
            _ = self.stop.wait_for(|s| *s) => return None,
        };
        let mut memory = self.budget.empty();
        tokio::select! {
            _ = self.budget.grow_within(&mut memory, bytes, crate::budget::MAX_WAIT) => {}
            _ = self.stop.wait_for(|s| *s) => return None,
        }
        Some(crate::record::Permit::new(slot, memory))
    }
}

/// Removes output files a worker wrote beyond a partition's committed
/// offset (it stopped before committing them); used when a partition is
/// assigned, before it is read again.
pub trait Cleanup: Send + Sync {
    /// Removes the files of `partition` whose first offset is `from` or
    /// later; returns how many.
    /// `owned` is checked before each deletion (false once the partition
    /// moved on).
    fn remove_from<'a>(
        &'a self,
        partition: &'a PartitionKey,
        from: i64,
        owned: &'a (dyn Fn() -> bool + Sync),
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<usize>> + Send + 'a>>;
}
