//! The Kafka source's metrics: assignment, lag, commits, backpressure.

use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

use crate::ack::PartitionKey;
use crate::stats::labels::ResultLabel;
use crate::stats::register::Register;

/// The consumer's state as the group and the dashboards see it.
#[derive(Debug)]
pub struct KafkaMetrics {
    lag: IntGaugeVec,
    commit_seconds: Histogram,
    commits: IntCounterVec,
    assigned: IntGauge,
    paused: IntGauge,
    pauses: IntCounter,
    starting: IntGauge,
    start_retries: IntCounter,
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl KafkaMetrics {
    pub(crate) fn register(r: &Register) -> Self {
        let m = KafkaMetrics {
            lag: r.gauge_vec(
                "clipstream_kafka_consumer_lag_records",
                "Records behind the end of each assigned partition.",
                &["topic", "partition"],
            ),
            commit_seconds: r.seconds(
                "clipstream_kafka_commit_duration_seconds",
                "Time of one offset commit.",
            ),
            commits: r.counter_vec(
                "clipstream_kafka_commits_total",
                "Offset commits, by result.",
                &["result"],
            ),
            assigned: r.gauge(
                "clipstream_kafka_assigned_partitions",
                "Partitions assigned to this worker.",
            ),
            paused: r.gauge(
                "clipstream_kafka_source_paused",
                "1 while the Kafka source has paused its partitions because the pipeline stayed full (backpressure), else 0.",
            ),
            pauses: r.counter(
                "clipstream_kafka_source_pauses_total",
                "Times the Kafka source paused its partitions because the pipeline stayed full.",
            ),
            starting: r.gauge(
                "clipstream_kafka_partitions_starting",
                "Assigned partitions still paused while their committed offset is read and leftover output files are removed.",
            ),
            start_retries: r.counter(
                "clipstream_kafka_partition_start_retries_total",
                "Failed attempts to start an assigned partition (committed-offset lookup, listing or deleting leftover files); each is retried.",
            ),
        };
        for res in ResultLabel::ALL {
            m.commits.with_label_values(&[res.as_str()]);
        }
        m
    }

    /// One offset commit, successful or not, that took `took`.
    pub fn commit(&self, ok: bool, took: Duration) {
        self.commit_seconds.observe(took.as_secs_f64());
        let result = if ok {
            ResultLabel::Ok
        } else {
            ResultLabel::Error
        };
        self.commits.with_label_values(&[result.as_str()]).inc();
    }

    /// The partitions assigned now, and how many of them are still starting.
    pub fn assigned(&self, assigned: usize, starting: usize) {
        self.assigned.set(count(assigned));
        self.starting.set(count(starting));
    }

    /// A partition's consumer lag (from librdkafka's statistics).
    pub fn lag(&self, topic: &str, partition: i32, records: i64) {
        self.lag
            .with_label_values(&[topic, &partition.to_string()])
            .set(records);
    }

    /// A partition left this worker: its lag series goes with it.
    pub fn forget(&self, key: &PartitionKey) {
        let _ = self
            .lag
            .remove_label_values(&[&*key.source, &key.partition.to_string()]);
    }

    /// The source paused (`true`) or resumed its partitions for
    /// backpressure.
    pub fn paused(&self, on: bool) {
        self.paused.set(i64::from(on));
        if on {
            self.pauses.inc();
        }
    }

    /// A failed attempt to start a partition, to be retried.
    pub fn start_retry(&self) {
        self.start_retries.inc();
    }
}
