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
use std::time::{Duration, Instant};

use clipstream_model::{
    ClipTokenizer, ImagePreprocessor, TextEncoder, VisionEncoder, ZeroShotHead,
};
use tokio::sync::{Semaphore, watch};

use crate::ack::{AckTracker, PartitionKey, Watermark};
use crate::batch::{self, Fatal};
use crate::config::{PipelineConfig, SourceConfig};
use crate::prep::{self, Assembler, PrepContext};
use crate::sink::dead_letter_file::DeadLetterFile;
use crate::sink::parquet::ParquetWriter;
use crate::sink::resume::DoneSet;
use crate::source::SourceContext;
use crate::source::files::FilesSource;
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
    /// Output directory.
    pub output_dir: PathBuf,
    /// Dead-letter file.
    pub dead_letter_path: PathBuf,
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
    let SourceConfig::Files(files_cfg) = &cfg.source;
    let dead_path = cfg.dead_letter_path();
    let out_dir = cfg.sink.parquet.dir.clone();
    let done_set = {
        let (o, d) = (out_dir.clone(), dead_path.clone());
        tokio::task::spawn_blocking(move || DoneSet::load(&o, &d)).await??
    };
    if !done_set.is_empty() {
        tracing::info!(
            done = done_set.len(),
            files = done_set.files,
            "resuming: records already written are skipped"
        );
    }

    let q = cfg.engine.queue_capacity;
    let (records_tx, records_rx) = flume::bounded(q);
    let (fetched_tx, fetched_rx) = flume::bounded(q);
    let (vision_tx, vision_rx) = flume::bounded(q);
    let (text_tx, text_rx) = flume::bounded(q);
    let (vbatch_tx, vbatch_rx) = flume::bounded(1);
    let (tbatch_tx, tbatch_rx) = flume::bounded(1);
    let (done_tx, done_rx) = flume::bounded(q);

    let tracker = AckTracker::new();
    let fatal = Arc::new(Fatal::default());

    // Sink, last stage first.
    let parquet = ParquetWriter::new(
        cfg.sink.parquet.clone(),
        parts.dim,
        parts.model_id.clone(),
        Arc::clone(&stats),
    )?;
    let dead_file = DeadLetterFile::open(&dead_path)?;
    let sink_stats = Arc::clone(&stats);
    let sink = std::thread::Builder::new()
        .name("sink".into())
        .spawn(move || crate::sink::run_sink(done_rx, parquet, dead_file, sink_stats))?;

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

    let source = FilesSource::new(files_cfg.clone(), done_set);
    let fetchers = crate::fetch::spawn_workers(
        records_rx,
        fetched_tx,
        done_tx.clone(),
        cfg.fetch.clone(),
        source.base_dir(),
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
    let source_result = source.run(ctx).await;
    let stopped_early = *inner_stop_rx.borrow();
    for f in fetchers {
        f.await?;
    }
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
    source_result?;
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
        unacknowledged: read.saturating_sub(resolved),
        output_dir: out_dir,
        dead_letter_path: dead_path,
        stopped_early,
    })
}
