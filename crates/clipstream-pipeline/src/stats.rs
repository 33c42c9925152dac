//! Counters the engine keeps while it runs: read by the progress display and
//! the final summary (and, later, exported as metrics).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::dead_letter::Kind;

/// Live counters of a run. All methods are cheap and thread-safe.
#[derive(Debug, Default)]
pub struct Stats {
    /// Records the source emitted into the pipeline.
    pub read: AtomicU64,
    /// Records skipped because an earlier run already wrote them.
    pub skipped: AtomicU64,
    /// Records whose result reached the sinks (row buffered or dead letter).
    pub finished: AtomicU64,
    /// Rows in complete (renamed) files.
    pub rows: AtomicU64,
    /// Images encoded.
    pub images: AtomicU64,
    /// Texts encoded.
    pub texts: AtomicU64,
    /// Dead letters written.
    pub dead_letters: AtomicU64,
    /// Records that failed (not written; to be retried by a rerun).
    pub failed: AtomicU64,
    /// Vision batches run, and the images in them.
    pub vision_batches: AtomicU64,
    /// Text batches run.
    pub text_batches: AtomicU64,
    /// Input size, when the source knows it.
    pub total: AtomicU64,
    detail: Mutex<Detail>,
}

#[derive(Debug, Default, Clone)]
struct Detail {
    dead_by_kind: BTreeMap<&'static str, u64>,
    top1: BTreeMap<String, u64>,
    files: Vec<String>,
}

/// A consistent copy of the detailed counters.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Dead letters per kind.
    pub dead_by_kind: BTreeMap<&'static str, u64>,
    /// Top-1 label counts.
    pub top1: BTreeMap<String, u64>,
    /// Files completed, in order.
    pub files: Vec<String>,
}

impl Stats {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn detail(&self) -> std::sync::MutexGuard<'_, Detail> {
        self.detail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a dead letter.
    pub fn dead_letter(&self, kind: Kind) {
        Self::add(&self.dead_letters, 1);
        *self.detail().dead_by_kind.entry(kind.as_str()).or_default() += 1;
    }

    /// Counts a row's best label.
    pub fn top1(&self, label: &str) {
        let mut d = self.detail();
        match d.top1.get_mut(label) {
            Some(n) => *n += 1,
            None => {
                d.top1.insert(label.to_string(), 1);
            }
        }
    }

    /// Records a completed output file.
    pub fn file(&self, name: String) {
        self.detail().files.push(name);
    }

    /// The detailed counters.
    pub fn snapshot(&self) -> Snapshot {
        let d = self.detail();
        Snapshot {
            dead_by_kind: d.dead_by_kind.clone(),
            top1: d.top1.clone(),
            files: d.files.clone(),
        }
    }
}
