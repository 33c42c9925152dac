//! Sinks: where results and dead letters are made durable, and where
//! acknowledgements are given.
//!
//! - [`kafka`]: the outputs stage (embeddings, labels and dead-letter
//!   topics), between the encoders and the sink thread.
//! - [`parquet`]: the Parquet writer (ranges of records, one file each) and
//!   where files are published ([`parquet::destination`]).
//! - [`dead_letter_file`]: dead letters as JSON lines (local runs).
//! - [`config`]: `[sink]`, with `[sink.parquet]` and `[sink.kafka]` beside
//!   their writers.
//! - this module: the sink thread, which puts each partition's results back
//!   in source order before writing them, so that files hold contiguous
//!   ranges and are named deterministically by their first offset.
//!
//! The sink thread takes results on a bounded channel and requests from the
//! source on an unbounded one ([`Control`]): the source's requests never
//! wait behind results, so the source never blocks on the sink.

pub mod config;
pub mod dead_letter_file;
pub mod kafka;
pub mod parquet;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::ack::PartitionKey;
use crate::fatal::Fatal;
use crate::record::Done;
use crate::stats::Stats;

use self::dead_letter_file::DeadLetterFile;
use self::parquet::{ParquetWriter, SinkError};

/// Requests from the source to the sink thread.
#[derive(Debug, Clone)]
pub enum Control {
    /// A partition was assigned: its records from `first_seq` on belong to
    /// assignment `epoch`; results of earlier assignments are dropped.
    Start {
        /// The partition.
        partition: PartitionKey,
        /// Its assignment epoch.
        epoch: u64,
        /// Sequence number of its first record.
        first_seq: u64,
    },
    /// Complete the partition's range once every record up to `upto_seq`
    /// has arrived (rebalance, shutdown, a quiet partition).
    Flush {
        /// The partition.
        partition: PartitionKey,
        /// Last emitted sequence number.
        upto_seq: u64,
    },
    /// The partition was lost without a handover (the group moved on):
    /// drop what assignment `epoch` has not published.
    Drop {
        /// The partition.
        partition: PartitionKey,
        /// The assignment that ended.
        epoch: u64,
    },
}

/// Puts one partition's results in emission order.
#[derive(Debug)]
struct Sequencer {
    epoch: u64,
    next_seq: u64,
    pending: BTreeMap<u64, Done>,
    /// Complete the range once `next_seq` passes this.
    flush_upto: Option<u64>,
}

impl Sequencer {
    fn new(epoch: u64, first_seq: u64) -> Self {
        Sequencer {
            epoch,
            next_seq: first_seq,
            pending: BTreeMap::new(),
            flush_upto: None,
        }
    }

    /// Accepts one result; returns every result that is now in order.
    fn push(&mut self, done: Done) -> Vec<Done> {
        let seq = done.ack().position().seq;
        if seq < self.next_seq {
            // Cannot happen for a result of this epoch; dropping it fails it.
            tracing::warn!(seq, next = self.next_seq, "a result arrived twice");
            return Vec::new();
        }
        self.pending.insert(seq, done);
        let mut ready = Vec::new();
        while let Some(d) = self.pending.remove(&self.next_seq) {
            ready.push(d);
            self.next_seq += 1;
        }
        ready
    }
}

/// What the sink thread needs.
#[derive(Debug)]
pub struct SinkThread {
    /// Results, from the outputs stage.
    pub results: flume::Receiver<Done>,
    /// Requests from the source.
    pub control: flume::Receiver<Control>,
    /// The Parquet writer.
    pub parquet: ParquetWriter,
    /// The dead-letter file (local runs); without one, dead letters were
    /// delivered to the dead-letter topic before reaching here.
    pub dead_letters: Option<DeadLetterFile>,
    /// The memory budget: rows buffered in open files are charged to it,
    /// and the largest file's rows are flushed while it is spent.
    pub budget: Arc<crate::budget::Budget>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Set when the sink cannot go on.
    pub fatal: Arc<Fatal>,
}

struct State {
    sequencers: HashMap<PartitionKey, Sequencer>,
    /// Set after a write failed: nothing more is written (what arrives is
    /// dropped, so its tokens fail and nothing more is committed).
    failed: bool,
}

impl SinkThread {
    /// Orders, writes, acknowledges, until every sender of `results` is
    /// gone; then publishes every open range. A write that fails (disk
    /// full, the output refused for good) is fatal: it is reported through
    /// [`Fatal`], everything after it is dropped unwritten, and the error is
    /// returned.
    pub fn run(mut self) -> Result<(), SinkError> {
        let mut st = State {
            sequencers: HashMap::new(),
            failed: false,
        };
        let mut first_error: Option<SinkError> = None;
        let mut control_open = true;
        let mut open_files = self.budget.empty();
        #[allow(clippy::large_enum_variant)] // one lives at a time, on the stack
        enum Ev {
            Result(Result<Done, flume::RecvError>),
            Control(Result<Control, flume::RecvError>),
            Idle,
        }
        loop {
            while let Ok(c) = self.control.try_recv() {
                self.guard(&mut st, &mut first_error, |s, st| s.control(st, c));
            }
            let ev = if control_open {
                flume::Selector::new()
                    .recv(&self.results, Ev::Result)
                    .recv(&self.control, Ev::Control)
                    .wait_timeout(Duration::from_millis(200))
                    .unwrap_or(Ev::Idle)
            } else {
                match self.results.recv_timeout(Duration::from_millis(200)) {
                    Ok(d) => Ev::Result(Ok(d)),
                    Err(flume::RecvTimeoutError::Timeout) => Ev::Idle,
                    Err(flume::RecvTimeoutError::Disconnected) => {
                        Ev::Result(Err(flume::RecvError::Disconnected))
                    }
                }
            };
            match ev {
                Ev::Result(Ok(done)) => {
                    // A request sent before this result's record was read
                    // may still be queued: take it first.
                    while let Ok(c) = self.control.try_recv() {
                        self.guard(&mut st, &mut first_error, |s, st| s.control(st, c));
                    }
                    self.guard(&mut st, &mut first_error, |s, st| s.result(st, done));
                }
                Ev::Result(Err(_)) => break,
                Ev::Control(Ok(c)) => {
                    self.guard(&mut st, &mut first_error, |s, st| s.control(st, c));
                }
                Ev::Control(Err(_)) => control_open = false,
                Ev::Idle => {}
            }
            if !st.failed {
                // Open files' rows are charged to the budget; while it is
                // spent, the largest file writes its rows out (its row group
                // ends early; its rows and name stay the same).
                let buffered = self.parquet.buffered_bytes();
                if buffered > 0 && self.budget.spent() {
                    self.guard(&mut st, &mut first_error, |s, _| s.parquet.flush_largest());
                }
                let buffered = self.parquet.buffered_bytes();
                if buffered > open_files.bytes() {
                    open_files.grow(buffered - open_files.bytes());
                } else {
                    open_files.shrink(open_files.bytes() - buffered);
                }
            }
        }
        if !st.failed {
            self.guard(&mut st, &mut first_error, |s, _| s.parquet.complete_all());
        }
        let stuck: usize = st.sequencers.values().map(|s| s.pending.len()).sum();
        if stuck > 0 {
            tracing::warn!(
                records = stuck,
                "results left unwritten behind records that never finished"
            );
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Runs one step unless the sink already failed; a failure is fatal.
    fn guard(
        &mut self,
        st: &mut State,
        first_error: &mut Option<SinkError>,
        step: impl FnOnce(&mut Self, &mut State) -> Result<(), SinkError>,
    ) {
        if st.failed {
            return;
        }
        if let Err(e) = step(self, st) {
            self.fatal.set(format!("the sink cannot write: {e}"));
            st.failed = true;
            first_error.get_or_insert(e);
        }
    }

    fn control(&mut self, st: &mut State, c: Control) -> Result<(), SinkError> {
        match c {
            Control::Start {
                partition,
                epoch,
                first_seq,
            } => {
                if let Some(old) = st
                    .sequencers
                    .insert(partition.clone(), Sequencer::new(epoch, first_seq))
                {
                    self.parquet.abort_epoch(&partition, old.epoch);
                }
            }
            Control::Flush {
                partition,
                upto_seq,
            } => {
                if let Some(seq) = st.sequencers.get_mut(&partition) {
                    if seq.next_seq > upto_seq {
                        self.parquet.complete(&partition)?;
                    } else {
                        seq.flush_upto = Some(upto_seq);
                    }
                }
            }
            Control::Drop { partition, epoch } => {
                self.parquet.abort_epoch(&partition, epoch);
                if st
                    .sequencers
                    .get(&partition)
                    .is_some_and(|s| s.epoch == epoch)
                {
                    st.sequencers.remove(&partition);
                }
            }
        }
        Ok(())
    }

    fn result(&mut self, st: &mut State, done: Done) -> Result<(), SinkError> {
        // A row's original bytes were kept for a dead letter the outputs
        // might still have made; past them, only the row is needed.
        let done = match done {
            Done::Row {
                row,
                origin,
                ack,
                mut permit,
            } => {
                permit.memory.shrink(origin.raw.len() as u64);
                Done::Row {
                    row,
                    origin: origin.without_bytes(),
                    ack,
                    permit,
                }
            }
            other => other,
        };
        let key = done.ack().partition().clone();
        let epoch = done.ack().epoch();
        if !done.ack().is_current() {
            // Its assignment ended (revoked or lost): the partition's next
            // owner processes it anew. Never sequenced: it would wait for
            // records that will not come, holding its slot.
            self.finished(1);
            drop(done);
            return Ok(());
        }
        let seq = st
            .sequencers
            .entry(key.clone())
            .or_insert_with(|| Sequencer::new(epoch, 0));
        if epoch != seq.epoch {
            // A result of an assignment that ended: its partition's next
            // owner (maybe this worker again) processes it anew.
            self.finished(1);
            drop(done);
            return Ok(());
        }
        let ready = seq.push(done);
        let next = seq.next_seq;
        let flush = seq.flush_upto.is_some_and(|upto| next > upto);
        if flush {
            seq.flush_upto = None;
        }
        for d in ready {
            self.write(d)?;
        }
        if flush {
            self.parquet.complete(&key)?;
        }
        Ok(())
    }

    fn finished(&self, n: u64) {
        Stats::add(&self.stats.records.finished, n);
        self.stats.records.in_flight.set(
            Stats::get(&self.stats.records.read) as i64
                - Stats::get(&self.stats.records.finished) as i64,
        );
    }

    fn write(&mut self, d: Done) -> Result<(), SinkError> {
        self.finished(1);
        match d {
            Done::Row {
                row, ack, permit, ..
            } => {
                drop(permit);
                if ack.is_current() {
                    self.parquet.append(row, ack)?;
                } else {
                    // Its partition was revoked: the next owner writes it.
                    self.parquet.abort_epoch(ack.partition(), ack.epoch());
                    ack.failed();
                }
            }
            Done::Failed {
                reason,
                ack,
                permit,
            } => {
                drop(permit);
                if ack.is_current() {
                    tracing::error!(offset = ack.position().offset, %reason, "record failed; it is processed again on restart");
                    Stats::add(&self.stats.records.failed, 1);
                }
                self.parquet.failed(ack)?;
            }
            Done::Dead {
                letter,
                ack,
                permit,
            } => {
                drop(permit);
                if let Some(file) = self.dead_letters.as_mut() {
                    file.write(&letter)?;
                }
                self.stats.dead_letter(letter.stage, letter.kind);
                if ack.is_current() {
                    self.parquet.dead_lettered(ack)?;
                } else {
                    ack.failed();
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::Semaphore;

    use super::*;
    use crate::ack::{AckTracker, Position};
    use crate::config::ParquetConfig;
    use crate::dead_letter::{Kind, Stage};
    use crate::record::{Origin, OutputRow};
    use crate::sink::parquet::Destination;

    fn row(key: &PartitionKey, offset: i64) -> OutputRow {
        OutputRow {
            id: format!("id-{offset}"),
            source: Arc::clone(&key.source),
            partition: key.partition,
            offset,
            image_uri: None,
            image_etag: None,
            text: Some("t".into()),
            attributes: None,
            image_embedding: None,
            text_embedding: Some(vec![0.6, 0.8]),
            labels: None,
            clip_score: None,
            needs_review: None,
            review_reason: None,
            event_time_ms: None,
            processed_at_ms: 0,
        }
    }

    /// A sink thread writing Parquet files into a fresh `dir` (with a
    /// dead-letter file there when `dead_letters`); its result and control
    /// senders, its thread and its stats.
    #[allow(clippy::type_complexity)]
    fn start_sink(
        dir: &std::path::Path,
        max_rows_per_file: usize,
        row_group_rows: usize,
        dead_letters: bool,
    ) -> (
        flume::Sender<Done>,
        flume::Sender<Control>,
        std::thread::JoinHandle<Result<(), SinkError>>,
        Arc<Stats>,
    ) {
        let _ = std::fs::remove_dir_all(dir);
        let stats = Arc::new(Stats::default());
        let cfg = ParquetConfig {
            dir: Some(dir.to_path_buf()),
            url: None,
            spool_dir: None,
            part_bytes: 5 << 20,
            partition_by_date: false,
            max_file_span_secs: None,
            max_rows_per_file,
            max_bytes_per_file: 1 << 30,
            row_group_rows,
            zstd_level: 3,
        };
        let dest = Destination::Local {
            dir: dir.to_path_buf(),
        };
        let writer =
            ParquetWriter::new(cfg, dest, 2, "m".into(), Arc::clone(&stats)).expect("writer");
        let dead_letters = dead_letters
            .then(|| DeadLetterFile::open(&dir.join("_dead_letters.jsonl")).expect("dlq"));
        let (tx, results) = flume::unbounded();
        let (control_tx, control) = flume::unbounded();
        let sink = SinkThread {
            results,
            control,
            parquet: writer,
            dead_letters,
            budget: crate::budget::Budget::new(64 << 20),
            stats: Arc::clone(&stats),
            fatal: Arc::new(Fatal::default()),
        };
        (
            tx,
            control_tx,
            std::thread::spawn(move || sink.run()),
            stats,
        )
    }

    /// Results arriving in any order are written in source order, files
    /// hold ranges of records (dead letters count) and are named by their
    /// first row's offset, and the tracker's position only moves when files
    /// are complete.
    #[test]
    fn out_of_order_results_become_ordered_files() {
        let dir = std::env::temp_dir().join(format!("clipstream-sink-{}", std::process::id()));
        let (tx, _control_tx, sink, stats) = start_sink(&dir, 4, 2, true);

        let tracker = AckTracker::new();
        let sem = Arc::new(Semaphore::new(100));
        let key = PartitionKey {
            source: "src".into(),
            partition: 3,
        };
        // Offsets with gaps (like Kafka), seq dense; seq 2 is a dead letter.
        let offsets: Vec<i64> = vec![10, 11, 13, 14, 15, 17, 18, 20, 21];
        let mut order: Vec<usize> = (0..offsets.len()).collect();
        order.reverse();
        order.swap(0, 4);
        for i in order {
            let ack = tracker.token(
                key.clone(),
                Position {
                    seq: i as u64,
                    offset: offsets[i],
                },
            );
            let permit = crate::record::Permit::new(
                Arc::clone(&sem).try_acquire_owned().expect("permit"),
                crate::budget::Budget::new(1 << 20).charge(100),
            );
            let origin = Origin {
                partition: key.clone(),
                position: Position {
                    seq: i as u64,
                    offset: offsets[i],
                },
                key: None,
                headers: Arc::from([]),
                raw: Arc::from(&b"{}"[..]),
                event_time_ms: None,
            };
            let done = if i == 2 {
                Done::Dead {
                    letter: origin.dead_letter(
                        Some("bad".into()),
                        Stage::Source,
                        Kind::EmptyEvent,
                        "r".into(),
                    ),
                    ack,
                    permit,
                }
            } else {
                Done::Row {
                    row: row(&key, offsets[i]),
                    origin,
                    ack,
                    permit,
                }
            };
            tx.send(done).expect("send");
            if i == 5 {
                // Nothing is acknowledged before its file is complete.
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        drop(tx);
        sink.join().expect("join").expect("sink ok");
        let files = stats.snapshot().files;
        // Ranges of 4 records, the dead letter (offset 13) included.
        assert_eq!(
            files,
            vec![
                "src-3-0000000010.parquet",
                "src-3-0000000015.parquet",
                "src-3-0000000021.parquet"
            ]
        );
        let w = tracker.watermark(&key);
        assert_eq!(
            (w.contiguous, w.last_offset, w.dead_lettered, w.delivered),
            (9, Some(21), 1, 8)
        );
        assert_eq!(sem.available_permits(), 100, "every permit released");
        // What a rerun would skip: every position, dead letter included.
        let manifest = dir.join("src.jsonl");
        std::fs::write(&manifest, "{}\n").expect("manifest");
        let input = crate::source::files::resume::InputIdentity::manifest(&manifest).expect("id");
        let done = crate::source::files::resume::DoneSet::load(
            &dir,
            &dir.join("_dead_letters.jsonl"),
            &input,
            "src-3-",
        )
        .expect("resume");
        assert_eq!(done.len(), 9);
        assert!(offsets.iter().all(|&o| done.is_done(&key, o, None)));
        assert!(!done.is_done(&key, 12, Some("id-11")));
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A result of an assignment that ended (revoked, or lost while records
    /// were in flight) is dropped at once — its slot and memory given back —
    /// rather than waiting in order behind records that will never come.
    #[test]
    fn results_of_an_ended_assignment_are_dropped_at_once() {
        let dir = std::env::temp_dir().join(format!("clipstream-sink-lost-{}", std::process::id()));
        let (tx, control_tx, sink, _stats) = start_sink(&dir, 100, 10, false);
        let tracker = AckTracker::new();
        let key = PartitionKey {
            source: "t".into(),
            partition: 0,
        };
        let epoch = tracker.assign(&key, 0);
        control_tx
            .send(Control::Start {
                partition: key.clone(),
                epoch,
                first_seq: 0,
            })
            .expect("start");
        let sem = Arc::new(Semaphore::new(10));
        // Seq 3 of the assignment; 0..2 never come (lost with it).
        let ack = tracker.token(key.clone(), Position { seq: 3, offset: 3 });
        tracker.revoke(&key);
        let permit = crate::record::Permit::new(
            Arc::clone(&sem).try_acquire_owned().expect("permit"),
            crate::budget::Budget::new(1 << 20).charge(100),
        );
        let origin = Origin {
            partition: key.clone(),
            position: Position { seq: 3, offset: 3 },
            key: None,
            headers: Arc::from([]),
            raw: Arc::from(&b"{}"[..]),
            event_time_ms: None,
        };
        tx.send(Done::Row {
            row: row(&key, 3),
            origin,
            ack,
            permit,
        })
        .expect("send");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while sem.available_permits() < 10 {
            assert!(
                std::time::Instant::now() < deadline,
                "the slot is still held"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop((tx, control_tx));
        sink.join().expect("join").expect("sink ok");
        std::fs::remove_dir_all(&dir).ok();
    }
}
