//! The Kafka source: one consumer in a consumer group, polled on its own
//! thread, which never blocks for long — so the group never evicts the
//! worker because a downstream stage (S3, the model) is slow.
//!
//! - Offsets are committed by hand (`enable.auto.commit=false`): every
//!   `commit_interval_ms`, each assigned partition's highest *contiguous*
//!   acknowledged offset (from the [`AckTracker`](crate::ack::AckTracker)) is committed, never past
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
//!
//! This module holds the consumer's settings and the poll loop; `group`
//! the assignment state, the commits and the rebalance callbacks;
//! [`start`] how a new partition finds where it starts; [`config`] and
//! [`metrics`] its section and its metrics.

pub mod config;
mod group;
mod headers;
pub mod metrics;
pub mod start;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;

use self::config::KafkaSourceConfig;
use self::group::{Ctx, Phase, Shared, lock, names};
use self::start::Starter;
use super::{Cleanup, SourceContext};
use crate::ack::{PartitionKey, Position};
use crate::record::{Origin, Received, parse_event};
use crate::sink::Control;
use crate::stats::Stats;

/// How the poll loop waits for a free in-flight slot before it pauses the
/// partitions (and serves callbacks while paused).
const PAUSE_AFTER: Duration = Duration::from_millis(500);

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
                        tracing::trace!(partition = %key, offset = o, "set aside (starting)");
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
                tracing::trace!(partition = %key, offset = m.offset(), "skipped: already read");
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
            tracing::trace!(partition = %key, offset = position.offset, seq, "read");
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
