//! The queues' and the memory budget's metrics.

use crate::stats::labels::Queue;

/// The queues' and the memory budget's metrics.
#[derive(Debug)]
pub struct QueueMetrics {
    items: prometheus::IntGaugeVec,
    capacity: prometheus::IntGaugeVec,
    /// Bytes charged to the memory budget (sampled).
    pub memory_in_flight: prometheus::IntGauge,
    /// The memory budget.
    pub memory_budget: prometheus::IntGauge,
}

impl QueueMetrics {
    pub(crate) fn register(r: &crate::stats::register::Register) -> Self {
        let m = QueueMetrics {
            items: r.gauge_vec(
                "clipstream_queue_items",
                "Items waiting in each queue between stages.",
                &["queue"],
            ),
            capacity: r.gauge_vec(
                "clipstream_queue_capacity",
                "Capacity of each queue between stages.",
                &["queue"],
            ),
            memory_in_flight: r.gauge(
                "clipstream_memory_in_flight_bytes",
                "Bytes of records in flight charged to the memory budget (events, objects, images, model inputs, rows).",
            ),
            memory_budget: r.gauge(
                "clipstream_memory_budget_bytes",
                "The memory budget of records in flight (engine.max_bytes_in_flight).",
            ),
        };
        for q in Queue::ALL {
            m.items.with_label_values(&[q.as_str()]);
            m.capacity.with_label_values(&[q.as_str()]);
        }
        m
    }

    /// Items waiting in `queue` (sampled).
    pub fn items(&self, queue: Queue, n: usize) {
        self.items
            .with_label_values(&[queue.as_str()])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The capacity of `queue`.
    pub fn capacity(&self, queue: Queue, n: usize) {
        self.capacity
            .with_label_values(&[queue.as_str()])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
