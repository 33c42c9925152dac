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
pub mod parquet;
pub mod resume;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::ack::PartitionKey;
use crate::record::Done;
use crate::stats::Stats;

use self::dead_letter_file::DeadLetterFile;
use self::parquet::ParquetWriter;

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
pub fn run_sink(
    rx: flume::Receiver<Done>,
    mut parquet: ParquetWriter,
    mut dead: DeadLetterFile,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    let mut sequencers: HashMap<PartitionKey, Sequencer> = HashMap::new();
    for done in rx.iter() {
        let key = done.ack().partition().clone();
        let ready = sequencers.entry(key).or_default().push(done);
        for d in ready {
            Stats::add(&stats.finished, 1);
            match d {
                Done::Row { row, ack, permit } => {
                    parquet.append(row, ack)?;
                    drop(permit);
                }
                Done::Failed {
                    reason,
                    ack,
                    permit,
                } => {
                    tracing::error!(offset = ack.position().offset, %reason, "record failed; a rerun will retry it");
                    Stats::add(&stats.failed, 1);
                    ack.failed();
                    drop(permit);
                }
                Done::Dead {
                    letter,
                    ack,
                    permit,
                } => {
                    dead.write(&letter)?;
                    stats.dead_letter(letter.kind);
                    ack.dead_lettered();
                    drop(permit);
                }
            }
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
