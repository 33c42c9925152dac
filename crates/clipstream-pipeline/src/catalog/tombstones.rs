//! Tombstones for the products a night removed: on the embeddings topic,
//! a message with the product id as key and no value, which a compacted
//! topic and the index consumers read as "delete".

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

/// Sends `messages` (key, value; no value: a tombstone) to `topic` and
/// waits until the brokers acknowledged every one; returns how many.
pub fn send(
    brokers: &str,
    options: &BTreeMap<String, String>,
    topic: &str,
    messages: &[(String, Option<Vec<u8>>)],
) -> anyhow::Result<u64> {
    if messages.is_empty() {
        return Ok(0);
    }
    let producer: FutureProducer = crate::sink::kafka::producer_config(brokers, options)
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create the Kafka producer: {e}"))?;
    producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(15))
        .map_err(|e| anyhow::anyhow!("the topic {topic:?} on {brokers}: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut pending = Vec::with_capacity(messages.len());
        for (key, value) in messages {
            loop {
                let mut rec = FutureRecord::<str, [u8]>::to(topic).key(key.as_str());
                if let Some(v) = value {
                    rec = rec.payload(v.as_slice());
                }
                match producer.send_result(rec) {
                    Ok(delivery) => {
                        pending.push((key, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err((e, _)) => anyhow::bail!("the message of {key:?}: {e}"),
                }
            }
        }
        let mut sent = 0;
        for (key, delivery) in pending {
            match delivery.await {
                Ok(Ok(_)) => sent += 1,
                Ok(Err((e, _))) => anyhow::bail!("the message of {key:?}: {e}"),
                Err(_) => anyhow::bail!("the message of {key:?}: the producer went away"),
            }
        }
        Ok(sent)
    })
}

/// Publishes one tombstone per id of the night's `deletions.jsonl` on
/// `topic`, waits until the brokers acknowledged every one, and returns
/// how many. Publishing a night's tombstones again is harmless.
pub fn publish(
    brokers: &str,
    options: &BTreeMap<String, String>,
    topic: &str,
    night: &Path,
) -> anyhow::Result<u64> {
    let path = super::plan::deletions_path(night);
    let file = std::fs::File::open(&path).with_context(|| {
        format!(
            "{}: no plan in {} (run `clipstream plan` first)",
            path.display(),
            night.display()
        )
    })?;
    let mut ids = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{}: {line:?} is not JSON", path.display()))?;
        let id = v["id"]
            .as_str()
            .with_context(|| format!("{}: {line:?} has no id", path.display()))?;
        ids.push(id.to_string());
    }
    let messages: Vec<(String, Option<Vec<u8>>)> = ids.into_iter().map(|id| (id, None)).collect();
    send(brokers, options, topic, &messages)
}
