//! Sinks: where results and dead letters are made durable, and where
//! acknowledgements are given.
//!
//! - `parquet`: the Arrow schema and the rolling Parquet file writer.
//! - `dead_letter_file`: dead letters as JSON lines (local runs).
//! - `resume`: what an earlier run already wrote, for skipping on rerun.
//! - this module: the sink thread, which puts each partition's results back
//!   in source order before writing them, so that files hold contiguous
//!   ranges and are named deterministically by their first offset.

pub mod dead_letter_file;
pub mod kafka;
pub mod parquet;
pub mod resume;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::ack::PartitionKey;
use crate::record::Done;
use crate::stats::Stats;

use self::dead_letter_file::DeadLetterFile;
use self::parquet::ParquetWriter;

/// What the sink thread receives.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // results dominate; flushes are rare
pub enum SinkMsg {
    /// A record's result.
    Done(Done),
    /// Close the partition's open file once every record up to `upto_seq`
    /// has arrived (rebalance, shutdown, a quiet partition).
    Flush {
        /// The partition.
        partition: PartitionKey,
        /// Last emitted sequence number.
        upto_seq: u64,
    },
}

/// Removes output files a worker wrote beyond a partition's committed
/// offset (it died before committing); called when a partition is assigned.
pub trait Cleanup: Send + Sync {
    /// Removes the files of `partition` whose first offset is `from` or
    /// later.
    fn remove_from(&self, partition: &PartitionKey, from: i64) -> anyhow::Result<()>;
}

/// Puts one partition's results in emission order.
#[derive(Debug, Default)]
struct Sequencer {
    next_seq: u64,
    pending: BTreeMap<u64, Done>,
}

impl Sequencer {
    /// Accepts one result; returns every result that is now in order.
    fn push(&mut self, done: Done) -> Vec<Done> {
        let seq = done.ack().position().seq;
        self.pending.insert(seq, done);
        let mut ready = Vec::new();
        while let Some(d) = self.pending.remove(&self.next_seq) {
            ready.push(d);
            self.next_seq += 1;
        }
        ready
    }
}

/// The sink thread: orders, writes, acknowledges. Returns when every sender
/// of `rx` is gone, after closing every file.
///
/// Dead letters are written to `dead` when there is a file; without one they
/// were already delivered (to the dead-letter topic) before reaching here.
pub fn run_sink(
    rx: flume::Receiver<SinkMsg>,
    mut parquet: ParquetWriter,
    mut dead: Option<DeadLetterFile>,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    let mut sequencers: HashMap<PartitionKey, Sequencer> = HashMap::new();
    let mut flushes: HashMap<PartitionKey, u64> = HashMap::new();
    for msg in rx.iter() {
        let done = match msg {
            SinkMsg::Done(d) => d,
            SinkMsg::Flush {
                partition,
                upto_seq,
            } => {
                let next = sequencers.get(&partition).map_or(0, |s| s.next_seq);
                if next > upto_seq {
                    parquet.close(&partition)?;
                } else {
                    flushes.insert(partition, upto_seq);
                }
                continue;
            }
        };
        let key = done.ack().partition().clone();
        let seq = sequencers.entry(key.clone()).or_default();
        let ready = seq.push(done);
        let next = seq.next_seq;
        write_ready(ready, &mut parquet, &mut dead, &stats)?;
        if flushes.get(&key).is_some_and(|&upto| next > upto) {
            flushes.remove(&key);
            parquet.close(&key)?;
        }
    }
    parquet.close_all()?;
    let stuck: usize = sequencers.values().map(|s| s.pending.len()).sum();
    if stuck > 0 {
        tracing::warn!(
            records = stuck,
            "results left unwritten behind records that never finished"
        );
    }
    Ok(())
}

fn write_ready(
    ready: Vec<Done>,
    parquet: &mut ParquetWriter,
    dead: &mut Option<DeadLetterFile>,
    stats: &Stats,
) -> anyhow::Result<()> {
    for d in ready {
        Stats::add(&stats.finished, 1);
        stats
            .in_flight
            .set(Stats::get(&stats.read) as i64 - Stats::get(&stats.finished) as i64);
        match d {
            Done::Row {
                row, ack, permit, ..
            } => {
                if ack.is_current() {
                    parquet.append(row, ack)?;
                } else {
                    // Its partition was revoked: the next owner writes it.
                    parquet.abort(ack.partition());
                    ack.failed();
                }
                drop(permit);
            }
            Done::Failed {
                reason,
                ack,
                permit,
            } => {
                tracing::error!(offset = ack.position().offset, %reason, "record failed; it is processed again on restart");
                Stats::add(&stats.failed, 1);
                // A failed record ends the file before it, so that no
                // file spans a position that is not committed.
                parquet.close(ack.partition())?;
                ack.failed();
                drop(permit);
            }
            Done::Dead {
                letter,
                ack,
                permit,
            } => {
                if let Some(file) = dead.as_mut() {
                    file.write(&letter)?;
                }
                stats.dead_letter(letter.stage, letter.kind);
                ack.dead_lettered();
                drop(permit);
            }
        }
    }
    Ok(())
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
            event_time_ms: None,
            processed_at_ms: 0,
        }
    }

    /// Results arriving in any order are written in source order, files
    /// roll by row count and are named by their first offset, and the
    /// tracker's position only moves when files are complete.
    #[test]
    fn out_of_order_results_become_ordered_files() {
        let dir = std::env::temp_dir().join(format!("clipstream-sink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let stats = Arc::new(Stats::default());
        let cfg = ParquetConfig {
            dir: Some(dir.clone()),
            url: None,
            spool_dir: None,
            part_bytes: 5 << 20,
            partition_by_date: false,
            max_file_span_secs: None,
            max_rows_per_file: 4,
            max_bytes_per_file: 1 << 30,
            row_group_rows: 2,
            zstd_level: 3,
        };
        let dest = Destination::Local {
            dir: dir.clone(),
            overwrite: false,
        };
        let writer =
            ParquetWriter::new(cfg, dest, 2, "m".into(), Arc::clone(&stats)).expect("writer");
        let dead = Some(DeadLetterFile::open(&dir.join("_dead_letters.jsonl")).expect("dlq"));
        let (tx, rx) = flume::unbounded();
        let sink_stats = Arc::clone(&stats);
        let sink = std::thread::spawn(move || run_sink(rx, writer, dead, sink_stats));

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
            let permit = Arc::clone(&sem).try_acquire_owned().expect("permit");
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
            tx.send(SinkMsg::Done(done)).expect("send");
            if i == 5 {
                // Nothing is acknowledged before its file is complete.
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        drop(tx);
        sink.join().expect("join").expect("sink ok");
        let files = stats.snapshot().files;
        assert_eq!(
            files,
            vec!["src-3-0000000010.parquet", "src-3-0000000017.parquet"]
        );
        let w = tracker.watermark(&key);
        assert_eq!(
            (w.contiguous, w.last_offset, w.dead_lettered, w.delivered),
            (9, Some(21), 1, 8)
        );
        assert_eq!(sem.available_permits(), 100, "every permit released");
        let ids =
            super::resume::DoneSet::load(&dir, &dir.join("_dead_letters.jsonl")).expect("resume");
        assert_eq!(ids.len(), 9);
        assert!(ids.has_id("id-21") && ids.has_id("bad"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
