//! The Kafka source: one consumer in a consumer group, polled on its own
//! thread.
//!
//! - Offsets are committed by hand (`enable.auto.commit=false`): every
//!   `commit_interval_ms`, each assigned partition's highest *contiguous*
//!   acknowledged offset (from the [`AckTracker`]) is committed, never past
//!   a record still in flight or failed.
//! - When the pipeline is full (no in-flight slot), the poll loop waits
//!   for a slot; if none frees within half a second, every assigned
//!   partition is paused and polling goes on (so that callbacks are
//!   served); they resume when a slot frees. librdkafka's prefetch queue is
//!   capped (`queued.max.messages.kbytes`, 8 MiB by default here), so
//!   memory stays flat whatever the backlog.
//! - On a rebalance, revoked partitions stop being read, their open files
//!   are closed, their in-flight records get `drain_deadline_ms` to finish,
//!   and what finished is committed before the partitions go. Newly assigned
//!   partitions start from the committed offset; output files left behind
//!   beyond it (by a worker that died between writing and committing) are
//!   deleted first, so that the Parquet output holds each record once.
//! - A partition that goes quiet has its open file closed after
//!   `idle_flush_ms`, so that its records are committed.
//! - Malformed messages become dead letters; nothing stops a partition.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::SourceContext;
use crate::ack::{AckTracker, PartitionKey, Position};
use crate::config::KafkaSourceConfig;
use crate::record::{Origin, Received, parse_event};
use crate::sink::{Cleanup, SinkMsg};
use crate::stats::Stats;

/// State shared by the poll loop and the rebalance callbacks (which run on
/// the poll thread, inside `poll`).
struct Shared {
    cfg: KafkaSourceConfig,
    tracker: Arc<AckTracker>,
    stats: Arc<Stats>,
    sink: flume::Sender<SinkMsg>,
    cleanup: Option<Arc<dyn Cleanup>>,
    /// Next emission sequence number per partition, for the life of the
    /// process (a partition that comes back continues its numbering).
    next_seq: Mutex<HashMap<PartitionKey, u64>>,
    /// Partitions assigned now.
    assigned: Mutex<HashSet<PartitionKey>>,
    /// Last offset committed (the next offset to read) per partition.
    committed: Mutex<HashMap<PartitionKey, i64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn emitted(&self, key: &PartitionKey) -> u64 {
        lock(&self.next_seq).get(key).copied().unwrap_or(0)
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
        self.stats
            .kafka_commit_seconds
            .observe(started.elapsed().as_secs_f64());
        match r {
            Ok(()) => {
                tracing::debug!(
                    took_ms = started.elapsed().as_millis() as u64,
                    "offsets committed"
                );
                self.stats.kafka_commits.with_label_values(&["ok"]).inc();
                true
            }
            Err(e) => {
                // A failed commit is retried by the next one; forget what we
                // thought was committed so that it is sent again.
                tracing::warn!(error = %e, "offset commit failed; the next commit retries it");
                self.stats.kafka_commits.with_label_values(&["error"]).inc();
                lock(&self.committed).clear();
                false
            }
        }
    }

    /// Closes the open files of `keys` once every record emitted so far has
    /// reached the sink.
    fn flush(&self, keys: &[PartitionKey]) {
        for k in keys {
            let emitted = self.emitted(k);
            if emitted > 0 {
                let _ = self.sink.send(SinkMsg::Flush {
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

    fn revoke(&self, c: &BaseConsumer<Ctx>, tpl: &TopicPartitionList) {
        // Partitions this worker already let go (at shutdown) need nothing.
        let keys: Vec<PartitionKey> = {
            let assigned = lock(&self.assigned);
            keys_of(tpl)
                .into_iter()
                .filter(|k| assigned.contains(k))
                .collect()
        };
        if keys.is_empty() {
            return;
        }
        let started = Instant::now();
        self.flush(&keys);
        let left = self.drain(
            &keys,
            started + Duration::from_millis(self.cfg.drain_deadline_ms),
        );
        let committed = self.commit(c, &keys);
        for k in &keys {
            self.tracker.revoke(k);
            lock(&self.assigned).remove(k);
            let _ = self
                .stats
                .kafka_lag
                .remove_label_values(&[&*k.source, &k.partition.to_string()]);
        }
        self.stats
            .kafka_assigned
            .set(lock(&self.assigned).len() as i64);
        if !left.is_empty() {
            tracing::warn!(partitions = ?names(&left), "partitions revoked before their records finished; the next owner reprocesses them");
        } else if !committed {
            // Typically the session expired (brokers unreachable): the group
            // has moved on, and the next owner reprocesses from the last
            // committed offsets; their Parquet leftovers are removed then.
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
        let committed = c
            .committed_offsets(tpl.clone(), Duration::from_secs(10))
            .ok();
        for k in &keys {
            let start = committed
                .as_ref()
                .and_then(|t| t.find_partition(&k.source, k.partition))
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            self.tracker.assign(k, self.emitted(k));
            lock(&self.committed).remove(k);
            if let Some(cleanup) = &self.cleanup {
                let from = match start {
                    Some(o) => Some(o),
                    None if self.cfg.auto_offset_reset == "earliest" => Some(0),
                    None => None,
                };
                if let Some(from) = from
                    && let Err(e) = cleanup.remove_from(k, from)
                {
                    tracing::warn!(partition = %name(k), error = %e, "could not remove output files left beyond the committed offset");
                }
            }
            lock(&self.assigned).insert(k.clone());
        }
        self.stats
            .kafka_assigned
            .set(lock(&self.assigned).len() as i64);
        self.stats
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(partitions = ?names(&keys), "partitions assigned");
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
                if *p >= 0 && assigned.contains(&key) && part.consumer_lag >= 0 {
                    self.0
                        .stats
                        .kafka_lag
                        .with_label_values(&[topic, &p.to_string()])
                        .set(part.consumer_lag);
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
/// How long the poll loop waits for a free in-flight slot before it pauses
/// the partitions (and serves callbacks while paused).
const PAUSE_AFTER: Duration = Duration::from_millis(500);

pub fn consumer_config(cfg: &KafkaSourceConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &cfg.auto_offset_reset)
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
    sink: flume::Sender<SinkMsg>,
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
    /// A source that sends flush requests to `sink`, removes leftovers with
    /// `cleanup` on assignment, and on stop gives in-flight records
    /// `drain_deadline` before its last commit.
    pub fn new(
        cfg: KafkaSourceConfig,
        sink: flume::Sender<SinkMsg>,
        cleanup: Option<Arc<dyn Cleanup>>,
        drain_deadline: Duration,
    ) -> Self {
        let idle_flush = Duration::from_millis(cfg.commit_interval_ms.max(200) * 2);
        KafkaSource {
            cfg,
            sink,
            cleanup,
            drain_deadline,
            idle_flush,
        }
    }

    /// Consumes until `ctx.stop` turns true; then drains and commits.
    /// Returns how many records of the assigned partitions did not finish
    /// within the drain deadline (they are read again on restart).
    pub async fn run(self, ctx: SourceContext) -> anyhow::Result<u64> {
        tokio::task::spawn_blocking(move || self.poll_loop(ctx)).await?
    }

    fn poll_loop(self, ctx: SourceContext) -> anyhow::Result<u64> {
        let shared = Arc::new(Shared {
            cfg: self.cfg.clone(),
            tracker: Arc::clone(&ctx.tracker),
            stats: Arc::clone(&ctx.stats),
            sink: self.sink.clone(),
            cleanup: self.cleanup.clone(),
            next_seq: Mutex::new(HashMap::new()),
            assigned: Mutex::new(HashSet::new()),
            committed: Mutex::new(HashMap::new()),
        });
        let consumer: BaseConsumer<Ctx> = consumer_config(&self.cfg)
            .create_with_context(Ctx(Arc::clone(&shared)))
            .map_err(|e| anyhow::anyhow!("cannot create the Kafka consumer: {e}"))?;
        let topics: Vec<&str> = self.cfg.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| anyhow::anyhow!("cannot subscribe to {topics:?}: {e}"))?;
        tracing::info!(brokers = %self.cfg.brokers, topics = ?topics, group = %self.cfg.group_id, "consuming");

        let rt = tokio::runtime::Handle::current();
        let commit_every = Duration::from_millis(self.cfg.commit_interval_ms);
        let mut last_commit = Instant::now();
        let mut paused = false;
        let mut last_seen: HashMap<PartitionKey, Instant> = HashMap::new();
        let mut flushed: HashMap<PartitionKey, u64> = HashMap::new();
        let mut stop = ctx.stop.clone();
        let stopped = |s: &mut tokio::sync::watch::Receiver<bool>| *s.borrow_and_update();
        while !stopped(&mut stop) {
            if last_commit.elapsed() >= commit_every {
                let keys: Vec<PartitionKey> = lock(&shared.assigned).iter().cloned().collect();
                shared.commit(&consumer, &keys);
                // Quiet partitions: close their files so they get committed.
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
            let permit = match slot {
                Some(p) => {
                    if paused {
                        if let Ok(a) = consumer.assignment() {
                            let _ = consumer.resume(&a);
                        }
                        paused = false;
                        ctx.stats.kafka_paused.set(0);
                    }
                    p
                }
                None => {
                    if !paused {
                        if let Ok(a) = consumer.assignment() {
                            let _ = consumer.pause(&a);
                        }
                        paused = true;
                        ctx.stats.kafka_paused.set(1);
                        ctx.stats.kafka_pauses.inc();
                    }
                    // Serve callbacks; a paused consumer returns no messages
                    // (librdkafka purges the fetch queue on pause).
                    if let Some(m) = consumer.poll(Duration::from_millis(50)) {
                        match m {
                            Ok(m) => {
                                // Fetched before the pause took effect: seek
                                // back so it is read again after the resume.
                                let _ = consumer.seek(
                                    m.topic(),
                                    m.partition(),
                                    Offset::Offset(m.offset()),
                                    Duration::from_secs(1),
                                );
                            }
                            Err(e) => tracing::warn!(error = %e, "Kafka error"),
                        }
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
            if !lock(&shared.assigned).contains(&key) {
                // A message of a partition being revoked.
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
            let ack = ctx.tracker.token(key.clone(), position);
            Stats::add(&ctx.stats.read, 1);
            let raw: Arc<[u8]> = Arc::from(m.payload().unwrap_or_default());
            let msg_key: Option<Arc<[u8]>> = m.key().map(Arc::from);
            let headers = read_headers(&m);
            let event_time_ms = m.timestamp().to_millis();
            let parsed = match m.payload() {
                None => Err(crate::record::EventError {
                    id: None,
                    kind: crate::dead_letter::Kind::EmptyEvent,
                    reason: "message has no value (a tombstone)".into(),
                }),
                Some(p) => parse_event(p, self.cfg.max_event_bytes),
            };
            let received = Received {
                origin: Origin {
                    partition: key,
                    position,
                    key: msg_key,
                    headers,
                    raw,
                    event_time_ms,
                },
                ack,
                permit,
            };
            let sent = match received.admit(parsed) {
                Ok(record) => ctx.records.send(record).is_ok(),
                Err(dead) => ctx.done.send(*dead).is_ok(),
            };
            if !sent {
                break;
            }
        }

        // Stop: no more reading; close every file, let the records in
        // flight finish, commit, leave the group.
        let keys: Vec<PartitionKey> = lock(&shared.assigned).iter().cloned().collect();
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
        // Leaving the group revokes the partitions (already committed).
        lock(&shared.assigned).clear();
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

/// A message's headers, read without trusting them. rdkafka's accessors
/// unwrap the conversion of every header name to UTF-8, so one message with
/// a name of other bytes would panic the poll thread (and every worker that
/// takes the partition after it). Here names that are not UTF-8 are kept
/// with the offending bytes escaped (`\xff`), so that a dead letter still
/// shows them; nothing else reads header names.
#[allow(unsafe_code)]
fn read_headers(m: &BorrowedMessage<'_>) -> crate::dead_letter::Headers {
    use rdkafka::bindings as rd;
    use std::ffi::{CStr, c_char, c_void};
    let ok = rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR;
    let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `m.ptr()` is the live message `m` borrows; the headers it
    // returns are owned by the message and live as long as `m`.
    if unsafe { rd::rd_kafka_message_headers(m.ptr(), &mut hdrs) } != ok || hdrs.is_null() {
        return Arc::from([]);
    }
    // SAFETY: `hdrs` is valid (above).
    let count = unsafe { rd::rd_kafka_header_cnt(hdrs) };
    let mut out = Vec::with_capacity(count);
    for idx in 0..count {
        let mut name: *const c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size = 0usize;
        // SAFETY: `hdrs` is valid and `idx` is below its count; the out
        // pointers are valid for writes.
        let err =
            unsafe { rd::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
        if err != ok || name.is_null() {
            continue;
        }
        // SAFETY: librdkafka's header names are NUL-terminated and live as
        // long as the headers; values are `size` bytes (or null: no value).
        let (name, value) = unsafe {
            (
                CStr::from_ptr(name).to_bytes(),
                (!value.is_null()).then(|| std::slice::from_raw_parts(value.cast::<u8>(), size)),
            )
        };
        out.push((escape_name(name), value.map(<[u8]>::to_vec)));
    }
    Arc::from(out)
}

/// A header name as text: UTF-8 as is, other bytes as `\xNN`.
fn escape_name(name: &[u8]) -> String {
    match std::str::from_utf8(name) {
        Ok(s) => s.to_string(),
        Err(_) => name.utf8_chunks().fold(String::new(), |mut s, chunk| {
            s.push_str(chunk.valid());
            for b in chunk.invalid() {
                s.push_str(&format!("\\x{b:02x}"));
            }
            s
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_that_are_not_utf8_are_escaped() {
        assert_eq!(escape_name(b"trace-id"), "trace-id");
        assert_eq!(escape_name(b"a\xffb\xc3"), "a\\xffb\\xc3");
        assert_eq!(escape_name("é".as_bytes()), "é");
    }
}
