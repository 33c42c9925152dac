//! Registering metrics: the one place buckets are set. Each stage's
//! metrics type registers itself through [`Register`].

use prometheus::{
    CounterVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Buckets of `clipstream_batch_size`.
pub const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
/// Buckets of the `_seconds` histograms.
pub const SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Registers metrics in one registry: what each stage's `register` uses.
#[derive(Debug, Clone, Copy)]
pub struct Register<'a>(pub &'a Registry);

impl Register<'_> {
    fn add<M: prometheus::core::Collector + Clone + 'static>(&self, m: prometheus::Result<M>) -> M {
        // Names and labels are literals in this crate, each registered once
        // (`every_metric_registers` runs this for all of them).
        let m = m.expect("valid metric");
        self.0.register(Box::new(m.clone())).expect("unique metric");
        m
    }

    /// A counter.
    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help))
    }

    /// A gauge.
    pub fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help))
    }

    /// A histogram of durations, in seconds.
    pub fn seconds(&self, name: &str, help: &str) -> Histogram {
        self.add(Histogram::with_opts(
            HistogramOpts::new(name, help).buckets(SECONDS_BUCKETS.to_vec()),
        ))
    }

    /// Counters by label.
    pub fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels))
    }

    /// Counters of seconds (fractional) by label.
    pub fn seconds_counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> CounterVec {
        self.add(CounterVec::new(Opts::new(name, help), labels))
    }

    /// Gauges by label.
    pub fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels))
    }

    /// Histograms by label, with `buckets`.
    pub fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> HistogramVec {
        self.add(HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        ))
    }
}
