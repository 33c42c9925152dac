//! The closed sets of label values, each written once: call sites name a
//! variant, and [`label_values`] is the contract the dashboards and the ops
//! fake exporter are checked against (`tests/metrics_contract.rs`).

use crate::dead_letter::{Kind, Stage};

/// A closed set of label values: each is written once, here, and call
/// sites name the variant.
macro_rules! label_values {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $value:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every value.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $value),+
                }
            }
        }
    };
}

label_values! {
    /// `operation` of the S3 metrics.
    S3Op {
        /// GetObject.
        GetObject => "get_object",
        /// HeadObject.
        HeadObject => "head_object",
        /// CreateMultipartUpload.
        CreateMultipartUpload => "create_multipart_upload",
        /// UploadPart.
        UploadPart => "upload_part",
        /// CompleteMultipartUpload.
        CompleteMultipartUpload => "complete_multipart_upload",
        /// ListObjectsV2.
        ListObjects => "list_objects",
        /// DeleteObject.
        DeleteObject => "delete_object",
    }
}

label_values! {
    /// `tower` of the encoder metrics.
    Tower {
        /// The vision tower.
        Vision => "vision",
        /// The text tower.
        Text => "text",
    }
}

label_values! {
    /// `output` of `clipstream_kafka_messages_produced_total`.
    Output {
        /// The embeddings topic.
        Embeddings => "embeddings",
        /// The labels topic.
        Labels => "labels",
        /// The dead-letter topic.
        DeadLetters => "dead_letters",
        /// The review topic.
        Review => "review",
    }
}

label_values! {
    /// `decision` of `clipstream_review_total`.
    ReviewDecision {
        /// Confident enough: no person needs to look.
        Accepted => "accepted",
        /// Routed to a person.
        Routed => "routed",
    }
}

label_values! {
    /// `queue` of the queue gauges.
    Queue {
        /// Source to fetch.
        Records => "records",
        /// Fetch to prep.
        Fetched => "fetched",
        /// Prep to the vision batcher.
        Vision => "vision",
        /// Prep to the text batcher.
        Text => "text",
        /// Results to the outputs stage.
        Done => "done",
    }
}

label_values! {
    /// `result` of the commit and S3 request counters.
    ResultLabel {
        /// Succeeded.
        Ok => "ok",
        /// Failed.
        Error => "error",
    }
}

label_values! {
    /// `direction` of `clipstream_s3_bytes_total`.
    Direction {
        /// Read from S3.
        Read => "read",
        /// Written to S3.
        Written => "written",
    }
}

/// Every labelled metric with the values each of its labels can take — the
/// contract the dashboards and the ops fake exporter are checked against
/// (`clipstream_kafka_consumer_lag_records` takes topics and partitions, and
/// `clipstream_encoder_info` / `clipstream_build_info` names and versions:
/// open sets, not listed).
pub fn label_values() -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    let s3_ops: Vec<&str> = S3Op::ALL.iter().map(|o| o.as_str()).collect();
    let towers: Vec<&str> = Tower::ALL.iter().map(|t| t.as_str()).collect();
    let results: Vec<&str> = ResultLabel::ALL.iter().map(|r| r.as_str()).collect();
    vec![
        (
            "clipstream_dead_letters_total",
            "stage",
            Stage::ALL.iter().map(|s| s.as_str()).collect(),
        ),
        (
            "clipstream_dead_letters_total",
            "kind",
            Kind::ALL.iter().map(|k| k.as_str()).collect(),
        ),
        ("clipstream_batch_size", "tower", towers.clone()),
        (
            "clipstream_inference_duration_seconds",
            "tower",
            towers.clone(),
        ),
        (
            "clipstream_encoder_cpu_seconds_total",
            "tower",
            towers.clone(),
        ),
        ("clipstream_queue_wait_seconds", "tower", towers),
        (
            "clipstream_queue_items",
            "queue",
            Queue::ALL.iter().map(|q| q.as_str()).collect(),
        ),
        (
            "clipstream_queue_capacity",
            "queue",
            Queue::ALL.iter().map(|q| q.as_str()).collect(),
        ),
        ("clipstream_s3_requests_total", "operation", s3_ops.clone()),
        ("clipstream_s3_requests_total", "result", results.clone()),
        ("clipstream_s3_retries_total", "operation", s3_ops.clone()),
        (
            "clipstream_s3_request_duration_seconds",
            "operation",
            s3_ops,
        ),
        (
            "clipstream_s3_bytes_total",
            "direction",
            Direction::ALL.iter().map(|d| d.as_str()).collect(),
        ),
        ("clipstream_kafka_commits_total", "result", results),
        (
            "clipstream_review_total",
            "decision",
            ReviewDecision::ALL.iter().map(|d| d.as_str()).collect(),
        ),
        (
            "clipstream_kafka_messages_produced_total",
            "output",
            Output::ALL.iter().map(|o| o.as_str()).collect(),
        ),
    ]
}
