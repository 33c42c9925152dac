//! Kafka outputs: the embeddings topic, the labels topic and the
//! dead-letter topic, written by one idempotent producer.
//!
//! This stage sits between the encoders and the sink thread. A row goes to
//! the output topics first and reaches the Parquet writer only when every
//! delivery report is in; a dead letter is acknowledged when its delivery
//! report is in. So a record is acknowledged only when every sink holds it,
//! and a Parquet file completes (and is committed) as one unit.
//!
//! Messages (JSON, key = record id):
//! - embeddings: `{"id", "source": {"topic", "partition", "offset"},
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

pub mod config;
pub mod metrics;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::json;

use crate::ack::AckToken;
use crate::dead_letter::{DeadLetter, Kind, Stage};
use crate::record::{Done, OutputRow};
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
        let embeddings = self.embeddings.as_deref().map(|topic| {
            let attributes = row
                .attributes
                .as_deref()
                .and_then(|a| serde_json::from_str::<serde_json::Value>(a).ok());
            let value = json!({
                "id": row.id,
                "source": {"topic": &*row.source, "partition": row.partition, "offset": row.offset},
                "image_uri": row.image_uri,
                "image_etag": row.image_etag,
                "text": row.text,
                "attributes": attributes,
                "image_embedding": row.image_embedding,
                "text_embedding": row.text_embedding,
                "clip_score": row.clip_score,
                "model_id": self.model_id,
                "event_time_ms": row.event_time_ms,
                "processed_at_ms": row.processed_at_ms,
            });
            (topic, value.to_string())
        });
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
                Some((topic, value.to_string()))
            }
            _ => None,
        };
        let review = match (self.review.as_deref(), row.needs_review) {
            (Some(topic), Some(true)) => {
                let mut value = crate::review::line(row);
                value["model_id"] = json!(self.model_id);
                Some((topic, value.to_string()))
            }
            _ => None,
        };
        let key = Some(row.id.as_bytes());
        let e = async {
            match &embeddings {
                Some((t, v)) => {
                    self.send(Output::Embeddings, t, key, v.as_bytes(), None)
                        .await
                }
                None => Ok(()),
            }
        };
        let l = async {
            match &labels {
                Some((t, v)) => self.send(Output::Labels, t, key, v.as_bytes(), None).await,
                None => Ok(()),
            }
        };
        let r = async {
            match &review {
                Some((t, v)) => self.send(Output::Review, t, key, v.as_bytes(), None).await,
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

/// Room for a message's framing (record batch header, timestamps, headers
/// that are not counted separately).
const MESSAGE_OVERHEAD_BYTES: usize = 512;

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

/// The SHA-256 of `bytes`, in hex.
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A dead letter as one Kafka message that fits in `budget` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterMessage {
    /// The original key, unless it was too large to keep.
    pub key: Option<Vec<u8>>,
    /// The original value, whole or truncated.
    pub value: Vec<u8>,
    /// The original headers that were kept, then ours.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl DeadLetterMessage {
    /// Builds the message of `d`: the original key, value and headers plus
    /// `clipstream.*` headers; when that exceeds `budget`, the original
    /// headers are dropped if they take more than half of it, and the value
    /// is truncated to what is left (`clipstream.original.truncated`,
    /// `.bytes` and `.sha256` say so).
    pub fn fit(d: &DeadLetter, budget: usize) -> DeadLetterMessage {
        let o = &d.origin;
        let partition = o.partition.partition.to_string();
        let offset = o.position.offset.to_string();
        // A reason is a sentence; one that quotes huge input is cut.
        let reason: String = d.reason.chars().take(2048).collect();
        let mut ours: Vec<(String, Option<Vec<u8>>)> = vec![
            ("clipstream.stage".into(), Some(d.stage.as_str().into())),
            ("clipstream.kind".into(), Some(d.kind.as_str().into())),
            ("clipstream.reason".into(), Some(reason.into_bytes())),
            (
                "clipstream.source.topic".into(),
                Some(o.partition.source.as_bytes().to_vec()),
            ),
            ("clipstream.source.partition".into(), Some(partition.into())),
            ("clipstream.source.offset".into(), Some(offset.into())),
        ];
        if let Some(id) = &d.id {
            let id: String = id.chars().take(1024).collect();
            ours.push(("clipstream.id".into(), Some(id.into_bytes())));
        }
        let size = |h: &[(String, Option<Vec<u8>>)]| -> usize {
            h.iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 8)
                .sum()
        };
        // A key over a quarter of the budget is dropped (its size and
        // SHA-256 kept): the message must fit whatever the input was.
        let key_too_large = o.key.as_ref().is_some_and(|k| k.len() > budget / 4);
        if let (true, Some(k)) = (key_too_large, &o.key) {
            ours.push((
                "clipstream.original.key_bytes".into(),
                Some(k.len().to_string().into_bytes()),
            ));
            ours.push((
                "clipstream.original.key_sha256".into(),
                Some(sha256_hex(k).into_bytes()),
            ));
        }
        let key = if key_too_large {
            0
        } else {
            o.key.as_ref().map_or(0, |k| k.len())
        };
        // 400: the headers added below when the original is cut.
        let room = budget.saturating_sub(MESSAGE_OVERHEAD_BYTES + key + size(&ours) + 400);
        let mut headers: Vec<(String, Option<Vec<u8>>)> = o.headers.to_vec();
        if size(&headers) + o.raw.len() > room && size(&headers) > room / 2 {
            ours.push((
                "clipstream.original.headers_dropped".into(),
                Some(headers.len().to_string().into_bytes()),
            ));
            headers.clear();
        }
        let room = room.saturating_sub(size(&headers));
        let value = if o.raw.len() > room {
            let hex = sha256_hex(&o.raw);
            ours.push((
                "clipstream.original.truncated".into(),
                Some(b"true".to_vec()),
            ));
            ours.push((
                "clipstream.original.bytes".into(),
                Some(o.raw.len().to_string().into_bytes()),
            ));
            ours.push(("clipstream.original.sha256".into(), Some(hex.into_bytes())));
            o.raw[..room].to_vec()
        } else {
            o.raw.to_vec()
        };
        headers.extend(ours);
        DeadLetterMessage {
            key: (!key_too_large)
                .then(|| o.key.as_deref().map(<[u8]>::to_vec))
                .flatten(),
            value,
            headers,
        }
    }

    fn headers(&self) -> OwnedHeaders {
        let mut h = OwnedHeaders::new_with_capacity(self.headers.len());
        for (k, v) in &self.headers {
            h = h.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
        h
    }
}

/// Runs the outputs stage until `rx` closes: each result goes to the
/// output topics (when configured), then on to the sink thread.
///
/// Transient delivery errors are retried (with backoff and jitter) for as
/// long as the record's partition is still this worker's: giving up would
/// hold the partition's commits back for good. A row the topics refuse for
/// good (too large, invalid) becomes a dead letter (`output_rejected`); a
/// dead letter the dead-letter topic refuses even when cut down to its
/// headers is fatal (the topic is unusable).
pub fn spawn(
    rx: flume::Receiver<Done>,
    tx: flume::Sender<Done>,
    outputs: Option<Arc<KafkaOutputs>>,
    fatal: Arc<crate::fatal::Fatal>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        while let Ok(done) = rx.recv_async().await {
            while tasks.try_join_next().is_some() {}
            let Some(out) = outputs.clone() else {
                if tx.send_async(done).await.is_err() {
                    break;
                }
                continue;
            };
            let (tx, fatal) = (tx.clone(), Arc::clone(&fatal));
            tasks.spawn(async move {
                let next = deliver(&out, done, &fatal).await;
                let _ = tx.send_async(next).await;
            });
        }
        while tasks.join_next().await.is_some() {}
        if let Some(out) = outputs {
            let _ = out.producer.flush(Duration::from_secs(10));
        }
    })
}

/// Sends one result to the topics it belongs on; returns what the sink
/// thread gets.
async fn deliver(out: &KafkaOutputs, done: Done, fatal: &crate::fatal::Fatal) -> Done {
    match done {
        Done::Row {
            row,
            origin,
            ack,
            permit,
        } if ack.is_current() => match retrying(&ack, || out.row(&row)).await {
            Ok(()) => Done::Row {
                row,
                origin,
                ack,
                permit,
            },
            Err(DeliveryError::Permanent(why)) => {
                tracing::warn!(id = %row.id, %why, "an output topic refused the record; dead-lettering it");
                let letter =
                    origin.dead_letter(Some(row.id), Stage::Output, Kind::OutputRejected, why);
                Box::pin(deliver(
                    out,
                    Done::Dead {
                        letter,
                        ack,
                        permit,
                    },
                    fatal,
                ))
                .await
            }
            Err(e) => {
                if let DeliveryError::Broken(why) = &e {
                    fatal.set(format!("the Kafka producer cannot go on: {why}"));
                }
                Done::Failed {
                    reason: e.to_string(),
                    ack,
                    permit,
                }
            }
        },
        Done::Dead {
            letter,
            ack,
            permit,
        } if ack.is_current() => {
            let Some(topic) = out.dead_letters.as_deref() else {
                // Dead letters go to a file: the sink thread writes it.
                return Done::Dead {
                    letter,
                    ack,
                    permit,
                };
            };
            match retrying(&ack, || out.dead_letter(topic, &letter)).await {
                Ok(()) => Done::Dead {
                    letter,
                    ack,
                    permit,
                },
                Err(e) => {
                    match &e {
                        DeliveryError::Permanent(why) => fatal.set(format!(
                            "the dead-letter topic {topic} refuses even a header-only dead letter: {why}"
                        )),
                        DeliveryError::Broken(why) => {
                            fatal.set(format!("the Kafka producer cannot go on: {why}"))
                        }
                        DeliveryError::Transient(_) => {}
                    }
                    Done::Failed {
                        reason: e.to_string(),
                        ack,
                        permit,
                    }
                }
            }
        }
        other => other,
    }
}

/// Runs `attempt` until it succeeds, fails for good, or the record's
/// partition is no longer this worker's.
async fn retrying<F, Fut>(ack: &AckToken, mut attempt: F) -> Result<(), DeliveryError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), DeliveryError>>,
{
    let mut backoff =
        crate::retry::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        match attempt().await {
            Err(DeliveryError::Transient(why)) if ack.is_current() => {
                let pause = backoff.next_delay();
                tracing::warn!(%why, retry_in_ms = pause.as_millis() as u64, "delivery failed; retrying");
                tokio::time::sleep(pause).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ack::{AckTracker, PartitionKey, Position};
    use crate::record::Origin;

    fn letter(raw: Vec<u8>, headers: Vec<(String, Option<Vec<u8>>)>) -> DeadLetter {
        let partition = PartitionKey {
            source: "events".into(),
            partition: 3,
        };
        Origin {
            partition,
            position: Position { seq: 0, offset: 42 },
            key: Some(Arc::from(&b"k"[..])),
            headers: Arc::from(headers),
            raw: Arc::from(raw),
            event_time_ms: None,
        }
        .dead_letter(
            Some("id-1".into()),
            Stage::Output,
            Kind::OutputRejected,
            "too large".into(),
        )
    }

    fn header<'a>(m: &'a DeadLetterMessage, name: &str) -> Option<&'a [u8]> {
        m.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn size(m: &DeadLetterMessage) -> usize {
        m.value.len()
            + m.key.as_ref().map_or(1, Vec::len)
            + m.headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 8)
                .sum::<usize>()
    }

    /// A key too large for the topic is dropped, its size and SHA-256
    /// kept: no original makes a dead letter that cannot be sent.
    #[test]
    fn a_huge_key_is_dropped_and_the_dead_letter_still_fits() {
        let mut d = letter(b"x".to_vec(), vec![]);
        d.origin.key = Some(Arc::from(vec![b'k'; 2_000_000]));
        for budget in [1_000_000usize, 4_096] {
            let m = DeadLetterMessage::fit(&d, budget);
            assert!(
                size(&m) + MESSAGE_OVERHEAD_BYTES <= budget,
                "{budget}: {}",
                size(&m)
            );
            assert_eq!(m.key, None);
            assert_eq!(
                header(&m, "clipstream.original.key_bytes"),
                Some(&b"2000000"[..])
            );
            assert_eq!(
                header(&m, "clipstream.original.key_sha256").map(<[u8]>::len),
                Some(64)
            );
        }
        let small = letter(b"x".to_vec(), vec![]);
        assert_eq!(
            DeadLetterMessage::fit(&small, 4_096).key.as_deref(),
            Some(&b"k"[..])
        );
    }

    #[test]
    fn a_small_dead_letter_is_sent_whole() {
        let d = letter(
            b"{\"id\": 1}".to_vec(),
            vec![("trace".into(), Some(b"x".to_vec()))],
        );
        let m = DeadLetterMessage::fit(&d, 1_000_000);
        assert_eq!(m.value, b"{\"id\": 1}");
        assert_eq!(header(&m, "trace"), Some(&b"x"[..]));
        assert_eq!(header(&m, "clipstream.kind"), Some(&b"output_rejected"[..]));
        assert_eq!(header(&m, "clipstream.source.offset"), Some(&b"42"[..]));
        assert_eq!(header(&m, "clipstream.original.truncated"), None);
    }

    /// Whatever the original's size and headers, the dead letter fits the
    /// budget, and a truncated one says so with the original's size and
    /// SHA-256.
    #[test]
    fn a_dead_letter_always_fits() {
        let raw: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        let many: Vec<(String, Option<Vec<u8>>)> = (0..20_000)
            .map(|i| (format!("h{i}"), Some(vec![b'v'; 40])))
            .collect();
        for budget in [1_000_000usize, 100_000, 4_096] {
            for headers in [vec![], many.clone()] {
                let d = letter(raw.clone(), headers.clone());
                let m = DeadLetterMessage::fit(&d, budget);
                assert!(
                    size(&m) + MESSAGE_OVERHEAD_BYTES <= budget,
                    "{budget}: {}",
                    size(&m)
                );
                assert_eq!(
                    header(&m, "clipstream.original.truncated"),
                    Some(&b"true"[..])
                );
                assert_eq!(
                    header(&m, "clipstream.original.bytes"),
                    Some(&b"3000000"[..])
                );
                assert_eq!(m.value[..], raw[..m.value.len()]);
                let sha = header(&m, "clipstream.original.sha256").expect("sha");
                assert_eq!(sha.len(), 64);
                if !headers.is_empty() {
                    assert_eq!(
                        header(&m, "clipstream.original.headers_dropped"),
                        Some(&b"20000"[..])
                    );
                }
            }
        }
        // The SHA-256 of a known value.
        let d = letter(b"abc".repeat(1000), vec![]);
        let m = DeadLetterMessage::fit(&d, 2_000);
        // hashlib.sha256(b"abc" * 1000).hexdigest()
        assert_eq!(
            header(&m, "clipstream.original.sha256"),
            Some(&b"328de8f1895f8bb09f6e6b4c2012ef2b2a6f067cd002794b750aa040a6f6d8bd"[..])
        );
    }

    #[tokio::test]
    async fn transient_failures_are_retried_until_the_partition_is_gone() {
        // Three retries: about 0.5 + 1 + 2 s of backoff.
        let tracker = AckTracker::new();
        let key = PartitionKey {
            source: "t".into(),
            partition: 0,
        };
        tracker.assign(&key, 0);
        let ack = tracker.token(key.clone(), Position { seq: 0, offset: 0 });
        let mut calls = 0;
        let r = retrying(&ack, || {
            calls += 1;
            let n = calls;
            async move {
                if n < 4 {
                    Err(DeliveryError::Transient("broker down".into()))
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert_eq!((r, calls), (Ok(()), 4));
        let mut calls = 0;
        let r = retrying(&ack, || {
            calls += 1;
            async { Err(DeliveryError::Permanent("too large".into())) }
        })
        .await;
        assert!(matches!(r, Err(DeliveryError::Permanent(_))));
        assert_eq!(calls, 1, "permanent errors are not retried");
        tracker.revoke(&key);
        let r = retrying(&ack, || async {
            Err(DeliveryError::Transient("broker down".into()))
        })
        .await;
        assert!(
            matches!(r, Err(DeliveryError::Transient(_))),
            "revoked: give up"
        );
        ack.delivered();
    }
}
