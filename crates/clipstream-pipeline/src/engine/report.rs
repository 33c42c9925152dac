//! The end of a run: what it did, from the counters and the tracker.

use std::time::{Duration, Instant};

use crate::ack::{AckTracker, PartitionKey, Watermark};
use crate::config::{DeadLetters, PipelineConfig};
use crate::stats::{Snapshot, Stats};

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Wall time.
    pub elapsed: Duration,
    /// Records read (not counting skipped ones).
    pub read: u64,
    /// Records skipped because an earlier run wrote them.
    pub skipped: u64,
    /// Rows in complete files.
    pub rows: u64,
    /// Images encoded.
    pub images: u64,
    /// Texts encoded.
    pub texts: u64,
    /// Dead letters written.
    pub dead_letters: u64,
    /// Records that failed (a rerun retries them).
    pub failed: u64,
    /// Details: dead letters per kind, top-1 labels, files.
    pub detail: Snapshot,
    /// Per partition: resume positions.
    pub watermarks: Vec<(PartitionKey, Watermark)>,
    /// Records read but neither written nor dead-lettered.
    pub unacknowledged: u64,
    /// Where the Parquet files are (a directory or an s3:// URL).
    pub output: String,
    /// Where dead letters are (a file or a topic).
    pub dead_letters_to: String,
    /// Labelled rows routed to review, and where they are listed (a file
    /// or a topic); `None` without review thresholds.
    pub review: Option<(u64, String)>,
    /// True when the run stopped before the end of its input.
    pub stopped_early: bool,
    /// The most bytes charged to the memory budget at once, and the budget.
    pub memory_peak: (u64, u64),
}

/// What the run did.
pub(super) fn report(
    cfg: &PipelineConfig,
    stats: &Stats,
    tracker: &AckTracker,
    started: Instant,
    (ends_with_input, undrained, stopped_early): (bool, u64, bool),
) -> RunReport {
    let watermarks = tracker.watermarks();
    let resolved: u64 = watermarks
        .iter()
        .map(|(_, w)| w.delivered + w.dead_lettered)
        .sum();
    let read = Stats::get(&stats.records.read);
    RunReport {
        elapsed: started.elapsed(),
        read,
        skipped: Stats::get(&stats.records.skipped),
        rows: Stats::get(&stats.records.rows),
        images: Stats::get(&stats.records.images),
        texts: Stats::get(&stats.records.texts),
        dead_letters: Stats::get(&stats.records.dead_letters),
        failed: Stats::get(&stats.records.failed),
        detail: stats.snapshot(),
        watermarks,
        // Kafka: partitions come and go, so count what the final drain
        // left (the tracker forgets revoked partitions).
        unacknowledged: if ends_with_input {
            read.saturating_sub(resolved)
        } else {
            undrained
        },
        output: cfg.output_location(),
        dead_letters_to: match cfg.dead_letters() {
            Some(DeadLetters::File(p)) => p.display().to_string(),
            Some(DeadLetters::Topic(t)) => format!("topic {t}"),
            None => "-".into(),
        },
        review: cfg.review().active().then(|| {
            let to = match (
                cfg.review_path(),
                cfg.sink
                    .kafka
                    .as_ref()
                    .and_then(|k| k.review_topic.as_ref()),
            ) {
                (Some(p), _) => p.display().to_string(),
                (None, Some(t)) => format!("topic {t}"),
                (None, None) => "-".into(),
            };
            (stats.review.routed(), to)
        }),
        stopped_early,
        memory_peak: (0, 0),
    }
}
