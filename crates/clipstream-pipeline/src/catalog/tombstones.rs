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

/// Sends `messages` (key, value; no value: a tombstone) to `topic`, each
/// with `headers`, and waits until the brokers acknowledged every one;
/// returns how many, and per partition the offset after the last one
/// (where a consumer group that has read them all has committed).
pub fn send(
    brokers: &str,
    options: &BTreeMap<String, String>,
    topic: &str,
    messages: &[(String, Option<Vec<u8>>)],
    headers: &[(&str, String)],
) -> anyhow::Result<(u64, BTreeMap<i32, i64>)> {
    use rdkafka::message::{Header, OwnedHeaders};
    if messages.is_empty() {
        return Ok((0, BTreeMap::new()));
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
                if !headers.is_empty() {
                    let hs = headers.iter().fold(OwnedHeaders::new(), |hs, (k, v)| {
                        hs.insert(Header {
                            key: k,
                            value: Some(v.as_bytes()),
                        })
                    });
                    rec = rec.headers(hs);
                }
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
        let mut ends = BTreeMap::new();
        for (key, delivery) in pending {
            match delivery.await {
                Ok(Ok(d)) => {
                    sent += 1;
                    let end = ends.entry(d.partition).or_insert(0);
                    *end = (*end).max(d.offset + 1);
                }
                Ok(Err((e, _))) => anyhow::bail!("the message of {key:?}: {e}"),
                Err(_) => anyhow::bail!("the message of {key:?}: the producer went away"),
            }
        }
        Ok((sent, ends))
    })
}

/// Waits until consumer group `group` has committed, on `topic`, at least
/// `ends` (partition → offset), checking every two seconds for at most
/// `timeout`; says how far it got when it gives up.
pub fn wait_committed(
    brokers: &str,
    options: &BTreeMap<String, String>,
    group: &str,
    topic: &str,
    ends: &BTreeMap<i32, i64>,
    timeout: Duration,
) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    if ends.is_empty() {
        return Ok(());
    }
    let mut config = rdkafka::config::ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (k, v) in options {
        config.set(k, v);
    }
    // Reads the group's offsets; never subscribes, so never joins it.
    let consumer: BaseConsumer = config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create a Kafka client: {e}"))?;
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition(topic, *p);
    }
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let committed = consumer
            .committed_offsets(tpl.clone(), Duration::from_secs(10))
            .map_err(|e| anyhow::anyhow!("reading group {group:?}'s offsets: {e}"))?;
        let behind: Vec<String> = ends
            .iter()
            .filter_map(|(p, end)| {
                let at = match committed.find_partition(topic, *p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => -1,
                };
                (at < *end).then(|| format!("{topic}[{p}] at {at} of {end}"))
            })
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the fleet has not finished the night: group {group:?} is behind on {}",
            behind.join(", ")
        );
        std::thread::sleep(Duration::from_secs(2));
    }
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
    Ok(send(brokers, options, topic, &messages, &[])?.0)
}
