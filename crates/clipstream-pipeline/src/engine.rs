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
use crate::assemble::{Assembler, TextJob, VisionJob};
use crate::batch;
use crate::budget::Budget;
use crate::config::{PipelineConfig, SourceConfig};
use crate::fetch::Fetched;
use crate::prep::{self, PrepContext};
use crate::record::{Done, Record};
use crate::sink::dead_letter_file::DeadLetterFile;
use crate::sink::kafka::KafkaOutputs;
use crate::sink::parquet::{Destination, ParquetWriter};
use crate::sink::{Control, SinkThread};
use crate::source::files::FilesSource;
use crate::source::files::resume::{DoneSet, InputIdentity};
use crate::source::kafka::KafkaSource;
use crate::source::{Cleanup, SourceContext};
use crate::stats::{Queue, Snapshot, Stats};

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
    /// What determines the embeddings (`ClipModel::fingerprint`), written
    /// into every Parquet file's metadata (`clipstream.model_fingerprint`):
    /// `clipstream plan` re-embeds what an earlier model wrote.
    pub model_fingerprint: String,
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
    /// Labelled rows routed to review, and where they are listed (a file
    /// or a topic); `None` without review thresholds.
    pub review: Option<(u64, String)>,
    /// True when the run stopped before the end of its input.
    pub stopped_early: bool,
    /// The most bytes charged to the memory budget at once, and the budget.
    pub memory_peak: (u64, u64),
}

/// Runs `cfg` on `parts` until the input ends or `stop` turns true; a stage
/// that fails for good ends the run too, with its error.
pub async fn run(
    cfg: &PipelineConfig,
    parts: Components,
    stop: watch::Receiver<bool>,
    stats: Arc<Stats>,
) -> anyhow::Result<RunReport> {
    let started = Instant::now();
    let source = Source::prepare(cfg).await?;
    let s3 = connect_s3(cfg, &stats).await;
    let dest = destination(cfg, s3.as_ref()).await?;
    let outputs = connect_outputs(cfg, &parts.model_id, &stats).await?;
    let budget = Budget::new(cfg.engine.max_bytes_in_flight);
    let q = Queues::new(&cfg.engine);
    let queue_watch = q.watch(Arc::clone(&stats), cfg.engine.queue_capacity, &budget);
    let sink = spawn_sink(cfg, &parts, dest.clone(), &q, &stats, &budget)?;
    let outputs = crate::sink::kafka::spawn(
        q.done.1.clone(),
        q.sink.0.clone(),
        outputs,
        Arc::clone(&stats.fatal),
    );
    let threads = spawn_model_stages(cfg, parts, &q, &stats, &budget);
    let fetchers = crate::fetch::spawn_workers(
        q.records.1.clone(),
        q.fetched.0.clone(),
        q.done.0.clone(),
        crate::fetch::Fetcher {
            cfg: cfg.fetch.clone(),
            root: fetch_root(cfg, &source)?,
            base: source.base_dir(),
            s3,
            budget: Arc::clone(&budget),
            persistent: source.retries_forever(),
        },
        Arc::clone(&stats),
    );
    let (inner_stop, watcher) = watch_stop(stop, Arc::clone(&stats.fatal));
    let ctx = SourceContext {
        records: q.records.0.clone(),
        done: q.done.0.clone(),
        tracker: AckTracker::new(),
        in_flight: Arc::new(Semaphore::new(cfg.engine.max_in_flight)),
        budget: Arc::clone(&budget),
        stop: inner_stop.clone(),
        stats: Arc::clone(&stats),
    };
    let tracker = Arc::clone(&ctx.tracker);
    let ends_with_input = source.ends_with_input();
    let control = q.control.0.clone();
    drop(q);
    let undrained = source.run(cfg, ctx, control, Arc::new(dest)).await;
    let stopped_early = *inner_stop.borrow() && ends_with_input;
    for f in fetchers {
        f.await?;
    }
    outputs.await?;
    queue_watch.abort();
    let joined = join_threads(threads, sink).await;
    watcher.abort();
    if let Some(message) = stats.fatal.message() {
        anyhow::bail!("{message}");
    }
    let undrained = undrained?;
    joined?;
    let mut report = report(
        cfg,
        &stats,
        &tracker,
        started,
        ends_with_input,
        undrained,
        stopped_early,
    );
    report.memory_peak = (budget.peak(), budget.limit());
    Ok(report)
}

/// The source of a run, and what it decides about the rest.
#[derive(Debug)]
enum Source {
    Files(FilesSource),
    Kafka(Box<crate::config::KafkaSourceConfig>),
}

impl Source {
    /// The files source loads what an earlier run already wrote (it resumes
    /// by skipping it); Kafka resumes from committed offsets.
    async fn prepare(cfg: &PipelineConfig) -> anyhow::Result<Source> {
        match &cfg.source {
            SourceConfig::Kafka(k) => Ok(Source::Kafka(Box::new(k.clone()))),
            SourceConfig::Files(f) => {
                let mut source = FilesSource::new(f.clone(), DoneSet::default());
                if let (Some(dir), Some(dead)) = (&cfg.sink.parquet.dir, cfg.dead_letter_path()) {
                    let (dir, input_cfg) = (dir.clone(), f.clone());
                    let stem = crate::sink::parquet::destination::stem(&source.key());
                    let done = tokio::task::spawn_blocking(move || -> anyhow::Result<DoneSet> {
                        let input = match (&input_cfg.manifest, &input_cfg.dir) {
                            (Some(m), _) => InputIdentity::manifest(m)?,
                            (None, Some(d)) => InputIdentity::dir(d)?,
                            (None, None) => anyhow::bail!("the files source names no input"),
                        };
                        DoneSet::load(&dir, &dead, &input, &stem)
                    })
                    .await??;
                    if !done.is_empty() {
                        tracing::info!(
                            done = done.len(),
                            files = done.files,
                            "resuming: records already written are skipped"
                        );
                    }
                    source = FilesSource::new(f.clone(), done);
                }
                Ok(Source::Files(source))
            }
        }
    }

    /// Whether transient fetch failures are retried until they succeed
    /// (streaming: a failed record would hold its partition back) rather
    /// than failing the record (local runs: a rerun retries it).
    fn retries_forever(&self) -> bool {
        matches!(self, Source::Kafka(_))
    }

    /// Whether the run ends when the input does (a stop before that is
    /// "stopped early"); a Kafka source runs until stopped.
    fn ends_with_input(&self) -> bool {
        matches!(self, Source::Files(_))
    }

    /// Base of relative file paths in events.
    fn base_dir(&self) -> PathBuf {
        match self {
            Source::Files(f) => f.base_dir(),
            Source::Kafka(_) => PathBuf::new(),
        }
    }

    /// Reads until the input ends or `ctx.stop`; returns the records left
    /// unfinished by a stop (Kafka: they are read again on restart).
    async fn run(
        self,
        cfg: &PipelineConfig,
        ctx: SourceContext,
        control: flume::Sender<Control>,
        dest: Arc<Destination>,
    ) -> anyhow::Result<u64> {
        match self {
            Source::Files(f) => {
                drop(control);
                ctx.stats.ready.store(true, Ordering::Relaxed);
                f.run(ctx).await.map(|()| 0)
            }
            Source::Kafka(k) => {
                // Leave time for the last commit within the shutdown deadline.
                let drain = Duration::from_secs_f64(cfg.shutdown.drain_deadline_secs * 0.8);
                let cleanup: Arc<dyn Cleanup> = dest;
                KafkaSource::new(*k, control, Some(cleanup), drain)
                    .run(ctx)
                    .await
            }
        }
    }
}

/// The directory local files must lie under (canonical): `fetch.root`, or
/// the source's own directory.
fn fetch_root(cfg: &PipelineConfig, source: &Source) -> anyhow::Result<PathBuf> {
    let root = cfg.fetch.root.clone().unwrap_or_else(|| source.base_dir());
    if !cfg.fetch.allowed_schemes.iter().any(|s| s == "file") {
        return Ok(root);
    }
    std::fs::canonicalize(&root).map_err(|e| {
        anyhow::anyhow!(
            "fetch.root {}: {e} (local images must lie under an existing directory)",
            root.display()
        )
    })
}

/// The S3 client, when images or the output live there.
async fn connect_s3(cfg: &PipelineConfig, stats: &Arc<Stats>) -> Option<crate::s3::S3> {
    let needs =
        cfg.fetch.allowed_schemes.iter().any(|s| s == "s3") || cfg.sink.parquet.url.is_some();
    if needs {
        Some(crate::s3::S3::connect(&cfg.s3, Arc::clone(stats)).await)
    } else {
        None
    }
}

/// Where Parquet files go; an S3 bucket must answer first.
async fn destination(
    cfg: &PipelineConfig,
    s3: Option<&crate::s3::S3>,
) -> anyhow::Result<Destination> {
    let pq = &cfg.sink.parquet;
    match (&pq.dir, &pq.url, s3) {
        (Some(dir), _, _) => Ok(Destination::Local { dir: dir.clone() }),
        (None, Some(url), Some(s3)) => {
            let (bucket, prefix) =
                crate::config::parse_s3_url(url).map_err(|m| anyhow::anyhow!(m))?;
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
        _ => anyhow::bail!("sink.parquet needs `dir` or `url`"),
    }
}

/// The Kafka outputs (embeddings, labels and dead-letter topics), when any
/// is configured; the brokers must answer first.
async fn connect_outputs(
    cfg: &PipelineConfig,
    model_id: &str,
    stats: &Arc<Stats>,
) -> anyhow::Result<Option<Arc<KafkaOutputs>>> {
    let Some(brokers) = cfg.kafka_sink_brokers() else {
        return Ok(None);
    };
    if cfg.sink.kafka.is_none() && cfg.dead_letter.topic.is_none() {
        return Ok(None);
    }
    let k = cfg.sink.kafka.clone();
    let options = k.as_ref().map(|k| k.options.clone()).unwrap_or_default();
    let (model_id, stats) = (model_id.to_string(), Arc::clone(stats));
    let topics = crate::sink::kafka::Topics {
        embeddings: k.as_ref().and_then(|k| k.embeddings_topic.clone()),
        labels: k.as_ref().and_then(|k| k.labels_topic.clone()),
        review: k.as_ref().and_then(|k| k.review_topic.clone()),
        dead_letters: cfg.dead_letter.topic.clone(),
    };
    let outputs = tokio::task::spawn_blocking(move || {
        KafkaOutputs::connect(&brokers, &options, topics, model_id, stats)
    })
    .await??;
    Ok(Some(Arc::new(outputs)))
}

/// The channels between the stages: (sender, receiver) pairs.
struct Queues {
    records: (flume::Sender<Record>, flume::Receiver<Record>),
    fetched: (flume::Sender<Fetched>, flume::Receiver<Fetched>),
    vision: (flume::Sender<VisionJob>, flume::Receiver<VisionJob>),
    text: (flume::Sender<TextJob>, flume::Receiver<TextJob>),
    done: (flume::Sender<Done>, flume::Receiver<Done>),
    sink: (flume::Sender<Done>, flume::Receiver<Done>),
    control: (flume::Sender<Control>, flume::Receiver<Control>),
}

impl Queues {
    fn new(e: &crate::config::EngineConfig) -> Queues {
        let q = e.queue_capacity;
        Queues {
            // The source sends into these from the Kafka poll thread, which
            // must never wait: every item holds an in-flight slot, so room
            // for every slot means a send never blocks.
            records: flume::bounded(e.max_in_flight),
            done: flume::bounded(e.max_in_flight),
            fetched: flume::bounded(q),
            vision: flume::bounded(q),
            text: flume::bounded(q),
            sink: flume::bounded(q),
            control: flume::unbounded(),
        }
    }

    /// Samples queue lengths into `clipstream_queue_items`, and the
    /// budget's use.
    fn watch(
        &self,
        stats: Arc<Stats>,
        capacity: usize,
        budget: &Arc<Budget>,
    ) -> tokio::task::JoinHandle<()> {
        watch_queues(
            stats,
            Arc::clone(budget),
            vec![
                (Queue::Records, (&self.records.0).into()),
                (Queue::Fetched, (&self.fetched.0).into()),
                (Queue::Vision, (&self.vision.0).into()),
                (Queue::Text, (&self.text.0).into()),
                (Queue::Done, (&self.done.0).into()),
            ],
            capacity,
        )
    }
}

/// The sink thread, last stage first.
fn spawn_sink(
    cfg: &PipelineConfig,
    parts: &Components,
    dest: Destination,
    q: &Queues,
    stats: &Arc<Stats>,
    budget: &Arc<Budget>,
) -> anyhow::Result<std::thread::JoinHandle<Result<(), crate::sink::parquet::SinkError>>> {
    let parquet = ParquetWriter::new(
        cfg.sink.parquet.clone(),
        dest,
        parts.dim,
        parts.model_id.clone(),
        Arc::clone(stats),
    )?
    .with_fingerprint(parts.model_fingerprint.clone())
    .with_review(match &cfg.review_path() {
        Some(p) => Some(DeadLetterFile::open(p)?),
        None => None,
    });
    let dead_letters = match &cfg.dead_letter_path() {
        Some(p) => Some(DeadLetterFile::open(p)?),
        None => None,
    };
    let sink = SinkThread {
        results: q.sink.1.clone(),
        control: q.control.1.clone(),
        parquet,
        dead_letters,
        budget: Arc::clone(budget),
        stats: Arc::clone(stats),
        fatal: Arc::clone(&stats.fatal),
    };
    Ok(std::thread::Builder::new()
        .name("sink".into())
        .spawn(move || sink.run())?)
}

/// The CPU and model stages: prep threads, batchers, one encoder per tower.
fn spawn_model_stages(
    cfg: &PipelineConfig,
    parts: Components,
    q: &Queues,
    stats: &Arc<Stats>,
    budget: &Arc<Budget>,
) -> Vec<std::thread::JoinHandle<()>> {
    let (vbatch_tx, vbatch_rx) = flume::bounded(1);
    let (tbatch_tx, tbatch_rx) = flume::bounded(1);
    let asm = Assembler {
        head: parts.head.map(Arc::new),
        review: cfg.review(),
        top_k: cfg.model.top_k,
        dim: parts.dim,
        done: q.done.0.clone(),
        stats: Arc::clone(stats),
    };
    let size = parts.preprocessor.config.output_size();
    let max_len = parts.tokenizer.max_len();
    let fatal = &stats.fatal;
    let mut threads = vec![
        batch::vision_encoder(
            parts.vision,
            size,
            vbatch_rx,
            asm.clone(),
            Arc::clone(fatal),
            Arc::clone(budget),
        ),
        batch::text_encoder(parts.text, max_len, tbatch_rx, asm, Arc::clone(fatal)),
        batch::batcher(
            "vision",
            q.vision.1.clone(),
            vbatch_tx,
            cfg.engine.vision_batch,
        ),
        batch::batcher("text", q.text.1.clone(), tbatch_tx, cfg.engine.text_batch),
    ];
    let prep_threads = match cfg.engine.prep_threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    // The buffers preprocessing keeps for reuse take at most 3/16 of the
    // memory budget: an eighth on the prep threads (8 MiB each with the
    // default budget and 16 threads: a 1600x1200 photo's decode and
    // resize), a sixteenth as model inputs.
    {
        use clipstream_model::preprocess::buffers;
        let budget = usize::try_from(cfg.engine.max_bytes_in_flight).unwrap_or(usize::MAX);
        buffers::set_limits(
            (budget / 8 / prep_threads).min(buffers::KEEP_BYTES_PER_THREAD),
            (budget / 16).min(buffers::KEEP_PIXEL_BYTES),
        );
    }
    threads.extend(prep::spawn_threads(
        prep_threads,
        q.fetched.1.clone(),
        PrepContext {
            preprocessor: parts.preprocessor,
            tokenizer: parts.tokenizer,
            vision: q.vision.0.clone(),
            text: q.text.0.clone(),
            done: q.done.0.clone(),
            stats: Arc::clone(stats),
            budget: Arc::clone(budget),
        },
    ));
    threads
}

/// The source's stop: an external stop, or a stage that failed for good.
fn watch_stop(
    mut stop: watch::Receiver<bool>,
    fatal: Arc<crate::fatal::Fatal>,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
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
                _ = tick.tick() => if fatal.is_set() { break },
            }
        }
        let _ = tx.send(true);
    });
    (rx, watcher)
}

/// Waits for the stage threads and the sink.
async fn join_threads(
    threads: Vec<std::thread::JoinHandle<()>>,
    sink: std::thread::JoinHandle<Result<(), crate::sink::parquet::SinkError>>,
) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for t in threads {
            t.join()
                .map_err(|_| anyhow::anyhow!("a pipeline thread panicked"))?;
        }
        sink.join()
            .map_err(|_| anyhow::anyhow!("the sink thread panicked"))?
            .map_err(|e| anyhow::anyhow!("the sink failed: {e}"))
    })
    .await?
}

/// What the run did.
fn report(
    cfg: &PipelineConfig,
    stats: &Stats,
    tracker: &AckTracker,
    started: Instant,
    ends_with_input: bool,
    undrained: u64,
    stopped_early: bool,
) -> RunReport {
    let watermarks = tracker.watermarks();
    let resolved: u64 = watermarks
        .iter()
        .map(|(_, w)| w.delivered + w.dead_lettered)
        .sum();
    let read = Stats::get(&stats.read);
    RunReport {
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
        unacknowledged: if ends_with_input {
            read.saturating_sub(resolved)
        } else {
            undrained
        },
        output: cfg.output_location(),
        dead_letters_to: match (&cfg.dead_letter_path(), &cfg.dead_letter.topic) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(t)) => format!("topic {t}"),
            (None, None) => "-".into(),
        },
        review: cfg.review().active().then(|| {
            let to = match (
                cfg.review_path(),
                cfg.sink
                    .kafka
                    .as_ref()
                    .and_then(|k| k.review_topic.as_ref()),
            ) {
                (Some(p), _) => p.display().to_string(),
                (None, Some(t)) => format!("topic {t}"),
                (None, None) => "-".into(),
            };
            (stats.routed(), to)
        }),
        stopped_early,
        memory_peak: (0, 0),
    }
}

/// A queue's length, sampled through a weak handle: holding it keeps the
/// channel open for neither side (a probe that held a receiver kept a
/// channel "open" after its consumer died, and its producers blocked).
struct QueueProbe(Box<dyn Fn() -> usize + Send + Sync>);

impl<T: Send + 'static> From<&flume::Sender<T>> for QueueProbe {
    fn from(tx: &flume::Sender<T>) -> Self {
        let weak = tx.downgrade();
        QueueProbe(Box::new(move || weak.upgrade().map_or(0, |tx| tx.len())))
    }
}

impl std::fmt::Debug for QueueProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueProbe")
    }
}

/// Samples queue lengths into the `clipstream_queue_items` gauge, and the
/// budget's use into `clipstream_memory_in_flight_bytes`.
fn watch_queues(
    stats: Arc<Stats>,
    budget: Arc<Budget>,
    queues: Vec<(Queue, QueueProbe)>,
    capacity: usize,
) -> tokio::task::JoinHandle<()> {
    for (name, _) in &queues {
        stats
            .queue_capacity
            .with_label_values(&[name.as_str()])
            .set(capacity as i64);
    }
    stats.memory_budget.set(budget.limit() as i64);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            stats.memory_in_flight.set(budget.used() as i64);
            for (name, probe) in &queues {
                stats
                    .queue_items
                    .with_label_values(&[name.as_str()])
                    .set((probe.0)() as i64);
            }
        }
    })
}
