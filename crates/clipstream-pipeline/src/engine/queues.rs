//! The channels between the stages, and the sampler that shows their
//! lengths and the memory budget's use.

use std::sync::Arc;
use std::time::Duration;

use super::config::EngineConfig;
use crate::assemble::{TextJob, VisionJob};
use crate::budget::Budget;
use crate::fetch::Fetched;
use crate::record::{Done, Record};
use crate::sink::Control;
use crate::stats::{Queue, Stats};

/// The channels between the stages: (sender, receiver) pairs.
pub(super) struct Queues {
    pub records: (flume::Sender<Record>, flume::Receiver<Record>),
    pub fetched: (flume::Sender<Fetched>, flume::Receiver<Fetched>),
    pub vision: (flume::Sender<VisionJob>, flume::Receiver<VisionJob>),
    pub text: (flume::Sender<TextJob>, flume::Receiver<TextJob>),
    pub done: (flume::Sender<Done>, flume::Receiver<Done>),
    pub sink: (flume::Sender<Done>, flume::Receiver<Done>),
    pub control: (flume::Sender<Control>, flume::Receiver<Control>),
}

impl Queues {
    pub fn new(e: &EngineConfig) -> Queues {
        let q = e.queue_capacity;
        Queues {
            // The source sends into these from the Kafka poll thread, which
            // must never wait: every item holds an in-flight slot, so room
            // for every slot means a send never blocks.
            records: flume::bounded(e.max_in_flight),
            done: flume::bounded(e.max_in_flight),
            fetched: flume::bounded(q),
            vision: flume::bounded(q),
            text: flume::bounded(q),
            sink: flume::bounded(q),
            control: flume::unbounded(),
        }
    }

    /// Samples queue lengths into `clipstream_queue_items`, and the
    /// budget's use.
    pub fn watch(
        &self,
        stats: Arc<Stats>,
        capacity: usize,
        budget: &Arc<Budget>,
    ) -> tokio::task::JoinHandle<()> {
        watch_queues(
            stats,
            Arc::clone(budget),
            vec![
                (Queue::Records, (&self.records.0).into()),
                (Queue::Fetched, (&self.fetched.0).into()),
                (Queue::Vision, (&self.vision.0).into()),
                (Queue::Text, (&self.text.0).into()),
                (Queue::Done, (&self.done.0).into()),
            ],
            capacity,
        )
    }
}

/// A queue's length, sampled through a weak handle: holding it keeps the
/// channel open for neither side (a probe that held a receiver kept a
/// channel "open" after its consumer died, and its producers blocked).
struct QueueProbe(Box<dyn Fn() -> usize + Send + Sync>);

impl<T: Send + 'static> From<&flume::Sender<T>> for QueueProbe {
    fn from(tx: &flume::Sender<T>) -> Self {
        let weak = tx.downgrade();
        QueueProbe(Box::new(move || weak.upgrade().map_or(0, |tx| tx.len())))
    }
}

impl std::fmt::Debug for QueueProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueProbe")
    }
}

/// Samples queue lengths into the `clipstream_queue_items` gauge, and the
/// budget's use into `clipstream_memory_in_flight_bytes`.
fn watch_queues(
    stats: Arc<Stats>,
    budget: Arc<Budget>,
    queues: Vec<(Queue, QueueProbe)>,
    capacity: usize,
) -> tokio::task::JoinHandle<()> {
    let m = &stats.queues;
    for (name, _) in &queues {
        m.capacity(*name, capacity);
    }
    m.memory_budget.set(budget.limit() as i64);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let m = &stats.queues;
            m.memory_in_flight.set(budget.used() as i64);
            for (name, probe) in &queues {
                m.items(*name, (probe.0)());
            }
        }
    })
}

//END
