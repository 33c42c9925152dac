//! `clipstream run` and `clipstream validate`: pipelines from TOML files.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use clipstream_model::{ClipModel, LabelSet, ZeroShotHead};
use clipstream_pipeline::config::PipelineConfig;
use clipstream_pipeline::engine::{self, Components, RunReport};
use clipstream_pipeline::stats::Stats;
use tokio::sync::watch;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Pipeline file (TOML); see pipelines/ for ready ones.
    #[arg(value_name = "PIPELINE.toml")]
    pub pipeline: PathBuf,
    /// No progress display on stderr.
    #[arg(long)]
    pub no_progress: bool,
    /// Serve /metrics, /healthz and /readyz on this address (overrides the
    /// pipeline's `metrics.listen`), e.g. 0.0.0.0:9464.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_listen: Option<String>,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Pipeline files (TOML) to check.
    #[arg(value_name = "PIPELINE.toml", required = true)]
    pub pipelines: Vec<PathBuf>,
}

pub fn validate(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let mut ok = true;
    for p in &args.pipelines {
        match PipelineConfig::load(p) {
            Ok(_) => println!("{}: ok", p.display()),
            Err(e) => {
                ok = false;
                eprintln!("{e}");
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// Loads the model and label set named by the config.
pub fn components(cfg: &PipelineConfig) -> anyhow::Result<Components> {
    let mut model = ClipModel::load_with(
        &cfg.model.dir,
        &cfg.model.variant,
        &cfg.runtime,
        cfg.image.model_input,
    )?;
    model.preprocessor.limits = cfg.image.limits;
    model.preprocessor.apply_exif_orientation = cfg.image.apply_exif_orientation;
    model.preprocessor.mode = cfg.image.mode;
    let head = match &cfg.model.labels {
        Some(path) => {
            let mut h = ZeroShotHead::build(&LabelSet::from_file(path)?, &mut model)?;
            h.source = Some(path.clone());
            Some(h)
        }
        None => None,
    };
    // The width the towers really produce, whatever config.json says.
    let dim = model.embed_texts(&["dimension probe"])?.dim;
    let model_id = model.model_id();
    let model_fingerprint = model.fingerprint()?;
    tracing::info!(model = %model_id, fingerprint = %model_fingerprint, dim, provider = model.vision.provider(), pixel_input = ?model.vision.pixel_input(), "model loaded");
    Ok(Components {
        preprocessor: model.preprocessor,
        tokenizer: model.tokenizer,
        vision: model.vision,
        text: model.text,
        head,
        model_id,
        model_fingerprint,
        dim,
    })
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = PipelineConfig::load(&args.pipeline)?;
    if let Some(listen) = &args.metrics_listen {
        cfg.metrics.listen = Some(listen.clone());
        cfg.validate().map_err(|p| {
            anyhow::anyhow!(
                "--metrics-listen: {}",
                p.iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })?;
    }
    let parts = components(&cfg)?;
    eprintln!(
        "clipstream: model {} (provider {}, {} dimensions{}) -> {}",
        parts.model_id,
        parts.vision.provider(),
        parts.dim,
        parts
            .head
            .as_ref()
            .map(|h| format!(", {} labels", h.classes().len()))
            .unwrap_or_default(),
        cfg.output_location()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("clipstream-io")
        .enable_all()
        .build()?;
    let stats = Arc::new(Stats::default());
    stats.encoder.info(&parts.model_id, parts.vision.provider());
    if let Some(listen) = &cfg.metrics.listen {
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(listen))
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen} for metrics: {e}"))?;
        eprintln!(
            "clipstream: metrics on http://{}/metrics",
            listener.local_addr()?
        );
        runtime.spawn(super::http::serve(listener, Arc::clone(&stats)));
    }
    let deadline = cfg.shutdown.drain_deadline();
    let started = Instant::now();
    let result = runtime.block_on(async {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (deadline_tx, mut deadline_rx) = watch::channel(false);
        tokio::spawn(signals(stop_tx, deadline_tx, deadline));
        let (finished_tx, finished_rx) = watch::channel(false);
        let progress = tokio::spawn(progress(Arc::clone(&stats), !args.no_progress, finished_rx));
        let outcome = tokio::select! {
            r = engine::run(&cfg, parts, stop_rx, Arc::clone(&stats)) => Some(r),
            _ = deadline_rx.wait_for(|d| *d) => None,
        };
        let _ = finished_tx.send(true);
        let _ = progress.await;
        outcome
    });
    match result {
        Some(Ok(report)) => {
            print_summary(&args.pipeline, &report);
            let clean = report.failed == 0 && report.unacknowledged == 0 && !report.stopped_early;
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Some(Err(e)) => Err(e),
        None => {
            let read = Stats::get(&stats.records.read);
            let done = Stats::get(&stats.records.rows)
                + Stats::get(&stats.records.dead_letters)
                + Stats::get(&stats.records.failed);
            eprintln!(
                "drain deadline of {:.0}s passed after {:.1}s: {} record(s) not acknowledged; \
                 open files were not completed. Run the same command again to complete them.",
                deadline.as_secs_f64(),
                started.elapsed().as_secs_f64(),
                read.saturating_sub(done)
            );
            // Threads still hold records; leave without waiting for them.
            std::process::exit(1);
        }
    }
}

/// First SIGINT/SIGTERM: stop reading and drain; after `deadline`, give up.
/// A second signal exits at once.
async fn signals(stop: watch::Sender<bool>, deadline: watch::Sender<bool>, drain: Duration) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::warn!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
    eprintln!(
        "\nstopping: no new records; draining those in flight (up to {:.0}s, signal again to quit now)",
        drain.as_secs_f64()
    );
    let _ = stop.send(true);
    tokio::select! {
        _ = tokio::time::sleep(drain) => { let _ = deadline.send(true); }
        _ = int.recv() => std::process::exit(130),
        _ = term.recv() => std::process::exit(143),
    }
}

/// A progress bar on a terminal; a line every 10 s otherwise. Ends (and
/// clears the bar) when `finished` turns true.
async fn progress(stats: Arc<Stats>, enabled: bool, mut finished: watch::Receiver<bool>) {
    if !enabled {
        return;
    }
    let started = Instant::now();
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} records  {per_sec}  ETA {eta}  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        loop {
            let total = stats.records.total.get().max(0) as u64;
            let done = Stats::get(&stats.records.finished) + Stats::get(&stats.records.skipped);
            bar.set_length(total.max(done));
            bar.set_position(done);
            bar.set_message(format!(
                "dead letters {}",
                Stats::get(&stats.records.dead_letters)
            ));
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = finished.wait_for(|f| *f) => break,
            }
        }
        bar.finish_and_clear();
    } else {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                _ = finished.wait_for(|f| *f) => break,
            }
            let done = Stats::get(&stats.records.finished);
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "progress: {done}/{} records, {:.1} records/s, {} dead letters",
                (stats.records.total.get().max(0) as u64)
                    .saturating_sub(Stats::get(&stats.records.skipped)),
                done as f64 / secs,
                Stats::get(&stats.records.dead_letters)
            );
        }
    }
}

fn print_summary(pipeline: &Path, r: &RunReport) {
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    let done = r.rows + r.dead_letters;
    println!("clipstream run {}", pipeline.display());
    println!(
        "  {:<22} {:>8}{}",
        "records read",
        r.read,
        if r.skipped > 0 {
            format!("   ({} skipped: already written)", r.skipped)
        } else {
            String::new()
        }
    );
    println!("  {:<22} {:>8}", "images encoded", r.images);
    println!("  {:<22} {:>8}", "texts encoded", r.texts);
    println!("  {:<22} {:>8}", "rows written", r.rows);
    println!(
        "  {:<22} {:>8}   -> {}",
        "dead letters", r.dead_letters, r.dead_letters_to
    );
    for (kind, n) in &r.detail.dead_by_kind {
        println!("      {kind:<24} {n:>6}");
    }
    if let Some((routed, to)) = &r.review {
        println!("  {:<22} {:>8}   -> {to}", "routed to review", routed);
    }
    if r.failed > 0 || r.unacknowledged > 0 {
        println!(
            "  {:<22} {:>8}   (rerun the same command to retry them)",
            "not completed",
            r.failed.max(r.unacknowledged)
        );
    }
    println!(
        "  {:<22} {:>8.1} records/s over {secs:.1}s",
        "throughput",
        done as f64 / secs
    );
    println!(
        "  {:<22} {:>8}   in {}",
        "output files",
        r.detail.files.len(),
        r.output
    );
    for f in r.detail.files.iter().take(10) {
        println!("      {f}");
    }
    if r.detail.files.len() > 10 {
        println!("      ... and {} more", r.detail.files.len() - 10);
    }
    if let Some(kib) = peak_rss_kib() {
        println!(
            "  {:<22} {:>8.1} MiB",
            "peak memory (RSS)",
            kib as f64 / 1024.0
        );
    }
    let (peak, limit) = r.memory_peak;
    println!(
        "  {:<22} {:>8.1} MiB   of a {:.0} MiB budget (engine.max_bytes_in_flight)",
        "records in flight",
        peak as f64 / (1 << 20) as f64,
        limit as f64 / (1 << 20) as f64
    );
    if !r.detail.top1.is_empty() {
        println!("  top-1 labels");
        let mut top: Vec<_> = r.detail.top1.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (label, n) in top {
            println!("      {label:<24} {n:>6}");
        }
    }
    if r.stopped_early {
        println!("  stopped before the end of the input: run the same command again to continue");
    }
}

/// The process's peak resident set size (VmHWM), where /proc has it.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
