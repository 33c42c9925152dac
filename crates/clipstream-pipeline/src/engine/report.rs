//! The end of a run: what it did, from the counters and the tracker.

use std::time::Instant;

use super::RunReport;
use crate::ack::AckTracker;
use crate::config::{DeadLetters, PipelineConfig};
use crate::stats::Stats;

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
