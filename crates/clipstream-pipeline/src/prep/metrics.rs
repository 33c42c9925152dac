//! The CPU stage's metrics.

/// The CPU stage's metrics.
#[derive(Debug)]
pub struct PrepMetrics {
    decode_seconds: prometheus::Histogram,
    tokenize_seconds: prometheus::Histogram,
}

impl PrepMetrics {
    pub(crate) fn register(r: &crate::stats::register::Register) -> Self {
        PrepMetrics {
            decode_seconds: r.seconds(
                "clipstream_decode_duration_seconds",
                "Time to decode and preprocess one image.",
            ),
            tokenize_seconds: r.seconds(
                "clipstream_tokenize_duration_seconds",
                "Time to tokenize one text.",
            ),
        }
    }

    /// One image decoded and preprocessed in `took`.
    pub fn decoded(&self, took: std::time::Duration) {
        self.decode_seconds.observe(took.as_secs_f64());
    }

    /// One text tokenized in `took`.
    pub fn tokenized(&self, took: std::time::Duration) {
        self.tokenize_seconds.observe(took.as_secs_f64());
    }
}
