//! The Kafka outputs' metrics.

use prometheus::IntCounterVec;

use crate::stats::labels::Output;
use crate::stats::register::Register;

/// `clipstream_kafka_messages_produced_total`, by output.
#[derive(Debug)]
pub struct OutputMetrics {
    produced: IntCounterVec,
}

impl OutputMetrics {
    pub(crate) fn register(r: &Register) -> Self {
        let produced = r.counter_vec(
            "clipstream_kafka_messages_produced_total",
            "Messages delivered to output topics, by output.",
            &["output"],
        );
        for o in Output::ALL {
            produced.with_label_values(&[o.as_str()]);
        }
        OutputMetrics { produced }
    }

    /// One message delivered to `output`'s topic.
    pub fn produced(&self, output: Output) {
        self.produced.with_label_values(&[output.as_str()]).inc();
    }
}
