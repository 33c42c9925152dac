//! The encoders' metrics.

use crate::stats::labels::Tower;

/// The encoders' metrics.
#[derive(Debug)]
pub struct EncoderMetrics {
    batch_size: prometheus::HistogramVec,
    inference_seconds: prometheus::HistogramVec,
    queue_wait_seconds: prometheus::HistogramVec,
    cpu_seconds: prometheus::CounterVec,
    info: prometheus::IntGaugeVec,
}

impl EncoderMetrics {
    pub(crate) fn register(r: &crate::stats::register::Register) -> Self {
        use crate::stats::register::{BATCH_BUCKETS, SECONDS_BUCKETS};
        let m = EncoderMetrics {
            batch_size: r.histogram_vec(
                "clipstream_batch_size",
                "Inputs per encoder batch, by tower.",
                &["tower"],
                &BATCH_BUCKETS,
            ),
            inference_seconds: r.histogram_vec(
                "clipstream_inference_duration_seconds",
                "ONNX Runtime time per batch, by tower.",
                &["tower"],
                &SECONDS_BUCKETS,
            ),
            queue_wait_seconds: r.histogram_vec(
                "clipstream_queue_wait_seconds",
                "Time an input waits for its encoder batch to start, by tower.",
                &["tower"],
                &SECONDS_BUCKETS,
            ),
            cpu_seconds: r.seconds_counter_vec(
                "clipstream_encoder_cpu_seconds_total",
                "Host CPU time of the tower's ONNX Runtime runs (its pool threads, and the \
                 encoder thread inside run), by tower: on the CPU provider the inference \
                 itself, on a GPU the host's share of it.",
                &["tower"],
            ),
            info: r.gauge_vec(
                "clipstream_encoder_info",
                "The model and execution provider in use (value 1).",
                &["model", "provider"],
            ),
        };
        for t in Tower::ALL {
            m.queue_wait_seconds.with_label_values(&[t.as_str()]);
            m.batch_size.with_label_values(&[t.as_str()]);
            m.inference_seconds.with_label_values(&[t.as_str()]);
            m.cpu_seconds.with_label_values(&[t.as_str()]);
        }
        m
    }

    /// One batch of `size` inputs that ran for `took`.
    pub fn batch(&self, tower: Tower, size: usize, took: std::time::Duration) {
        self.batch_size
            .with_label_values(&[tower.as_str()])
            .observe(size as f64);
        self.inference_seconds
            .with_label_values(&[tower.as_str()])
            .observe(took.as_secs_f64());
    }

    /// Seconds `tower` has spent in ONNX Runtime, and its batches.
    pub fn inference_total(&self, tower: Tower) -> (f64, u64) {
        let h = self.inference_seconds.with_label_values(&[tower.as_str()]);
        (h.get_sample_sum(), h.get_sample_count())
    }

    /// `tower`'s runs have taken `total` host CPU time since it was
    /// loaded (one encoder thread per tower reports it).
    pub fn cpu_time(&self, tower: Tower, total: std::time::Duration) {
        let c = self.cpu_seconds.with_label_values(&[tower.as_str()]);
        let more = total.as_secs_f64() - c.get();
        if more > 0.0 {
            c.inc_by(more);
        }
    }

    /// Host CPU seconds of `tower`'s runs so far.
    pub fn cpu_seconds(&self, tower: Tower) -> f64 {
        self.cpu_seconds.with_label_values(&[tower.as_str()]).get()
    }

    /// The histogram of how long `tower`'s inputs wait for their batch.
    pub fn queue_wait(&self, tower: Tower) -> prometheus::Histogram {
        self.queue_wait_seconds.with_label_values(&[tower.as_str()])
    }

    /// The model and execution provider in use.
    pub fn info(&self, model: &str, provider: &str) {
        self.info.with_label_values(&[model, provider]).set(1);
    }
}
