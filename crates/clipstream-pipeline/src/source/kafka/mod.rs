//! The Kafka source: one consumer in a consumer group, polled on its own
//! thread, which never blocks for long — so the group never evicts the
//! worker because a downstream stage (S3, the model) is slow.
//!
//! - Offsets are committed by hand (`enable.auto.commit=false`): every
//!   `commit_interval_ms`, each assigned partition's highest *contiguous*
//!   acknowledged offset (from the [`AckTracker`]) is committed, never past
//!   a record still in flight or failed.
//! - **Backpressure pauses, it does not block.** When the pipeline is full
//!   (no in-flight slot), the poll loop waits up to half a second for one;
//!   then it pauses every running partition and goes on polling, so that
//!   heartbeats and rebalances are served; it resumes them when a slot
//!   frees. The queues the poll thread sends into hold as many items as
//!   there are in-flight slots, and its requests to the sink go on an
//!   unbounded channel, so no send from this thread can wait.
//!   librdkafka's prefetch queue is capped (`queued.max.messages.kbytes`,
//!   8 MiB by default here), so memory stays flat whatever the backlog.
//! - **Assignment** ([`start`]): a new partition is paused at once and
//!   prepared in the background — its committed offset read from the broker
//!   (retried until it is read), leftover output files beyond it removed —
//!   then it is positioned at that offset and resumed.
//! - **Revocation**: revoked partitions stop being read, their open ranges
//!   are completed, their in-flight records get `drain_deadline_ms` to
//!   finish, and what finished is committed before the partitions go. When
//!   the assignment was *lost* (the group moved on without this worker:
//!   its session expired), nothing is completed or committed: the epoch
//!   ends at once, so that no file of it is published any more.
//! - A partition that goes quiet has its range completed after twice the
//!   commit interval, so that its records are committed.
//! - Malformed messages become dead letters; nothing stops a partition.

pub mod config;
mod headers;
pub mod metrics;
pub mod start;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use self::start::{Ready, StartAt, Starter};
use super::{Cleanup, SourceContext};
use crate::ack::{AckTracker, PartitionKey, Position};
use crate::config::KafkaSourceConfig;
use crate::record::{Origin, Received, parse_event};
use crate::sink::Control;
use crate::stats::Stats;

/// How the poll loop waits for a free in-flight slot before it pauses the
/// partitions (and serves callbacks while paused).
const PAUSE_AFTER: Duration = Duration::from_millis(500);

/// Where an assigned partition is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Paused until [`start`] says where it starts; `dropped` is the first
    /// offset of a message that arrived meanwhile (and was not used).
    Starting { dropped: Option<i64> },
    /// Being read.
    Running,
}

#[derive(Debug, Clone, Copy)]
struct Assigned {
    epoch: u64,
    phase: Phase,
}

/// State shared by the poll loop and the rebalance callbacks (which run on
/// the poll thread, inside `poll`).
struct Shared {
    cfg: KafkaSourceConfig,
    tracker: Arc<AckTracker>,
    stats: Arc<Stats>,
    control: flume::Sender<Control>,
    starter: Starter,
    runtime: tokio::runtime::Handle,
    /// Next emission sequence number per partition, for the life of the
    /// process (a partition that comes back continues its numbering).
    next_seq: Mutex<HashMap<PartitionKey, u64>>,
    /// Partitions assigned now.
    assigned: Mutex<HashMap<PartitionKey, Assigned>>,
    /// Last offset committed (the next offset to read) per partition.
    committed: Mutex<HashMap<PartitionKey, i64>>,
    /// True while backpressure holds the running partitions paused.
    backpressure: Mutex<bool>,
    /// Per running partition, the offset to read next: where the partition
    /// started, then past each record read. The source positions the
    /// consumer there itself whenever it resumes a partition (librdkafka's
    /// own resume position after a pause was seen to go back to where a
    /// partition started, so records were read twice).
    next_offset: Mutex<HashMap<PartitionKey, i64>>,
    /// Running partitions left paused because they could not be positioned
    /// yet (librdkafka refuses a seek until its own start of the partition
    /// is done); retried on every turn of the poll loop.
    unpositioned: Mutex<std::collections::HashSet<PartitionKey>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn tpl_of(keys: &[PartitionKey]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for k in keys {
        tpl.add_partition(&k.source, k.partition);
    }
    tpl
}

impl Shared {
    fn emitted(&self, key: &PartitionKey) -> u64 {
        lock(&self.next_seq).get(key).copied().unwrap_or(0)
    }

    fn running(&self) -> Vec<PartitionKey> {
        lock(&self.assigned)
            .iter()
            .filter(|(_, a)| a.phase == Phase::Running)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Shows the partitions assigned now and how many are still starting.
    fn count_assigned(&self) {
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
    fn commit(&self, c: &BaseConsumer<Ctx>, keys: &[PartitionKey]) -> bool {
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

    fn commit_done(&self, r: KafkaResult<()>, started: Instant) -> bool {
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
    fn flush(&self, keys: &[PartitionKey]) {
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
    fn drain(&self, keys: &[PartitionKey], deadline: Instant) -> Vec<PartitionKey> {
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
    fn forget(&self, keys: &[PartitionKey]) {
        for k in keys {
            self.tracker.revoke(k);
            lock(&self.assigned).remove(k);
            lock(&self.next_offset).remove(k);
            lock(&self.unpositioned).remove(k);
            self.stats.kafka.forget(k);
        }
        self.count_assigned();
    }

    fn revoke(&self, c: &BaseConsumer<Ctx>, tpl: &TopicPartitionList) {
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

    fn assign(&self, c: &BaseConsumer<Ctx>, tpl: &TopicPartitionList) {
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
    fn started(&self, c: &BaseConsumer<Ctx>, r: Ready) {
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
                tracing::warn!(partition = %name(k), "no start offset (auto.offset.reset names no end of the log): starting from librdkafka's position")
            }
        }
        if !*lock(&self.backpressure) {
            self.resume(c, std::slice::from_ref(k));
        }
        self.count_assigned();
        tracing::info!(partition = %name(k), from = ?r.at, "partition running");
    }

    /// Resumes `keys`, each positioned first at the offset this source
    /// reads next. A partition whose seek fails stays paused and is tried
    /// again on the next turn of the poll loop, rather than read from a
    /// position that might skip records.
    fn resume(&self, c: &BaseConsumer<Ctx>, keys: &[PartitionKey]) {
        let next = lock(&self.next_offset).clone();
        let mut ok = Vec::new();
        let mut unpositioned = lock(&self.unpositioned);
        for k in keys {
            let positioned = match next.get(k) {
                Some(&o) => c
                    .seek(&k.source, k.partition, Offset::Offset(o), Duration::from_secs(5))
                    .map_err(|e| {
                        if unpositioned.insert(k.clone()) {
                            tracing::info!(partition = %name(k), offset = o, error = %e, "cannot position the partition yet; it stays paused and is tried again");
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
    fn retry_unpositioned(&self, c: &BaseConsumer<Ctx>) {
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
    fn backpressure(&self, c: &BaseConsumer<Ctx>, on: bool) {
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

fn keys_of(tpl: &TopicPartitionList) -> Vec<PartitionKey> {
    tpl.elements()
        .iter()
        .map(|e| PartitionKey {
            source: Arc::from(e.topic()),
            partition: e.partition(),
        })
        .collect()
}

fn name(k: &PartitionKey) -> String {
    format!("{}[{}]", k.source, k.partition)
}

fn names(keys: &[PartitionKey]) -> Vec<String> {
    keys.iter().map(name).collect()
}

/// The consumer's context: rebalance, commit and statistics callbacks.
struct Ctx(Arc<Shared>);

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

/// The librdkafka settings of the consumer: ours, then the raw options.
pub fn consumer_config(cfg: &KafkaSourceConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", cfg.auto_offset_reset.as_str())
        .set("session.timeout.ms", cfg.session_timeout_ms.to_string())
        .set("statistics.interval.ms", "5000")
        // The prefetch queue: librdkafka's defaults (64 MiB, 100k messages)
        // are sized for tiny, cheap records; ours wait for a model.
        .set("queued.max.messages.kbytes", "8192")
        .set("queued.min.messages", "10000")
        .set("client.id", format!("clipstream-{}", std::process::id()));
    for (k, v) in &cfg.options {
        c.set(k, v);
    }
    c
}

/// The Kafka source, ready to run.
pub struct KafkaSource {
    cfg: KafkaSourceConfig,
    control: flume::Sender<Control>,
    cleanup: Option<Arc<dyn Cleanup>>,
    drain_deadline: Duration,
    idle_flush: Duration,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("topics", &self.cfg.topics)
            .field("group", &self.cfg.group_id)
            .finish_non_exhaustive()
    }
}

impl KafkaSource {
    /// A source that sends its requests to the sink on `control`, removes
    /// leftovers with `cleanup` when a partition is assigned, and on stop
    /// gives in-flight records `drain_deadline` before its last commit.
    pub fn new(
        cfg: KafkaSourceConfig,
        control: flume::Sender<Control>,
        cleanup: Option<Arc<dyn Cleanup>>,
        drain_deadline: Duration,
    ) -> Self {
        let idle_flush = cfg.commit_interval().max(Duration::from_millis(200)) * 2;
        KafkaSource {
            cfg,
            control,
            cleanup,
            drain_deadline,
            idle_flush,
        }
    }

    /// Consumes until `ctx.stop` turns true; then drains and commits.
    /// Returns how many records of the assigned partitions did not finish
    /// within the drain deadline (they are read again on restart).
    pub async fn run(self, ctx: SourceContext) -> anyhow::Result<u64> {
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || self.poll_loop(ctx, handle)).await?
    }

    fn poll_loop(self, ctx: SourceContext, rt: tokio::runtime::Handle) -> anyhow::Result<u64> {
        // Never polled for messages: no statistics (they would queue up
        // unread), and its event queue is drained on every turn below.
        let lookup: BaseConsumer = consumer_config(&self.cfg)
            .set(
                "client.id",
                format!("clipstream-{}-lookup", std::process::id()),
            )
            .set("statistics.interval.ms", "0")
            .create()
            .map_err(|e| anyhow::anyhow!("cannot create the Kafka lookup client: {e}"))?;
        let (ready_tx, ready_rx) = flume::unbounded();
        let shared = Arc::new(Shared {
            cfg: self.cfg.clone(),
            tracker: Arc::clone(&ctx.tracker),
            stats: Arc::clone(&ctx.stats),
            control: self.control.clone(),
            starter: Starter {
                lookup: Arc::new(lookup),
                cleanup: self.cleanup.clone(),
                tracker: Arc::clone(&ctx.tracker),
                ready: ready_tx,
                stats: Arc::clone(&ctx.stats),
                reset: self
                    .cfg
                    .options
                    .get("auto.offset.reset")
                    .cloned()
                    .unwrap_or_else(|| self.cfg.auto_offset_reset.as_str().to_string()),
            },
            runtime: rt.clone(),
            next_seq: Mutex::new(HashMap::new()),
            assigned: Mutex::new(HashMap::new()),
            committed: Mutex::new(HashMap::new()),
            backpressure: Mutex::new(false),
            next_offset: Mutex::new(HashMap::new()),
            unpositioned: Mutex::new(std::collections::HashSet::new()),
        });
        let consumer: BaseConsumer<Ctx> = consumer_config(&self.cfg)
            .create_with_context(Ctx(Arc::clone(&shared)))
            .map_err(|e| anyhow::anyhow!("cannot create the Kafka consumer: {e}"))?;
        let topics: Vec<&str> = self.cfg.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| anyhow::anyhow!("cannot subscribe to {topics:?}: {e}"))?;
        tracing::info!(brokers = %self.cfg.brokers, topics = ?topics, group = %self.cfg.group_id, "consuming");

        let commit_every = self.cfg.commit_interval();
        let mut last_commit = Instant::now();
        let mut last_seen: HashMap<PartitionKey, Instant> = HashMap::new();
        let mut night: Option<crate::catalog::progress::NightMark> = None;
        let mut flushed: HashMap<PartitionKey, u64> = HashMap::new();
        let mut stop = ctx.stop.clone();
        let stopped = |s: &mut tokio::sync::watch::Receiver<bool>| *s.borrow_and_update();
        while !stopped(&mut stop) {
            for r in ready_rx.try_iter() {
                shared.started(&consumer, r);
            }
            // Errors and logs of the lookup client, not to pile up.
            while let Some(Err(e)) = shared.starter.lookup.poll(Duration::ZERO) {
                tracing::debug!(error = %e, "Kafka lookup client");
            }
            shared.retry_unpositioned(&consumer);
            if last_commit.elapsed() >= commit_every {
                let keys = shared.running();
                shared.commit(&consumer, &keys);
                // Quiet partitions: complete their ranges so they get
                // committed.
                for k in &keys {
                    let emitted = shared.emitted(k);
                    let quiet = last_seen
                        .get(k)
                        .is_some_and(|t| t.elapsed() >= self.idle_flush);
                    if quiet && emitted > 0 && flushed.get(k) != Some(&emitted) {
                        shared.flush(std::slice::from_ref(k));
                        flushed.insert(k.clone(), emitted);
                    }
                }
                last_commit = Instant::now();
            }
            // Backpressure. A full pipeline usually frees a slot within a
            // batch: wait for one without polling (librdkafka keeps its
            // prefetched messages). Only when none frees up within
            // PAUSE_AFTER pause everything and keep polling, so that
            // callbacks are served; pausing at once on every full moment
            // would purge the prefetch queue each time and make every
            // resume wait for a fetch round trip.
            let slot = Arc::clone(&ctx.in_flight)
                .try_acquire_owned()
                .ok()
                .or_else(|| {
                    rt.block_on(tokio::time::timeout(
                        PAUSE_AFTER,
                        Arc::clone(&ctx.in_flight).acquire_owned(),
                    ))
                    .ok()
                    .and_then(Result::ok)
                });
            // A spent memory budget holds the source back like a full
            // pipeline.
            let slot = slot.filter(|_| {
                !ctx.budget.spent() || {
                    let mut probe = ctx.budget.empty();
                    rt.block_on(ctx.budget.grow_within(&mut probe, 1, PAUSE_AFTER))
                }
            });
            let paused = *lock(&shared.backpressure);
            let slot = match slot {
                Some(p) => {
                    if paused {
                        shared.backpressure(&consumer, false);
                    }
                    p
                }
                None => {
                    if !paused {
                        shared.backpressure(&consumer, true);
                    }
                    // Serve callbacks. A message fetched before the pause
                    // took effect is left: the resume positions the
                    // partition at the next offset to read, so it is read
                    // again then.
                    if let Some(Err(e)) = consumer.poll(Duration::from_millis(50)) {
                        tracing::warn!(error = %e, "Kafka error");
                    }
                    continue;
                }
            };
            let Some(m) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "Kafka error (librdkafka retries by itself)");
                    continue;
                }
            };
            let key = PartitionKey {
                source: Arc::from(m.topic()),
                partition: m.partition(),
            };
            {
                let mut assigned = lock(&shared.assigned);
                match assigned.get_mut(&key).map(|a| &mut a.phase) {
                    Some(Phase::Running) => {}
                    Some(Phase::Starting { dropped }) => {
                        // Fetched before the pause of a new assignment took
                        // effect: it is read again once the partition starts.
                        let o = m.offset();
                        tracing::trace!(partition = %name(&key), offset = o, "set aside (starting)");
                        *dropped = Some(dropped.map_or(o, |d| d.min(o)));
                        continue;
                    }
                    // A message of a partition being revoked.
                    None => continue,
                }
            }
            // Read already in this assignment (delivered again from before
            // a repositioning): skip it, never emit an offset twice.
            if lock(&shared.next_offset)
                .get(&key)
                .is_some_and(|&next| m.offset() < next)
            {
                tracing::trace!(partition = %name(&key), offset = m.offset(), "skipped: already read");
                continue;
            }
            last_seen.insert(key.clone(), Instant::now());
            let seq = {
                let mut seqs = lock(&shared.next_seq);
                let s = seqs.entry(key.clone()).or_insert(0);
                *s += 1;
                *s - 1
            };
            let position = Position {
                seq,
                offset: m.offset(),
            };
            tracing::trace!(partition = %name(&key), offset = position.offset, seq, "read");
            lock(&shared.next_offset).insert(key.clone(), position.offset + 1);
            let ack = ctx.tracker.token(key.clone(), position);
            Stats::add(&ctx.stats.records.read, 1);
            let parsed = match m.payload() {
                None => Err(crate::record::EventError {
                    id: None,
                    kind: crate::dead_letter::Kind::EmptyEvent,
                    reason: "message has no value (a tombstone)".into(),
                }),
                Some(p) => parse_event(p, self.cfg.max_event_bytes),
            };
            let permit = crate::record::Permit::new(
                slot,
                // The original bytes, and the parsed event (no larger).
                ctx.budget
                    .charge(2 * m.payload().map_or(0, <[u8]>::len) as u64),
            );
            let headers = headers::read(&m);
            // A night's events say how many it planned (the dashboard's
            // progress); shown when it changes, not on every event.
            if !headers.is_empty()
                && let Some(mark) = crate::catalog::progress::parse(&headers)
                && night.as_ref() != Some(&mark)
            {
                ctx.stats.night.mark(&mark);
                night = Some(mark);
            }
            let received = Received {
                origin: Origin {
                    partition: key,
                    position,
                    key: m.key().map(Arc::from),
                    headers,
                    raw: Arc::from(m.payload().unwrap_or_default()),
                    event_time_ms: m.timestamp().to_millis(),
                },
                ack,
                permit,
            };
            // These queues hold as many items as there are in-flight slots,
            // and this record holds one: the sends cannot wait.
            let sent = match received.admit(parsed) {
                Ok(record) => ctx.records.send(record).is_ok(),
                Err(dead) => ctx.done.send(*dead).is_ok(),
            };
            if !sent {
                break;
            }
        }

        // Stop: no more reading; complete every range, let the records in
        // flight finish, commit, leave the group.
        let keys = shared.running();
        shared.flush(&keys);
        let SourceContext { records, done, .. } = ctx;
        drop(records);
        drop(done);
        let left = shared.drain(&keys, Instant::now() + self.drain_deadline);
        shared.commit(&consumer, &keys);
        let undrained: u64 = left
            .iter()
            .map(|k| {
                shared
                    .emitted(k)
                    .saturating_sub(shared.tracker.watermark(k).contiguous)
            })
            .sum();
        if !left.is_empty() {
            tracing::warn!(partitions = ?names(&left), "stopped before every record finished; they are read again on restart");
        }
        // The assignments end here: nothing of them is published or retried
        // any more (their next owner redoes what is left). Leaving the group
        // then revokes the partitions (already committed).
        let all: Vec<PartitionKey> = lock(&shared.assigned).keys().cloned().collect();
        shared.forget(&all);
        consumer.unsubscribe();
        for _ in 0..20 {
            if consumer.poll(Duration::from_millis(50)).is_none()
                && consumer.assignment().map_or(true, |a| a.count() == 0)
            {
                break;
            }
        }
        Ok(undrained)
    }
}
