//! One memory budget for the bytes records carry through the pipeline
//! (`engine.max_bytes_in_flight`): their events, the objects fetched for
//! them, their decoded images and model inputs (and the encoder's batch),
//! and their rows until the sink has them; the sink charges the rows its
//! open files hold.
//!
//! A record's [`Charge`] grows as the record does and is released when the
//! record is done with (a charge gives its bytes back when dropped). Only
//! two places *wait*, both before a record takes memory the pipeline can
//! do without for now, and only while half the budget is charged (the
//! admission level): the source (it pauses) and the fetch stage (it waits
//! before reading an object). Every later stage charges without waiting: it
//! only ever moves a record closer to the end, so it frees memory; a stage
//! that waited there could wait on memory held by the records queued behind
//! it. The other half of the budget is room for those charges. A fetch
//! waits at most a few seconds, so that a record everything else waits
//! behind (results are written in order) cannot stall the pipeline.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The budget: a limit, and the bytes charged against it.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
    peak: AtomicU64,
    freed: tokio::sync::Notify,
}

/// Bytes charged to a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
    bytes: u64,
}

/// How long the fetch stage waits for room before it fetches anyway.
pub const MAX_WAIT: Duration = Duration::from_secs(5);

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            freed: tokio::sync::Notify::new(),
        })
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// The most bytes ever charged at once.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }

    /// True when the admission level is reached (the source holds back).
    pub fn spent(&self) -> bool {
        self.used() >= self.admission()
    }

    /// Charges `bytes` now, whatever the budget holds.
    pub fn charge(self: &Arc<Self>, bytes: u64) -> Charge {
        self.add(bytes);
        Charge {
            budget: Arc::clone(self),
            bytes,
        }
    }

    /// An empty charge, to grow later.
    pub fn empty(self: &Arc<Self>) -> Charge {
        Charge {
            budget: Arc::clone(self),
            bytes: 0,
        }
    }

    fn add(&self, bytes: u64) {
        let now = self.used.fetch_add(bytes, Ordering::AcqRel) + bytes;
        self.peak.fetch_max(now, Ordering::AcqRel);
    }

    fn release(&self, bytes: u64) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            self.freed.notify_waiters();
        }
    }

    /// Where waiting starts: half the limit. The other half is room for
    /// what later stages charge without waiting (decoded images, model
    /// inputs and batches, rows, open files), so that the total stays near
    /// the limit.
    pub fn admission(&self) -> u64 {
        self.limit / 2
    }

    /// Waits until `bytes` fit under the admission level (or nothing else is
    /// charged, or `max_wait` passed), then charges them to `charge`. True
    /// when it fit.
    pub async fn grow_within(&self, charge: &mut Charge, bytes: u64, max_wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + max_wait;
        loop {
            let freed = self.freed.notified();
            let used = self.used();
            if used + bytes <= self.admission() || used == 0 {
                charge.grow(bytes);
                return true;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                charge.grow(bytes);
                return false;
            }
        }
    }
}

impl Charge {
    /// Adds `bytes`, without waiting.
    pub fn grow(&mut self, bytes: u64) {
        self.budget.add(bytes);
        self.bytes += bytes;
    }

    /// Gives `bytes` back (at most what it holds).
    pub fn shrink(&mut self, bytes: u64) {
        let b = bytes.min(self.bytes);
        self.bytes -= b;
        self.budget.release(b);
    }

    /// Splits `bytes` off into a charge of their own.
    pub fn split(&mut self, bytes: u64) -> Charge {
        let b = bytes.min(self.bytes);
        self.bytes -= b;
        Charge {
            budget: Arc::clone(&self.budget),
            bytes: b,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Grows to at least `bytes`, waiting for room as
    /// [`Budget::grow_within`] does.
    pub async fn reserve(&mut self, bytes: u64, max_wait: Duration) -> bool {
        let need = bytes.saturating_sub(self.bytes);
        if need == 0 {
            return true;
        }
        let budget = Arc::clone(&self.budget);
        budget.grow_within(self, need, max_wait).await
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn charges_come_back_and_waiting_ends_when_room_is_made() {
        // Admission at 50 of 100.
        let b = Budget::new(100);
        let mut a = b.charge(30);
        assert!(!b.spent());
        let mut c = b.empty();
        // 30 + 30 > 50: waits until `a` shrinks.
        let waiter = {
            let b = Arc::clone(&b);
            tokio::spawn(async move {
                let mut c2 = b.empty();
                let fit = b.grow_within(&mut c2, 30, Duration::from_secs(10)).await;
                (fit, c2.bytes())
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        a.shrink(20);
        assert_eq!(waiter.await.expect("join"), (true, 30));
        assert_eq!(b.used(), 10);
        // Later stages charge without waiting, past the admission level.
        c.grow(60);
        assert!(b.spent());
        // Nothing fits, but the wait is bounded.
        let mut d = b.empty();
        let fit = b.grow_within(&mut d, 50, Duration::from_millis(50)).await;
        assert!(!fit && b.used() == 120);
        let e = d.split(20);
        drop(d);
        assert_eq!(b.used(), 90);
        drop((a, c, e));
        assert_eq!(b.used(), 0);
        assert_eq!(b.peak(), 120);
    }
}
