//! The consumer group's side of the Kafka source: what is assigned and in
//! which phase, commits of the contiguous acknowledged offsets, and the
//! rebalance callbacks (assignment, revocation with its drain, loss), which
//! run on the poll thread inside `poll`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::config::KafkaSourceConfig;
use super::start::{Ready, StartAt, Starter};
use crate::ack::{AckTracker, PartitionKey};
use crate::sink::Control;
use crate::stats::Stats;

/// Where an assigned partition is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Paused until [`start`] says where it starts; `dropped` is the first
    /// offset of a message that arrived meanwhile (and was not used).
    Starting { dropped: Option<i64> },
    /// Being read.
    Running,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Assigned {
    pub(super) epoch: u64,
    pub(super) phase: Phase,
}

/// State shared by the poll loop and the rebalance callbacks (which run on
/// the poll thread, inside `poll`).
pub(super) struct Shared {
    pub(super) cfg: KafkaSourceConfig,
    pub(super) tracker: Arc<AckTracker>,
    pub(super) stats: Arc<Stats>,
    pub(super) control: flume::Sender<Control>,
    pub(super) starter: Starter,
    pub(super) runtime: tokio::runtime::Handle,
    /// Next emission sequence number per partition, for the life of the
    /// process (a partition that comes back continues its numbering).
    pub(super) next_seq: Mutex<HashMap<PartitionKey, u64>>,
    /// Partitions assigned now.
    pub(super) assigned: Mutex<HashMap<PartitionKey, Assigned>>,
    /// Last offset committed (the next offset to read) per partition.
    pub(super) committed: Mutex<HashMap<PartitionKey, i64>>,
    /// True while backpressure holds the running partitions paused.
    pub(super) backpressure: Mutex<bool>,
    /// Per running partition, the offset to read next: where the partition
    /// started, then past each record read. The source positions the
    /// consumer there itself whenever it resumes a partition (librdkafka's
    /// own resume position after a pause was seen to go back to where a
    /// partition started, so records were read twice).
    pub(super) next_offset: Mutex<HashMap<PartitionKey, i64>>,
    /// Running partitions left paused because they could not be positioned
    /// yet (librdkafka refuses a seek until its own start of the partition
    /// is done); retried on every turn of the poll loop.
    pub(super) unpositioned: Mutex<std::collections::HashSet<PartitionKey>>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn tpl_of(keys: &[PartitionKey]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for k in keys {
        tpl.add_partition(&k.source, k.partition);
    }
    tpl
}

impl Shared {
    pub(super) fn emitted(&self, key: &PartitionKey) -> u64 {
        lock(&self.next_seq).get(key).copied().unwrap_or(0)
    }

    pub(super) fn running(&self) -> Vec<PartitionKey> {
        lock(&self.assigned)
            .iter()
            .filter(|(_, a)| a.phase == Phase::Running)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Shows the partitions assigned now and how many are still starting.
    pub(super) fn count_assigned(&self) {
        let assigned = lock(&self.assigned);
        let starting = assigned
            .values()
            .filter(|a| a.phase != Phase::Running)
            .count();
        self.stats.kafka.assigned(assigned.len(), starting);
    }

    /// Commits the contiguous acknowledged position of `keys` that moved
    /// since the last commit, synchronously (a few ms on the poll thread;
    /// the latency is measured exactly). False when the commit failed.
    pub(super) fn commit(&self, c: &BaseConsumer<Ctx>, keys: &[PartitionKey]) -> bool {
        let mut tpl = TopicPartitionList::new();
        let mut committed = lock(&self.committed);
        for k in keys {
            let w = self.tracker.watermark(k);
            let Some(last) = w.last_offset else { continue };
            if committed.get(k).is_some_and(|&c| c > last) {
                continue;
            }
            if tpl
                .add_partition_offset(&k.source, k.partition, Offset::Offset(last + 1))
                .is_ok()
            {
                committed.insert(k.clone(), last + 1);
            }
        }
        drop(committed);
        if tpl.count() == 0 {
            return true;
        }
        let started = Instant::now();
        let r = c.commit(&tpl, CommitMode::Sync);
        self.commit_done(r, started)
    }

    pub(super) fn commit_done(&self, r: KafkaResult<()>, started: Instant) -> bool {
        self.stats.kafka.commit(r.is_ok(), started.elapsed());
        match r {
            Ok(()) => {
                tracing::debug!(
                    took_ms = started.elapsed().as_millis() as u64,
                    "offsets committed"
                );
                true
            }
            Err(e) => {
                // A failed commit is retried by the next one; forget what we
                // thought was committed so that it is sent again.
                tracing::warn!(error = %e, "offset commit failed; the next commit retries it");
                lock(&self.committed).clear();
                false
            }
        }
    }

    /// Asks the sink to complete the open ranges of `keys` once every
    /// record emitted so far has reached it.
    pub(super) fn flush(&self, keys: &[PartitionKey]) {
        for k in keys {
            let emitted = self.emitted(k);
            if emitted > 0 {
                let _ = self.control.send(Control::Flush {
                    partition: k.clone(),
                    upto_seq: emitted - 1,
                });
            }
        }
    }

    /// Waits until the records of `keys` are all resolved, or the deadline.
    /// Returns the partitions that did not finish.
    pub(super) fn drain(&self, keys: &[PartitionKey], deadline: Instant) -> Vec<PartitionKey> {
        loop {
            let pending: Vec<PartitionKey> = keys
                .iter()
                .filter(|k| self.tracker.watermark(k).contiguous < self.emitted(k))
                .cloned()
                .collect();
            if pending.is_empty() || Instant::now() >= deadline {
                return pending;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Ends the assignment of `keys` here: tokens of it no longer count.
    pub(super) fn forget(&self, keys: &[PartitionKey]) {
        for k in keys {
            self.tracker.revoke(k);
            lock(&self.assigned).remove(k);
            lock(&self.next_offset).remove(k);
            lock(&self.unpositioned).remove(k);
            self.stats.kafka.forget(k);
        }
        self.count_assigned();
    }

    pub(super) fn revoke(&self, c: &BaseConsumer<Ctx>, tpl: &TopicPartitionList) {
        // Partitions this worker already let go (at shutdown) need nothing.
        let mine: Vec<(PartitionKey, Assigned)> = {
            let assigned = lock(&self.assigned);
            keys_of(tpl)
                .into_iter()
                .filter_map(|k| assigned.get(&k).map(|a| (k, *a)))
                .collect()
        };
        if mine.is_empty() {
            return;
        }
        let keys: Vec<PartitionKey> = mine.iter().map(|(k, _)| k.clone()).collect();
        if c.assignment_lost() {
            // The group has moved on: another worker may own these now.
            // Nothing of this assignment may be published or committed.
            for (k, a) in &mine {
                let _ = self.control.send(Control::Drop {
                    partition: k.clone(),
                    epoch: a.epoch,
                });
            }
            self.forget(&keys);
            tracing::warn!(partitions = ?names(&keys), "partitions lost (the group moved on without this worker): their unfinished work is dropped; their next owner redoes it");
            return;
        }
        let running: Vec<PartitionKey> = mine
            .iter()
            .filter(|(_, a)| a.phase == Phase::Running)
            .map(|(k, _)| k.clone())
            .collect();
        let started = Instant::now();
        self.flush(&running);
        let left = self.drain(&running, started + self.cfg.rebalance_drain());
        let committed = self.commit(c, &running);
        self.forget(&keys);
        if !left.is_empty() {
            tracing::warn!(partitions = ?names(&left), "partitions revoked before their records finished; the next owner reprocesses them");
        } else if !committed {
            tracing::warn!(partitions = ?names(&keys), took_ms = started.elapsed().as_millis() as u64, "partitions revoked: drained, but the commit failed; the next owner reprocesses from the last commit");
        } else {
            tracing::info!(partitions = ?names(&keys), took_ms = started.elapsed().as_millis() as u64, "partitions revoked: drained and committed");
        }
    }

    pub(super) fn assign(&self, c: &BaseConsumer<Ctx>, tpl: &TopicPartitionList) {
        let keys = keys_of(tpl);
        if keys.is_empty() {
            return;
        }
        // Paused until the background job says where they start.
        if let Err(e) = c.pause(tpl) {
            tracing::warn!(error = %e, "cannot pause newly assigned partitions");
        }
        for k in &keys {
            let first_seq = self.emitted(k);
            let epoch = self.tracker.assign(k, first_seq);
            lock(&self.committed).remove(k);
            lock(&self.assigned).insert(
                k.clone(),
                Assigned {
                    epoch,
                    phase: Phase::Starting { dropped: None },
                },
            );
            let _ = self.control.send(Control::Start {
                partition: k.clone(),
                epoch,
                first_seq,
            });
            self.starter.spawn(&self.runtime, k.clone(), epoch);
        }
        self.count_assigned();
        self.stats
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(partitions = ?names(&keys), "partitions assigned; starting them");
    }

    /// A partition the start job finished: position it and let it run.
    pub(super) fn started(&self, c: &BaseConsumer<Ctx>, r: Ready) {
        let dropped = {
            let mut assigned = lock(&self.assigned);
            let Some(a) = assigned
                .get_mut(&r.partition)
                .filter(|a| a.epoch == r.epoch)
            else {
                return;
            };
            let Phase::Starting { dropped } = a.phase else {
                return;
            };
            a.phase = Phase::Running;
            dropped
        };
        // Always an absolute position: resuming a partition paused before
        // its position was known would make librdkafka resolve it again,
        // later, and move it back under records already read.
        let at = match r.at {
            StartAt::Committed(o) => Some(o),
            StartAt::Reset(o) => o.or(dropped),
        };
        let k = &r.partition;
        match at {
            Some(o) => {
                lock(&self.next_offset).insert(k.clone(), o);
            }
            None => {
                tracing::warn!(partition = %k, "no start offset (auto.offset.reset names no end of the log): starting from librdkafka's position")
            }
        }
        if !*lock(&self.backpressure) {
            self.resume(c, std::slice::from_ref(k));
        }
        self.count_assigned();
        tracing::info!(partition = %k, from = ?r.at, "partition running");
    }

    /// Resumes `keys`, each positioned first at the offset this source
    /// reads next. A partition whose seek fails stays paused and is tried
    /// again on the next turn of the poll loop, rather than read from a
    /// position that might skip records.
    pub(super) fn resume(&self, c: &BaseConsumer<Ctx>, keys: &[PartitionKey]) {
        let next = lock(&self.next_offset).clone();
        let mut ok = Vec::new();
        let mut unpositioned = lock(&self.unpositioned);
        for k in keys {
            let positioned = match next.get(k) {
                Some(&o) => c
                    .seek(&k.source, k.partition, Offset::Offset(o), Duration::from_secs(5))
                    .map_err(|e| {
                        if unpositioned.insert(k.clone()) {
                            tracing::info!(partition = %k, offset = o, error = %e, "cannot position the partition yet; it stays paused and is tried again");
                        }
                    })
                    .is_ok(),
                None => true,
            };
            if positioned {
                unpositioned.remove(k);
                ok.push(k.clone());
            }
        }
        drop(unpositioned);
        if !ok.is_empty()
            && let Err(e) = c.resume(&tpl_of(&ok))
        {
            tracing::warn!(error = %e, "resuming partitions failed");
        }
    }

    /// Tries again to position and resume the partitions that could not
    /// be positioned yet (not while backpressure holds everything).
    pub(super) fn retry_unpositioned(&self, c: &BaseConsumer<Ctx>) {
        let keys: Vec<PartitionKey> = {
            let assigned = lock(&self.assigned);
            lock(&self.unpositioned)
                .iter()
                .filter(|k| assigned.contains_key(*k))
                .cloned()
                .collect()
        };
        if keys.is_empty() || *lock(&self.backpressure) {
            return;
        }
        self.resume(c, &keys);
    }

    /// Pauses or resumes the running partitions for backpressure.
    pub(super) fn backpressure(&self, c: &BaseConsumer<Ctx>, on: bool) {
        *lock(&self.backpressure) = on;
        let running = self.running();
        if on {
            if let Err(e) = c.pause(&tpl_of(&running)) {
                tracing::warn!(error = %e, "pausing for backpressure failed");
            }
        } else {
            self.resume(c, &running);
        }
        self.stats.kafka.paused(on);
    }
}

pub(super) fn keys_of(tpl: &TopicPartitionList) -> Vec<PartitionKey> {
    tpl.elements()
        .iter()
        .map(|e| PartitionKey {
            source: Arc::from(e.topic()),
            partition: e.partition(),
        })
        .collect()
}

/// Partitions as the logs show them.
pub(super) fn names(keys: &[PartitionKey]) -> Vec<String> {
    keys.iter().map(ToString::to_string).collect()
}

/// The consumer's context: rebalance, commit and statistics callbacks.
pub(super) struct Ctx(pub(super) Arc<Shared>);

impl ClientContext for Ctx {
    fn stats(&self, s: Statistics) {
        let assigned = lock(&self.0.assigned).clone();
        for (topic, t) in &s.topics {
            for (p, part) in &t.partitions {
                let key = PartitionKey {
                    source: Arc::from(topic.as_str()),
                    partition: *p,
                };
                if *p >= 0 && assigned.contains_key(&key) && part.consumer_lag >= 0 {
                    self.0.stats.kafka.lag(topic, *p, part.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, c: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = r {
            self.0.revoke(c, tpl);
        }
    }

    fn post_rebalance(&self, c: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        match r {
            Rebalance::Assign(tpl) => self.0.assign(c, tpl),
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}
