//! Wires the stages together and runs a pipeline to its end: the input is
//! exhausted, or a stop was asked for (SIGINT/SIGTERM: stop reading, let the
//! records in flight drain through every stage, close the files), or a tower
//! failed.
//!
//! Closing is a cascade: when the source returns it drops its senders, each
//! stage ends when its input closes and drops its own senders, and the sink
//! thread, last, closes its files. No stage is cancelled mid-record.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clipstream_model::{
    ClipTokenizer, ImagePreprocessor, TextEncoder, VisionEncoder, ZeroShotHead,
};
use tokio::sync::{Semaphore, watch};

use crate::ack::{AckTracker, PartitionKey, Watermark};
use crate::batch::{self, Fatal};
use crate::config::{PipelineConfig, SourceConfig};
use crate::prep::{self, Assembler, PrepContext};
use crate::sink::Cleanup;
use crate::sink::dead_letter_file::DeadLetterFile;
use crate::sink::kafka::KafkaOutputs;
use crate::sink::parquet::{Destination, ParquetWriter};
use crate::sink::resume::DoneSet;
use crate::source::SourceContext;
use crate::source::files::FilesSource;
use crate::source::kafka::KafkaSource;
use crate::stats::{Snapshot, Stats};

/// The model parts a pipeline runs on (loaded by the caller, so that a
/// broken model stops the program before anything starts).
#[derive(Debug)]
pub struct Components {
    /// Image preprocessing (limits and orientation already set).
    pub preprocessor: ImagePreprocessor,
    /// Tokenizer.
    pub tokenizer: ClipTokenizer,
    /// Vision tower.
    pub vision: VisionEncoder,
    /// Text tower.
    pub text: TextEncoder,
    /// Zero-shot head, when a label set is configured.
    pub head: Option<ZeroShotHead>,
    /// Written into every row.
    pub model_id: String,
    /// Embedding width.
    pub dim: usize,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Wall time.
    pub elapsed: Duration,
    /// Records read (not counting skipped ones).
    pub read: u64,
    /// Records skipped because an earlier run wrote them.
    pub skipped: u64,
    /// Rows in complete files.
    pub rows: u64,
    /// Images encoded.
    pub images: u64,
    /// Texts encoded.
    pub texts: u64,
    /// Dead letters written.
    pub dead_letters: u64,
    /// Records that failed (a rerun retries them).
    pub failed: u64,
    /// Details: dead letters per kind, top-1 labels, files.
    pub detail: Snapshot,
    /// Per partition: resume positions.
    pub watermarks: Vec<(PartitionKey, Watermark)>,
    /// Records read but neither written nor dead-lettered.
    pub unacknowledged: u64,
    /// Where the Parquet files are (a directory or an s3:// URL).
    pub output: String,
    /// Where dead letters are (a file or a topic).
    pub dead_letters_to: String,
    /// True when the run stopped before the end of its input.
    pub stopped_early: bool,
}

/// Runs `cfg` on `parts` until the input ends or `stop` turns true.
pub async fn run(
    cfg: &PipelineConfig,
    parts: Components,
    mut stop: watch::Receiver<bool>,
    stats: Arc<Stats>,
) -> anyhow::Result<RunReport> {
    let started = Instant::now();
    let kafka_source = matches!(cfg.source, SourceConfig::Kafka(_));
    let dead_path = cfg.dead_letter_path();
    let pq = &cfg.sink.parquet;

    // Resume state of local runs: ids already written (Kafka resumes from
    // its committed offsets instead).
    let done_set = match (&cfg.source, &pq.dir, &dead_path) {
        (SourceConfig::Files(_), Some(dir), Some(dead)) => {
            let (o, d) = (dir.clone(), dead.clone());
            tokio::task::spawn_blocking(move || DoneSet::load(&o, &d)).await??
        }
        _ => DoneSet::default(),
    };
    if !done_set.is_empty() {
        tracing::info!(
            done = done_set.len(),
            files = done_set.files,
            "resuming: records already written are skipped"
        );
    }

    // S3, when images or the output live there.
    let needs_s3 = cfg.fetch.allowed_schemes.iter().any(|s| s == "s3") || pq.url.is_some();
    let s3 = if needs_s3 {
        Some(crate::s3::S3::connect(&cfg.s3, Arc::clone(&stats)).await)
    } else {
        None
    };
    let dest = match (&pq.dir, &pq.url, &s3) {
        (Some(dir), _, _) => Destination::Local {
            dir: dir.clone(),
            overwrite: kafka_source,
        },
        (None, Some(url), Some(s3)) => {
            let (bucket, prefix) =
                crate::config::parse_s3_url(url).map_err(|m| anyhow::anyhow!(m))?;
            s3.reachable(&bucket).await.map_err(|e| {
                anyhow::anyhow!("the Parquet output bucket is not reachable: {e} (check [s3] endpoint, credentials and that the bucket exists)")
            })?;
            let spool = pq.spool_dir.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("clipstream-spool-{}", std::process::id()))
            });
            Destination::S3 {
                s3: s3.clone(),
                bucket,
                prefix,
                spool,
                part_bytes: pq.part_bytes,
                handle: tokio::runtime::Handle::current(),
            }
        }
        _ => anyhow::bail!("sink.parquet needs `dir` or `url`"),
    };

    // Kafka outputs: the embeddings and labels topics, the dead-letter topic.
    let kafka_out = match cfg.kafka_sink_brokers() {
        Some(brokers) if cfg.sink.kafka.is_some() || cfg.dead_letter.topic.is_some() => {
            let k = cfg.sink.kafka.clone();
            let options = k.as_ref().map(|k| k.options.clone()).unwrap_or_default();
            let (model_id, out_stats) = (parts.model_id.clone(), Arc::clone(&stats));
            let (emb, lab) = (
                k.as_ref().and_then(|k| k.embeddings_topic.clone()),
                k.as_ref().and_then(|k| k.labels_topic.clone()),
            );
            let dlq = cfg.dead_letter.topic.clone();
            Some(Arc::new(
                tokio::task::spawn_blocking(move || {
                    KafkaOutputs::connect(&brokers, &options, emb, lab, dlq, model_id, out_stats)
                })
                .await??,
            ))
        }
        _ => None,
    };

    let q = cfg.engine.queue_capacity;
    let (records_tx, records_rx) = flume::bounded(q);
    let (fetched_tx, fetched_rx) = flume::bounded(q);
    let (vision_tx, vision_rx) = flume::bounded(q);
    let (text_tx, text_rx) = flume::bounded(q);
    let (vbatch_tx, vbatch_rx) = flume::bounded(1);
    let (tbatch_tx, tbatch_rx) = flume::bounded(1);
    let (done_tx, done_rx) = flume::bounded(q);
    let (sink_tx, sink_rx) = flume::bounded(q);
    let queue_watch = watch_queues(
        Arc::clone(&stats),
        vec![
            ("records", records_rx.clone().into()),
            ("fetched", fetched_rx.clone().into()),
            ("vision", vision_rx.clone().into()),
            ("text", text_rx.clone().into()),
            ("done", done_rx.clone().into()),
        ],
        q,
    );

    let tracker = AckTracker::new();
    let fatal = Arc::new(Fatal::default());

    // Sinks, last stage first.
    let cleanup: Arc<dyn Cleanup> = Arc::new(dest.clone());
    let parquet = ParquetWriter::new(
        pq.clone(),
        dest,
        parts.dim,
        parts.model_id.clone(),
        Arc::clone(&stats),
    )?;
    let dead_file = match &dead_path {
        Some(p) => Some(DeadLetterFile::open(p)?),
        None => None,
    };
    let sink_stats = Arc::clone(&stats);
    let sink = std::thread::Builder::new()
        .name("sink".into())
        .spawn(move || crate::sink::run_sink(sink_rx, parquet, dead_file, sink_stats))?;
    let outputs =
        crate::sink::kafka::spawn(done_rx, sink_tx.clone(), kafka_out, Arc::clone(&fatal));

    let asm = Assembler {
        head: parts.head.map(Arc::new),
        top_k: cfg.model.top_k,
        done: done_tx.clone(),
        stats: Arc::clone(&stats),
    };
    let size = parts.preprocessor.config.output_size();
    let max_len = parts.tokenizer.max_len();
    let mut threads = vec![
        batch::vision_encoder(
            parts.vision,
            size,
            vbatch_rx,
            asm.clone(),
            Arc::clone(&fatal),
        ),
        batch::text_encoder(parts.text, max_len, tbatch_rx, asm, Arc::clone(&fatal)),
        batch::batcher("vision", vision_rx, vbatch_tx, cfg.engine.vision_batch),
        batch::batcher("text", text_rx, tbatch_tx, cfg.engine.text_batch),
    ];
    let prep_threads = match cfg.engine.prep_threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    threads.extend(prep::spawn_threads(
        prep_threads,
        fetched_rx,
        PrepContext {
            preprocessor: parts.preprocessor,
            tokenizer: parts.tokenizer,
            vision: vision_tx,
            text: text_tx,
            done: done_tx.clone(),
            stats: Arc::clone(&stats),
        },
    ));

    // A files source ends with its input; the Kafka source runs until
    // stopped and asks the sink to close files (it holds a sink sender).
    let source = match &cfg.source {
        SourceConfig::Files(f) => {
            drop(sink_tx);
            Source::Files(FilesSource::new(f.clone(), done_set))
        }
        SourceConfig::Kafka(k) => {
            // Leave time for the last commit within the shutdown deadline.
            let drain = Duration::from_secs_f64(cfg.shutdown.drain_deadline_secs * 0.8);
            Source::Kafka(KafkaSource::new(k.clone(), sink_tx, Some(cleanup), drain))
        }
    };
    let base_dir = match &source {
        Source::Files(f) => f.base_dir(),
        Source::Kafka(_) => PathBuf::new(),
    };
    let fetchers = crate::fetch::spawn_workers(
        records_rx,
        fetched_tx,
        done_tx.clone(),
        crate::fetch::Fetcher {
            cfg: cfg.fetch.clone(),
            base: base_dir,
            s3,
            persistent: kafka_source,
        },
        Arc::clone(&stats),
    );

    // The source reads until the input ends or the internal stop turns on
    // (an external stop, or a failed tower).
    let (inner_stop_tx, inner_stop_rx) = watch::channel(false);
    let watcher_fatal = Arc::clone(&fatal);
    let watcher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut external = true;
        loop {
            tokio::select! {
                changed = stop.changed(), if external => match changed {
                    Ok(()) if *stop.borrow() => break,
                    Ok(()) => {}
                    Err(_) => external = false,
                },
                _ = tick.tick() => if watcher_fatal.is_set() { break },
            }
        }
        let _ = inner_stop_tx.send(true);
    });
    let ctx = SourceContext {
        records: records_tx,
        done: done_tx,
        tracker: Arc::clone(&tracker),
        in_flight: Arc::new(Semaphore::new(cfg.engine.max_in_flight)),
        stop: inner_stop_rx.clone(),
        stats: Arc::clone(&stats),
    };
    // Ok(records left unfinished by a stop).
    let source_result = match source {
        Source::Files(f) => {
            stats.ready.store(true, Ordering::Relaxed);
            f.run(ctx).await.map(|()| 0)
        }
        Source::Kafka(k) => k.run(ctx).await,
    };
    let stopped_early = *inner_stop_rx.borrow() && !kafka_source;
    for f in fetchers {
        f.await?;
    }
    outputs.await?;
    queue_watch.abort();
    let joined = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for t in threads {
            t.join()
                .map_err(|_| anyhow::anyhow!("a pipeline thread panicked"))?;
        }
        sink.join()
            .map_err(|_| anyhow::anyhow!("the sink thread panicked"))?
    })
    .await?;
    watcher.abort();
    let undrained = source_result?;
    joined?;
    if let Some(message) = fatal.message() {
        anyhow::bail!("{message}");
    }

    let watermarks = tracker.watermarks();
    let resolved: u64 = watermarks
        .iter()
        .map(|(_, w)| w.delivered + w.dead_lettered)
        .sum();
    let read = Stats::get(&stats.read);
    Ok(RunReport {
        elapsed: started.elapsed(),
        read,
        skipped: Stats::get(&stats.skipped),
        rows: Stats::get(&stats.rows),
        images: Stats::get(&stats.images),
        texts: Stats::get(&stats.texts),
        dead_letters: Stats::get(&stats.dead_letters),
        failed: Stats::get(&stats.failed),
        detail: stats.snapshot(),
        watermarks,
        // Kafka: partitions come and go, so count what the final drain
        // left (the tracker forgets revoked partitions).
        unacknowledged: if kafka_source {
            undrained
        } else {
            read.saturating_sub(resolved)
        },
        output: cfg.output_location(),
        dead_letters_to: match (&dead_path, &cfg.dead_letter.topic) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(t)) => format!("topic {t}"),
            (None, None) => "-".into(),
        },
        stopped_early,
    })
}

/// The source of a run.
#[derive(Debug)]
enum Source {
    Files(FilesSource),
    Kafka(KafkaSource),
}

/// A queue's receiving end, type-erased for sampling its length (holding a
/// receiver does not keep a channel from closing when its senders go).
struct QueueProbe(Box<dyn Fn() -> usize + Send + Sync>);

impl<T: Send + 'static> From<flume::Receiver<T>> for QueueProbe {
    fn from(rx: flume::Receiver<T>) -> Self {
        QueueProbe(Box::new(move || rx.len()))
    }
}

impl std::fmt::Debug for QueueProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueProbe")
    }
}

/// Samples queue lengths into the `clipstream_queue_items` gauge.
fn watch_queues(
    stats: Arc<Stats>,
    queues: Vec<(&'static str, QueueProbe)>,
    capacity: usize,
) -> tokio::task::JoinHandle<()> {
    for (name, _) in &queues {
        stats
            .queue_capacity
            .with_label_values(&[name])
            .set(capacity as i64);
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            for (name, probe) in &queues {
                stats
                    .queue_items
                    .with_label_values(&[name])
                    .set((probe.0)() as i64);
            }
        }
    })
}
