//! Kafka outputs: the embeddings, labels, review and dead-letter topics,
//! written by one idempotent producer.
//!
//! This stage sits between the encoders and the sink thread. A row goes to
//! the output topics first and reaches the Parquet writer only when every
//! delivery report is in; a dead letter is acknowledged when its delivery
//! report is in. So a record is acknowledged only when every sink holds it,
//! and a Parquet file completes (and is committed) as one unit.
//!
//! Messages (JSON, key = record id):
//! - embeddings (or, with `embeddings_format = "f32le"`, the same fields
//!   as a header and the vectors as float32: see [`message`]):
//!   `{"id", "source": {"topic", "partition", "offset"},
//!   "image_uri", "image_etag", "text", "attributes", "image_embedding",
//!   "text_embedding", "clip_score", "model_id", "event_time_ms",
//!   "processed_at_ms"}`;
//! - labels (records with an image, when a label set is configured):
//!   `{"id", "image_uri", "labels": [{"label", "score"}], "model_id",
//!   "processed_at_ms"}`, with `"needs_review"` and `"review_reason"` when
//!   review thresholds are set;
//! - review (records routed to a person, see [`crate::review`]): `{"id",
//!   "image_uri", "labels", "review_reason", "source", "partition",
//!   "offset", "processed_at_ms", "model_id"}`;
//! - dead letters: the original key, value and headers, plus headers
//!   `clipstream.stage`, `clipstream.kind`, `clipstream.reason`,
//!   `clipstream.source.topic`, `clipstream.source.partition`,
//!   `clipstream.source.offset` and `clipstream.id` (when known).
//!
//! This module holds the producer and the messages; [`stage`] runs the
//! stage (retries, dead-lettering what a topic refuses);
//! [`dead_letter`] fits a dead letter into one message; [`config`] and
//! [`metrics`] are its section and its metrics.

pub mod config;
pub mod dead_letter;
pub mod message;
pub mod metrics;
pub mod stage;

use self::config::EmbeddingsFormat;
pub use self::dead_letter::DeadLetterMessage;
use self::dead_letter::MESSAGE_OVERHEAD_BYTES;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::json;

use crate::record::DeadLetter;
use crate::record::OutputRow;
use crate::stats::{Output, Stats};

/// The producer's context: logs librdkafka's errors like the default one,
/// and keeps the last that names a cause (a TLS handshake or an
/// authentication that failed says more than the metadata timeout it leads
/// to; "all brokers down" says nothing new).
#[derive(Debug, Default)]
pub struct OutputContext {
    last_error: Arc<std::sync::Mutex<Option<String>>>,
}

impl ClientContext for OutputContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::error!("librdkafka: {error}: {reason}");
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::AllBrokersDown) {
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_string());
        }
    }
}

/// Where each output goes (no topic: not produced).
#[derive(Debug, Clone, Default)]
pub struct Topics {
    /// Embeddings.
    pub embeddings: Option<String>,
    /// How embeddings messages are written.
    pub embeddings_format: EmbeddingsFormat,
    /// Top-k labels.
    pub labels: Option<String>,
    /// Records routed to review.
    pub review: Option<String>,
    /// Dead letters.
    pub dead_letters: Option<String>,
}

/// The producer and where each output goes.
pub struct KafkaOutputs {
    producer: FutureProducer<OutputContext>,
    embeddings: Option<String>,
    embeddings_format: EmbeddingsFormat,
    labels: Option<String>,
    review: Option<String>,
    dead_letters: Option<String>,
    model_id: String,
    stats: Arc<Stats>,
    /// The producer's `message.max.bytes`: larger messages are refused
    /// before they are sent.
    max_message_bytes: usize,
}

impl std::fmt::Debug for KafkaOutputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaOutputs")
            .field("embeddings", &self.embeddings)
            .field("labels", &self.labels)
            .field("review", &self.review)
            .field("dead_letters", &self.dead_letters)
            .finish_non_exhaustive()
    }
}

/// The producer's librdkafka settings: idempotent, all replicas; then the
/// raw options.
pub fn producer_config(
    brokers: &str,
    options: &std::collections::BTreeMap<String, String>,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set(
            "client.id",
            format!("clipstream-out-{}", std::process::id()),
        );
    for (k, v) in options {
        c.set(k, v);
    }
    c
}

impl KafkaOutputs {
    /// Connects the producer and checks that the brokers answer.
    pub fn connect(
        brokers: &str,
        options: &std::collections::BTreeMap<String, String>,
        topics: Topics,
        model_id: String,
        stats: Arc<Stats>,
    ) -> anyhow::Result<KafkaOutputs> {
        let Topics {
            embeddings,
            embeddings_format,
            labels,
            review,
            dead_letters,
        } = topics;
        let context = OutputContext::default();
        let last_error = Arc::clone(&context.last_error);
        let producer: FutureProducer<OutputContext> = producer_config(brokers, options)
            .create_with_context(context)
            .map_err(|e| anyhow::anyhow!("cannot create the Kafka producer: {e}"))?;
        for topic in [&embeddings, &labels, &review, &dead_letters]
            .into_iter()
            .flatten()
        {
            producer
                .client()
                .fetch_metadata(Some(topic), Duration::from_secs(15))
                .map_err(|e| {
                    let last = last_error.lock().ok().and_then(|l| l.clone());
                    match last {
                        Some(cause) => anyhow::anyhow!(
                            "output topic {topic:?} on {brokers} is not reachable: {e}; librdkafka's last error: {cause} (check the brokers, the topic, and the security settings in [sink.kafka.options])"
                        ),
                        None => anyhow::anyhow!(
                            "output topic {topic:?} on {brokers} is not reachable: {e} (check the brokers and that the topic exists)"
                        ),
                    }
                })?;
        }
        let max_message_bytes = options
            .get("message.max.bytes")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
        Ok(KafkaOutputs {
            producer,
            embeddings,
            embeddings_format,
            labels,
            review,
            dead_letters,
            model_id,
            stats,
            max_message_bytes,
        })
    }

    async fn send(
        &self,
        output: Output,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> Result<(), DeliveryError> {
        let size = payload.len() + key.map_or(0, <[u8]>::len);
        if size + MESSAGE_OVERHEAD_BYTES > self.max_message_bytes {
            return Err(DeliveryError::Permanent(format!(
                "the {} message for {topic} would be {size} bytes, over message.max.bytes ({})",
                output.as_str(),
                self.max_message_bytes
            )));
        }
        let mut rec = FutureRecord::<[u8], [u8]>::to(topic).payload(payload);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(h) = headers {
            rec = rec.headers(h);
        }
        match self.producer.send(rec, Duration::from_secs(60)).await {
            Ok(_) => {
                self.stats.outputs.produced(output);
                Ok(())
            }
            Err((e, _)) => Err(DeliveryError::of(&e, topic)),
        }
    }

    async fn row(&self, row: &OutputRow) -> Result<(), DeliveryError> {
        let embeddings = match self.embeddings.as_deref() {
            Some(topic) => Some((
                topic,
                message::embeddings_message(row, &self.model_id, self.embeddings_format)
                    .map_err(DeliveryError::Permanent)?,
            )),
            None => None,
        };
        let labelled = |labels: &[clipstream_model::zero_shot::Label]| {
            labels
                .iter()
                .map(|l| json!({"label": l.label, "score": l.score}))
                .collect::<Vec<_>>()
        };
        let labels = match (self.labels.as_deref(), &row.labels) {
            (Some(topic), Some(labels)) => {
                let mut value = json!({
                    "id": row.id,
                    "image_uri": row.image_uri,
                    "labels": labelled(labels),
                    "model_id": self.model_id,
                    "processed_at_ms": row.processed_at_ms,
                });
                if let Some(needs) = row.needs_review {
                    value["needs_review"] = json!(needs);
                    value["review_reason"] = json!(row.review_reason);
                }
                Some((topic, value.to_string().into_bytes()))
            }
            _ => None,
        };
        let review = match (self.review.as_deref(), row.needs_review) {
            (Some(topic), Some(true)) => {
                let mut value = crate::review::line(row);
                value["model_id"] = json!(self.model_id);
                Some((topic, value.to_string().into_bytes()))
            }
            _ => None,
        };
        let key = Some(row.id.as_bytes());
        let e = async {
            match &embeddings {
                Some((t, v)) => {
                    let headers = (self.embeddings_format != EmbeddingsFormat::Json).then(|| {
                        OwnedHeaders::new().insert(Header {
                            key: message::FORMAT_HEADER,
                            value: Some(self.embeddings_format.as_str()),
                        })
                    });
                    self.send(Output::Embeddings, t, key, v, headers).await
                }
                None => Ok(()),
            }
        };
        let l = async {
            match &labels {
                Some((t, v)) => self.send(Output::Labels, t, key, v, None).await,
                None => Ok(()),
            }
        };
        let r = async {
            match &review {
                Some((t, v)) => self.send(Output::Review, t, key, v, None).await,
                None => Ok(()),
            }
        };
        // Sizes are checked before either is sent, so a row refused for
        // its size leaves no half of it on the topics.
        let too_big = [&embeddings, &labels, &review]
            .into_iter()
            .flatten()
            .map(|(t, v)| (t, v.len() + row.id.len()))
            .find(|(_, size)| size + MESSAGE_OVERHEAD_BYTES > self.max_message_bytes);
        if let Some((topic, size)) = too_big {
            return Err(DeliveryError::Permanent(format!(
                "the message for {topic} would be {size} bytes, over message.max.bytes ({})",
                self.max_message_bytes
            )));
        }
        let (e, l, r) = tokio::join!(e, l, r);
        e.and(l).and(r)
    }

    /// Delivers a dead letter, cut down until the topic takes it: the
    /// original value is truncated (its size and SHA-256 travel in
    /// headers), then the original headers are dropped, then the value.
    async fn dead_letter(&self, topic: &str, d: &DeadLetter) -> Result<(), DeliveryError> {
        let mut budget = self.max_message_bytes;
        loop {
            let m = DeadLetterMessage::fit(d, budget);
            let r = self
                .send(
                    Output::DeadLetters,
                    topic,
                    m.key.as_deref(),
                    &m.value,
                    Some(m.headers()),
                )
                .await;
            match r {
                Err(DeliveryError::Permanent(why)) if budget > 1024 => {
                    tracing::warn!(%why, budget, "dead letter refused; sending it smaller");
                    budget /= 2;
                }
                other => return other,
            }
        }
    }
}

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// Why a message was not delivered.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryError {
    /// The broker (or librdkafka) refuses this message for good: too large,
    /// an invalid record. The record becomes a dead letter.
    Permanent(String),
    /// Anything else (timeouts, brokers down, leader moves): retried.
    Transient(String),
    /// The producer cannot go on (a fatal idempotence error, no right to
    /// write the topic): the run ends.
    Broken(String),
}

impl DeliveryError {
    /// Sorts a produce error: errors about the message itself are
    /// permanent; errors about the cluster are transient.
    pub fn of(e: &KafkaError, topic: &str) -> DeliveryError {
        use RDKafkaErrorCode as C;
        let text = format!("delivery to {topic} failed: {e}");
        match e.rdkafka_error_code() {
            Some(
                C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::MessageBatchTooLarge
                | C::InvalidRecord
                | C::InvalidMessage
                | C::BadMessage,
            ) => DeliveryError::Permanent(text),
            Some(
                C::Fatal
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::TransactionalIdAuthorizationFailed,
            ) => DeliveryError::Broken(text),
            _ => DeliveryError::Transient(text),
        }
    }
}

impl std::fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeliveryError::Permanent(m)
            | DeliveryError::Transient(m)
            | DeliveryError::Broken(m) => f.write_str(m),
        }
    }
}
