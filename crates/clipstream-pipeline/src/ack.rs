//! Acknowledgements: every record carries an [`AckToken`] from the moment
//! the source reads it until every sink that must hold it has durably
//! written it. The source learns each record's outcome through an
//! [`AckTracker`], which keeps, per partition, the highest *contiguous*
//! resolved position: a record that failed or is still in flight holds it
//! back, however many later records are done.
//!
//! A token is shared by the sinks of a record (clone it once per sink). The
//! outcome is reported when the last clone is dropped: delivered if every
//! clone was marked, dead-lettered if one was, failed if any clone was
//! dropped unmarked (a crash path, a shutdown deadline) or marked failed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// What became of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Every sink holds its results.
    Delivered,
    /// It was bad input and the dead-letter output holds it.
    DeadLettered,
    /// Not durably written anywhere: must be processed again.
    Failed,
}

/// A partition of a source: a Kafka topic-partition, or partition 0 of a
/// manifest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    /// Topic, or the input's name.
    pub source: Arc<str>,
    /// Partition number.
    pub partition: i32,
}

impl std::fmt::Display for PartitionKey {
    /// `topic[partition]`, as the logs show a partition.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.source, self.partition)
    }
}

/// Where a record sits in its partition: `seq` counts the records the source
/// emitted for this partition (dense, from 0); `offset` is the source's own
/// position (a Kafka offset, a manifest line), which may have gaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    /// Emission order within the partition.
    pub seq: u64,
    /// The source's offset.
    pub offset: i64,
}

const MARK_NONE: u8 = 0;
const MARK_DELIVERED: u8 = 1;
const MARK_DEAD: u8 = 2;
const MARK_FAILED: u8 = 3;

#[derive(Debug)]
struct Shared {
    tracker: Arc<AckTracker>,
    partition: PartitionKey,
    position: Position,
    /// The partition's assignment epoch when the token was issued.
    epoch: u64,
    /// Worst mark so far (`MARK_*`); a dropped unmarked clone counts as failed.
    worst: AtomicU8,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let outcome = match self.worst.load(Ordering::Acquire) {
            MARK_DELIVERED => Outcome::Delivered,
            MARK_DEAD => Outcome::DeadLettered,
            _ => Outcome::Failed,
        };
        self.tracker
            .resolve(&self.partition, self.position, self.epoch, outcome);
    }
}

/// One sink's handle on a record's acknowledgement.
#[derive(Debug)]
pub struct AckToken {
    shared: Arc<Shared>,
    marked: bool,
}

impl AckToken {
    /// Another handle for another sink.
    pub fn share(&self) -> AckToken {
        AckToken {
            shared: Arc::clone(&self.shared),
            marked: false,
        }
    }

    /// The record's partition.
    pub fn partition(&self) -> &PartitionKey {
        &self.shared.partition
    }

    /// The record's position.
    pub fn position(&self) -> Position {
        self.shared.position
    }

    /// False once the record's partition was revoked (its results must not
    /// be written: the partition's next owner processes it again).
    pub fn is_current(&self) -> bool {
        self.shared.tracker.epoch(&self.shared.partition) == Some(self.shared.epoch)
    }

    /// The partition's assignment epoch when the token was issued.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch
    }

    fn mark(mut self, mark: u8) {
        self.shared.worst.fetch_max(mark, Ordering::AcqRel);
        self.marked = true;
    }

    /// This sink has durably written the record.
    pub fn delivered(self) {
        self.mark(MARK_DELIVERED);
    }

    /// This sink has durably written the record as a dead letter.
    pub fn dead_lettered(self) {
        self.mark(MARK_DEAD);
    }

    /// This sink could not write the record.
    pub fn failed(self) {
        self.mark(MARK_FAILED);
    }
}

impl Drop for AckToken {
    fn drop(&mut self) {
        if !self.marked {
            self.shared.worst.fetch_max(MARK_FAILED, Ordering::AcqRel);
        }
    }
}

/// Per-partition state of the tracker.
#[derive(Debug, Default, Clone)]
struct PartitionState {
    /// Assignment epoch: tokens of an earlier epoch no longer count.
    epoch: u64,
    /// Lowest seq not yet contiguously resolved.
    next_seq: u64,
    /// Offset of the last record of the contiguous prefix.
    last_offset: Option<i64>,
    /// Resolved records beyond the prefix.
    pending: BTreeMap<u64, (i64, Outcome)>,
    /// A failed record stops the prefix here.
    blocked_at: Option<u64>,
    delivered: u64,
    dead_lettered: u64,
    failed: u64,
}

/// Tracks outcomes and the resume position of every partition.
#[derive(Debug, Default)]
pub struct AckTracker {
    partitions: Mutex<HashMap<PartitionKey, PartitionState>>,
    epochs: std::sync::atomic::AtomicU64,
}

/// A snapshot of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Watermark {
    /// Records of the contiguous resolved prefix.
    pub contiguous: u64,
    /// Offset of the last record of that prefix: the source may resume
    /// (commit) at `last_offset + 1`.
    pub last_offset: Option<i64>,
    /// Resolved records waiting behind an unresolved or failed one.
    pub waiting: u64,
    /// Delivered records.
    pub delivered: u64,
    /// Dead-lettered records.
    pub dead_lettered: u64,
    /// Failed records (each holds its partition back).
    pub failed: u64,
}

impl AckTracker {
    /// A new tracker, shared by the source and every token it issues.
    pub fn new() -> Arc<Self> {
        Arc::new(AckTracker::default())
    }

    /// Issues the token of a record.
    pub fn token(self: &Arc<Self>, partition: PartitionKey, position: Position) -> AckToken {
        let epoch = {
            let mut parts = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
            parts.entry(partition.clone()).or_default().epoch
        };
        AckToken {
            shared: Arc::new(Shared {
                tracker: Arc::clone(self),
                partition,
                position,
                epoch,
                worst: AtomicU8::new(MARK_NONE),
            }),
            marked: false,
        }
    }

    /// Starts a new assignment of `partition` whose first record will have
    /// sequence number `next_seq`; tokens of earlier assignments no longer
    /// count. Returns the assignment's epoch (epochs only grow).
    pub fn assign(&self, partition: &PartitionKey, next_seq: u64) -> u64 {
        let epoch = 1 + self.epochs.fetch_add(1, Ordering::AcqRel);
        let mut parts = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        parts.insert(
            partition.clone(),
            PartitionState {
                epoch,
                next_seq,
                ..PartitionState::default()
            },
        );
        epoch
    }

    /// The partition was taken away: its outstanding tokens no longer count.
    pub fn revoke(&self, partition: &PartitionKey) {
        let mut parts = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        parts.remove(partition);
    }

    /// The current epoch of a partition; `None` when not assigned.
    pub fn epoch(&self, partition: &PartitionKey) -> Option<u64> {
        let parts = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        parts.get(partition).map(|s| s.epoch)
    }

    fn resolve(&self, partition: &PartitionKey, position: Position, epoch: u64, outcome: Outcome) {
        let mut parts = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        let Some(st) = parts.get_mut(partition).filter(|s| s.epoch == epoch) else {
            // A record of a revoked assignment: its partition moved on.
            return;
        };
        match outcome {
            Outcome::Delivered => st.delivered += 1,
            Outcome::DeadLettered => st.dead_lettered += 1,
            Outcome::Failed => {
                st.failed += 1;
                st.blocked_at = Some(st.blocked_at.map_or(position.seq, |b| b.min(position.seq)));
            }
        }
        if position.seq < st.next_seq {
            debug_assert!(false, "seq {} resolved twice", position.seq);
            return;
        }
        st.pending.insert(position.seq, (position.offset, outcome));
        while let Some(&(offset, outcome)) = st.pending.get(&st.next_seq) {
            if outcome == Outcome::Failed {
                break;
            }
            st.pending.remove(&st.next_seq);
            st.next_seq += 1;
            st.last_offset = Some(offset);
        }
    }

    /// The watermark of one partition.
    pub fn watermark(&self, partition: &PartitionKey) -> Watermark {
        let parts = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        parts.get(partition).map(Self::snapshot).unwrap_or_default()
    }

    /// All partitions' watermarks.
    pub fn watermarks(&self) -> Vec<(PartitionKey, Watermark)> {
        let parts = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = parts
            .iter()
            .map(|(k, s)| (k.clone(), Self::snapshot(s)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn snapshot(s: &PartitionState) -> Watermark {
        Watermark {
            contiguous: s.next_seq,
            last_offset: s.last_offset,
            waiting: s.pending.len() as u64,
            delivered: s.delivered,
            dead_lettered: s.dead_lettered,
            failed: s.failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> PartitionKey {
        PartitionKey {
            source: "t".into(),
            partition: 0,
        }
    }

    #[test]
    fn later_records_do_not_advance_past_an_unacked_one() {
        let tracker = AckTracker::new();
        let tokens: Vec<AckToken> = (0..4)
            .map(|i| {
                tracker.token(
                    key(),
                    Position {
                        seq: i,
                        offset: 10 + i as i64,
                    },
                )
            })
            .collect();
        let mut it = tokens.into_iter();
        let t0 = it.next().expect("t0");
        for t in it {
            t.delivered();
        }
        let w = tracker.watermark(&key());
        assert_eq!((w.contiguous, w.last_offset, w.waiting), (0, None, 3));
        t0.dead_lettered();
        let w = tracker.watermark(&key());
        assert_eq!((w.contiguous, w.last_offset, w.waiting), (4, Some(13), 0));
        assert_eq!((w.delivered, w.dead_lettered), (3, 1));
    }

    #[test]
    fn a_token_needs_every_sink() {
        let tracker = AckTracker::new();
        let a = tracker.token(key(), Position { seq: 0, offset: 0 });
        let b = a.share();
        a.delivered();
        assert_eq!(
            tracker.watermark(&key()).contiguous,
            0,
            "one sink still holds it"
        );
        b.delivered();
        assert_eq!(tracker.watermark(&key()).contiguous, 1);
    }

    #[test]
    fn dropping_an_unmarked_token_fails_the_record() {
        let tracker = AckTracker::new();
        let a = tracker.token(key(), Position { seq: 0, offset: 0 });
        let b = a.share();
        a.delivered();
        drop(b);
        let w = tracker.watermark(&key());
        assert_eq!((w.contiguous, w.failed), (0, 1));
        tracker
            .token(key(), Position { seq: 1, offset: 1 })
            .delivered();
        assert_eq!(
            tracker.watermark(&key()).contiguous,
            0,
            "failure holds the partition"
        );
    }

    proptest! {
        /// Whatever order records resolve in, and whichever fail, the
        /// watermark is exactly the first record not resolved successfully.
        #[test]
        fn watermark_is_first_unresolved(
            n in 1usize..60,
            order in proptest::collection::vec(any::<u32>(), 60),
            outcomes in proptest::collection::vec(0u8..10, 60),
            resolved_count in 0usize..60,
        ) {
            let tracker = AckTracker::new();
            let mut tokens: Vec<Option<AckToken>> = (0..n)
                .map(|i| Some(tracker.token(key(), Position { seq: i as u64, offset: 100 + 2 * i as i64 })))
                .collect();
            let mut idx: Vec<usize> = (0..n).collect();
            idx.sort_by_key(|&i| order[i]);
            let resolved: Vec<usize> = idx.into_iter().take(resolved_count.min(n)).collect();
            let mut status = vec![None; n];
            for &i in &resolved {
                let t = tokens[i].take().expect("once");
                let o = match outcomes[i] { 0 => Outcome::Failed, 1 | 2 => Outcome::DeadLettered, _ => Outcome::Delivered };
                match o {
                    Outcome::Failed => t.failed(),
                    Outcome::DeadLettered => t.dead_lettered(),
                    Outcome::Delivered => t.delivered(),
                }
                status[i] = Some(o);
                let w = tracker.watermark(&key());
                let expect = status.iter().position(|s| !matches!(s, Some(Outcome::Delivered | Outcome::DeadLettered))).unwrap_or(n);
                prop_assert_eq!(w.contiguous as usize, expect);
                prop_assert_eq!(w.last_offset, expect.checked_sub(1).map(|k| 100 + 2 * k as i64));
            }
            drop(tokens);
        }
    }
}
