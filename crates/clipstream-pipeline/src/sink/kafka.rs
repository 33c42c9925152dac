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
//!   "processed_at_ms"}`;
//! - dead letters: the original key, value and headers, plus headers
//!   `clipstream.stage`, `clipstream.kind`, `clipstream.reason`,
//!   `clipstream.source.topic`, `clipstream.source.partition`,
//!   `clipstream.source.offset` and `clipstream.id` (when known).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::json;

use super::SinkMsg;
use crate::dead_letter::DeadLetter;
use crate::record::{Done, OutputRow};
use crate::stats::Stats;

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

/// The producer and where each output goes.
pub struct KafkaOutputs {
    producer: FutureProducer<OutputContext>,
    embeddings: Option<String>,
    labels: Option<String>,
    dead_letters: Option<String>,
    model_id: String,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for KafkaOutputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaOutputs")
            .field("embeddings", &self.embeddings)
            .field("labels", &self.labels)
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
        embeddings: Option<String>,
        labels: Option<String>,
        dead_letters: Option<String>,
        model_id: String,
        stats: Arc<Stats>,
    ) -> anyhow::Result<KafkaOutputs> {
        let context = OutputContext::default();
        let last_error = Arc::clone(&context.last_error);
        let producer: FutureProducer<OutputContext> = producer_config(brokers, options)
            .create_with_context(context)
            .map_err(|e| anyhow::anyhow!("cannot create the Kafka producer: {e}"))?;
        for topic in [&embeddings, &labels, &dead_letters].into_iter().flatten() {
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
        Ok(KafkaOutputs {
            producer,
            embeddings,
            labels,
            dead_letters,
            model_id,
            stats,
        })
    }

    async fn send(
        &self,
        output: &'static str,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> Result<(), String> {
        let mut rec = FutureRecord::<[u8], [u8]>::to(topic).payload(payload);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(h) = headers {
            rec = rec.headers(h);
        }
        match self.producer.send(rec, Duration::from_secs(60)).await {
            Ok(_) => {
                self.stats.kafka_produced.with_label_values(&[output]).inc();
                Ok(())
            }
            Err((e, _)) => Err(format!("delivery to {topic} failed: {e}")),
        }
    }

    async fn row(&self, row: &OutputRow) -> Result<(), String> {
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
        let labels = match (self.labels.as_deref(), &row.labels) {
            (Some(topic), Some(labels)) => {
                let value = json!({
                    "id": row.id,
                    "image_uri": row.image_uri,
                    "labels": labels.iter().map(|l| json!({"label": l.label, "score": l.score})).collect::<Vec<_>>(),
                    "model_id": self.model_id,
                    "processed_at_ms": row.processed_at_ms,
                });
                Some((topic, value.to_string()))
            }
            _ => None,
        };
        let key = Some(row.id.as_bytes());
        let e = async {
            match &embeddings {
                Some((t, v)) => self.send("embeddings", t, key, v.as_bytes(), None).await,
                None => Ok(()),
            }
        };
        let l = async {
            match &labels {
                Some((t, v)) => self.send("labels", t, key, v.as_bytes(), None).await,
                None => Ok(()),
            }
        };
        let (e, l) = tokio::join!(e, l);
        e.and(l)
    }

    async fn dead_letter(&self, topic: &str, d: &DeadLetter) -> Result<(), String> {
        let mut h = OwnedHeaders::new_with_capacity(d.headers.len() + 7);
        for (k, v) in d.headers.iter() {
            h = h.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
        let partition = d.partition.partition.to_string();
        let offset = d.offset.to_string();
        let mut fields = vec![
            ("clipstream.stage", d.stage.as_str()),
            ("clipstream.kind", d.kind.as_str()),
            ("clipstream.reason", d.reason.as_str()),
            ("clipstream.source.topic", &*d.partition.source),
            ("clipstream.source.partition", partition.as_str()),
            ("clipstream.source.offset", offset.as_str()),
        ];
        if let Some(id) = &d.id {
            fields.push(("clipstream.id", id.as_str()));
        }
        for (k, v) in fields {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        self.send(
            "dead_letters",
            topic,
            d.key.as_deref(),
            &d.original,
            Some(h),
        )
        .await
    }
}

/// Runs the outputs stage until `rx` closes: each result goes to the
/// output topics (when configured), then on to the sink thread.
pub fn spawn(
    rx: flume::Receiver<Done>,
    tx: flume::Sender<SinkMsg>,
    outputs: Option<Arc<KafkaOutputs>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        while let Ok(done) = rx.recv_async().await {
            while tasks.try_join_next().is_some() {}
            let Some(out) = outputs.clone() else {
                if tx.send_async(SinkMsg::Done(done)).await.is_err() {
                    break;
                }
                continue;
            };
            let tx = tx.clone();
            tasks.spawn(async move {
                let next = match done {
                    Done::Row { row, ack, permit } if ack.is_current() => {
                        match out.row(&row).await {
                            Ok(()) => Done::Row { row, ack, permit },
                            Err(reason) => Done::Failed {
                                reason,
                                ack,
                                permit,
                            },
                        }
                    }
                    Done::Dead {
                        letter,
                        ack,
                        permit,
                    } if ack.is_current() && out.dead_letters.is_some() => {
                        let topic = out.dead_letters.as_deref().unwrap_or_default();
                        match out.dead_letter(topic, &letter).await {
                            Ok(()) => Done::Dead {
                                letter,
                                ack,
                                permit,
                            },
                            Err(reason) => Done::Failed {
                                reason,
                                ack,
                                permit,
                            },
                        }
                    }
                    other => other,
                };
                let _ = tx.send_async(SinkMsg::Done(next)).await;
            });
        }
        while tasks.join_next().await.is_some() {}
        if let Some(out) = outputs {
            let _ = out.producer.flush(Duration::from_secs(10));
        }
    })
}
