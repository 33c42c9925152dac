//! Starting a newly assigned partition, off the poll thread.
//!
//! A partition is paused from the moment it is assigned until this job says
//! where it starts, as an absolute offset positively read from the broker:
//! the group's committed offset, or, when the group has none (a new group,
//! expired offsets), the end of the log that the effective
//! `auto.offset.reset` names (read from the log's watermarks). Only then is
//! anything deleted, and only output files of the partition whose first
//! offset is at or beyond that start: they hold records the log still has,
//! written by a worker that stopped before committing them, and the replay
//! from the start writes them again — so each record stays in one file.
//! Files before the start, and all files when the committed offset is
//! below the start of the log (retention took what they hold), are kept.
//! A lookup, a listing or a deletion that fails is retried with backoff for
//! as long as the partition stays assigned; meanwhile the partition stays
//! paused. Never "skip the cleanup and go on", never "delete on a guess".

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::ack::{AckTracker, PartitionKey};
use crate::source::Cleanup;
use crate::stats::Stats;

/// How long one broker request of the job may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a partition starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// At the group's committed offset.
    Committed(i64),
    /// The group has no committed offset: where `auto.offset.reset` says,
    /// resolved to an offset when the policy names an end of the log.
    Reset(Option<i64>),
}

/// A partition that may start.
#[derive(Debug)]
pub struct Ready {
    /// The partition.
    pub partition: PartitionKey,
    /// The assignment it belongs to.
    pub epoch: u64,
    /// Where to start.
    pub at: StartAt,
}

/// What the jobs share.
#[derive(Clone)]
pub struct Starter {
    /// A client of the same group that never joins it: it reads committed
    /// offsets and watermarks without blocking the poll thread.
    pub lookup: Arc<BaseConsumer>,
    /// Removes leftover output files.
    pub cleanup: Option<Arc<dyn Cleanup>>,
    /// Assignment epochs (a job ends when its assignment does).
    pub tracker: Arc<AckTracker>,
    /// Where ready partitions are announced.
    pub ready: flume::Sender<Ready>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// The consumer's effective `auto.offset.reset`.
    pub reset: String,
}

impl std::fmt::Debug for Starter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Starter").finish_non_exhaustive()
    }
}

impl Starter {
    /// Prepares `partition` for assignment `epoch` in the background.
    pub fn spawn(&self, handle: &tokio::runtime::Handle, partition: PartitionKey, epoch: u64) {
        let s = self.clone();
        handle.spawn(async move { s.run(partition, epoch).await });
    }

    async fn run(self, partition: PartitionKey, epoch: u64) {
        let mut backoff =
            crate::retry::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut attempt = 0u32;
        loop {
            if self.tracker.epoch(&partition) != Some(epoch) {
                return;
            }
            attempt += 1;
            match self.step(&partition, epoch).await {
                Ok(at) => {
                    if attempt > 1 {
                        tracing::info!(partition = %partition, attempt, "partition ready after retries");
                    }
                    let _ = self.ready.send(Ready {
                        partition,
                        epoch,
                        at,
                    });
                    return;
                }
                Err(why) => {
                    let pause = backoff.next_delay();
                    self.stats.kafka.start_retry();
                    tracing::warn!(
                        partition = %partition,
                        attempt,
                        retry_in_ms = pause.as_millis() as u64,
                        "cannot start the partition yet (it stays paused; nothing is deleted): {why}"
                    );
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// One attempt: the committed offset, the log start, the cleanup.
    async fn step(&self, partition: &PartitionKey, epoch: u64) -> Result<StartAt, String> {
        let tracker = Arc::clone(&self.tracker);
        let owned = move || tracker.epoch(partition) == Some(epoch);
        let (topic, p) = (partition.source.to_string(), partition.partition);
        let lookup = Arc::clone(&self.lookup);
        let t = topic.clone();
        let committed = tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&t, p);
            lookup.committed_offsets(tpl, REQUEST_TIMEOUT)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("reading the committed offset failed: {e}"))?;
        // (The answer holds raw pointers: read it before the next await.)
        let at = {
            let e = committed
                .find_partition(&topic, p)
                .ok_or("the committed-offset answer does not name the partition")?;
            e.error()
                .map_err(|e| format!("reading the committed offset failed: {e}"))?;
            match e.offset() {
                Offset::Offset(c) if c >= 0 => Some(c),
                Offset::Invalid => None,
                other => return Err(format!("unexpected committed offset {other:?}")),
            }
        };
        drop(committed);
        let lookup = Arc::clone(&self.lookup);
        let (low, high) = tokio::task::spawn_blocking(move || {
            lookup.fetch_watermarks(&topic, p, REQUEST_TIMEOUT)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("reading the ends of the log failed: {e}"))?;
        let Some(c) = at else {
            // Resolved here: a partition resumed at a logical position
            // would have librdkafka look it up again, later, and move it.
            let at = match self.reset.as_str() {
                "earliest" | "smallest" | "beginning" => Some(low),
                "latest" | "largest" | "end" => Some(high),
                _ => None,
            };
            tracing::info!(partition = %partition, reset = %self.reset, offset = ?at, "no committed offset: starting where auto.offset.reset says");
            // Files from there on hold only records the log still has:
            // they are written again by the replay (a worker that started
            // the same way and stopped before its first commit left them).
            if let (Some(from), Some(cleanup)) = (at, &self.cleanup) {
                cleanup
                    .remove_from(partition, from, &owned)
                    .await
                    .map_err(|e| format!("removing leftover output files failed: {e:#}"))?;
            }
            return Ok(StartAt::Reset(at));
        };
        let at = StartAt::Committed(c);
        let Some(cleanup) = &self.cleanup else {
            return Ok(at);
        };
        if c < low {
            // Retention took offsets c..low before they were processed:
            // they are gone, whatever happens here. Start at the log's start
            // (a seek to c would fall back to auto.offset.reset, which may
            // skip the whole log), keep the files before it, and replace
            // those from it on.
            tracing::warn!(partition = %partition, committed = c, log_start = low, "the log no longer holds offsets from the committed one on (retention): starting at the log's start");
            cleanup
                .remove_from(partition, low, &owned)
                .await
                .map_err(|e| format!("removing leftover output files failed: {e:#}"))?;
            return Ok(StartAt::Committed(low));
        }
        cleanup
            .remove_from(partition, c, &owned)
            .await
            .map_err(|e| format!("removing leftover output files failed: {e:#}"))?;
        Ok(at)
    }
}
