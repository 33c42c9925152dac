//! Wires the stages together and runs a pipeline to its end: the input is
//! exhausted, or a stop was asked for (SIGINT/SIGTERM: stop reading, let the
//! records in flight drain through every stage, close the files), or a tower
//! failed.
//!
//! Closing is a cascade: when the source returns it drops its senders, each
//! stage ends when its input closes and drops its own senders, and the sink
//! thread, last, closes its files. No stage is cancelled mid-record.
//!
//! [`run`] reads like the diagram in the crate's doc: build (the source,
//! then the outputs, each of which must answer: `outputs`; the channels:
//! `queues`; the stages, last first), run the source (`source`, which
//! also sets the policy the other stages follow), collect the report
//! (`report`). `[engine]` and `[shutdown]` are in [`config`].

pub mod config;
pub mod metrics;
mod outputs;
mod queues;
mod report;
mod source;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clipstream_model::{
    ClipTokenizer, ImagePreprocessor, TextEncoder, VisionEncoder, ZeroShotHead,
};
use tokio::sync::{Semaphore, watch};

use self::outputs::{connect_outputs, connect_s3, destination};
use self::queues::Queues;
pub use self::report::RunReport;
use self::source::Source;
use crate::ack::AckTracker;
use crate::assemble::Assembler;
use crate::batch;
use crate::budget::Budget;
use crate::config::PipelineConfig;
use crate::prep::{self, PrepContext};
use crate::sink::SinkThread;
use crate::sink::dead_letter_file::DeadLetterFile;
use crate::sink::parquet::{Destination, ParquetWriter};
use crate::source::SourceContext;
use crate::stats::Stats;

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

/// Runs `cfg` on `parts` until the input ends or `stop` turns true; a stage
/// that fails for good ends the run too, with its error.
pub async fn run(
    cfg: &PipelineConfig,
    parts: Components,
    stop: watch::Receiver<bool>,
    stats: Arc<Stats>,
) -> anyhow::Result<RunReport> {
    let started = Instant::now();
    // Build: the source and the outputs first (each must answer), then the
    // channels and the stages, last stage first.
    let source = Source::prepare(cfg).await?;
    let policy = source.policy();
    let s3 = connect_s3(cfg, &stats).await;
    let dest = destination(cfg, s3.as_ref()).await?;
    let outputs = connect_outputs(cfg, &parts.model_id, &stats).await?;
    let budget = Budget::new(cfg.engine.max_bytes_in_flight);
    let q = Queues::new(&cfg.engine);
    let queue_watch = q.watch(Arc::clone(&stats), cfg.engine.queue_capacity, &budget);
    let sink = spawn_sink(cfg, &parts, dest.clone(), &q, &stats, &budget)?;
    let outputs = crate::sink::kafka::stage::spawn(
        q.done.1.clone(),
        q.sink.0.clone(),
        outputs,
        Arc::clone(&stats.fatal),
    );
    let threads = spawn_model_stages(cfg, parts, &q, &stats, &budget);
    let fetchers = spawn_fetchers(cfg, &source, s3, &q, &stats, &budget)?;
    // Run: the source reads until its input ends or a stop; its senders'
    // closing then ends each stage in turn.
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
    let (tracker, control) = (Arc::clone(&ctx.tracker), q.control.0.clone());
    drop(q);
    let undrained = source.run(cfg, ctx, control, Arc::new(dest)).await;
    let stopped_early = *inner_stop.borrow() && policy.ends_with_input;
    // Collect: every stage joined, the first failure reported.
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
    let ends = (policy.ends_with_input, undrained, stopped_early);
    let mut report = report::report(cfg, &stats, &tracker, started, ends);
    report.memory_peak = (budget.peak(), budget.limit());
    Ok(report)
}

/// The fetch workers, with the source's root and retry policy.
fn spawn_fetchers(
    cfg: &PipelineConfig,
    source: &Source,
    s3: Option<crate::s3::S3>,
    q: &Queues,
    stats: &Arc<Stats>,
    budget: &Arc<Budget>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let fetcher = crate::fetch::Fetcher {
        cfg: cfg.fetch.clone(),
        root: source.fetch_root(cfg)?,
        base: source.base_dir(),
        s3,
        budget: Arc::clone(budget),
        persistent: source.policy().retry_fetches_forever,
    };
    Ok(crate::fetch::spawn_workers(
        q.records.1.clone(),
        q.fetched.0.clone(),
        q.done.0.clone(),
        fetcher,
        Arc::clone(stats),
    ))
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
    let pixel_input = parts.vision.pixel_input();
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
            pixel_input,
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
