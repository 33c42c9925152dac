//! The clients and outputs a run needs before its stages start: the S3
//! client, where Parquet files go, and the Kafka output topics. Each must
//! answer first, so that a wrong endpoint stops the run before it reads.

use std::sync::Arc;

use crate::config::{DeadLetters, ParquetOutput, PipelineConfig, Scheme};
use crate::s3::S3;
use crate::sink::kafka::{KafkaOutputs, Topics};
use crate::sink::parquet::Destination;
use crate::stats::Stats;

/// The S3 client, when images or the output live there.
pub(super) async fn connect_s3(cfg: &PipelineConfig, stats: &Arc<Stats>) -> Option<S3> {
    let needs = cfg.fetch.allows(Scheme::S3) || cfg.sink.parquet.local_dir().is_none();
    if needs {
        Some(S3::connect(&cfg.s3, Arc::clone(stats)).await)
    } else {
        None
    }
}

/// Where Parquet files go; an S3 bucket must answer first.
pub(super) async fn destination(
    cfg: &PipelineConfig,
    s3: Option<&S3>,
) -> anyhow::Result<Destination> {
    let pq = &cfg.sink.parquet;
    match pq
        .output()
        .map_err(|m| anyhow::anyhow!("[sink.parquet] {m}"))?
    {
        ParquetOutput::Dir(dir) => Ok(Destination::Local { dir }),
        ParquetOutput::S3 { bucket, prefix } => {
            let s3 = s3.ok_or_else(|| anyhow::anyhow!("Parquet on S3 needs the S3 client"))?;
            s3.reachable(&bucket).await.map_err(|e| {
                anyhow::anyhow!("the Parquet output bucket is not reachable: {e} (check [s3] endpoint, credentials and that the bucket exists)")
            })?;
            let spool = pq.spool_dir.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("clipstream-spool-{}", std::process::id()))
            });
            Ok(Destination::S3 {
                s3: s3.clone(),
                bucket,
                prefix,
                spool,
                part_bytes: pq.part_bytes,
                handle: tokio::runtime::Handle::current(),
            })
        }
    }
}

/// The Kafka outputs (embeddings, labels, review and dead-letter topics),
/// when any is configured; the brokers must answer first.
pub(super) async fn connect_outputs(
    cfg: &PipelineConfig,
    model_id: &str,
    stats: &Arc<Stats>,
) -> anyhow::Result<Option<Arc<KafkaOutputs>>> {
    let dead_letters = match cfg.dead_letters() {
        Some(DeadLetters::Topic(t)) => Some(t),
        _ => None,
    };
    if cfg.sink.kafka.is_none() && dead_letters.is_none() {
        return Ok(None);
    }
    let Some(brokers) = cfg.kafka_sink_brokers() else {
        anyhow::bail!("the Kafka outputs need brokers: a Kafka source or `[sink.kafka] brokers`");
    };
    let k = cfg.sink.kafka.clone().unwrap_or_default();
    let (model_id, stats) = (model_id.to_string(), Arc::clone(stats));
    let topics = Topics {
        embeddings: k.embeddings_topic,
        embeddings_format: k.embeddings_format,
        labels: k.labels_topic,
        review: k.review_topic,
        dead_letters,
    };
    let outputs = tokio::task::spawn_blocking(move || {
        KafkaOutputs::connect(&brokers, &k.options, topics, model_id, stats)
    })
    .await??;
    Ok(Some(Arc::new(outputs)))
}
