//! `clipstream bench`: throughput figures for a model on this machine.
//!
//! Prints, for one model and batch size: JPEG decode + preprocessing on one
//! core (images/s), the raw vision session (images/s, pixels prepared
//! beforehand), the raw text session (texts/s), and `embed` end to end
//! (read, decode, preprocess and encode, one thread feeding the session).
//! Figures are printed, never asserted.
//!
//! `--host-cost` prints the host's CPU cost per record instead (see
//! [`host_cost`]); `--messages` the embeddings topic's two formats
//! ([`messages`]).

mod common;
mod corpus;
mod host_cost;
mod messages;
mod nightly;
mod search;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clipstream_model::ClipModel;

pub use self::common::BenchArgs;
use self::common::{COLOURS, SHAPES, list_images};

struct Figure {
    name: &'static str,
    per_s: f64,
    unit: &'static str,
    n: usize,
}

fn timed(
    seconds: f64,
    mut step: impl FnMut() -> anyhow::Result<usize>,
) -> anyhow::Result<(f64, usize)> {
    step()?; // warm-up
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < budget {
        n += step()?;
    }
    Ok((n as f64 / start.elapsed().as_secs_f64(), n))
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.host_cost {
        host_cost::run(&args)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(n) = args.nightly {
        nightly::run(&args, n)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(n) = args.search {
        search::run(&args, n)?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.messages {
        messages::run(&args)?;
        return Ok(ExitCode::SUCCESS);
    }
    let want = |part: &str| args.only.is_empty() || args.only.iter().any(|p| p == part);
    let files = ensure_images(&args.image_dir)?;
    let blobs: Vec<Vec<u8>> = files
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect::<anyhow::Result<_>>()?;
    let mut model = ClipModel::load(
        &args.model.model,
        &args.model.variant,
        &args.model.runtime.options(),
    )?;
    model.preprocessor.limits = args.images.limits();
    model.preprocessor.mode = args.images.image_mode;
    let per_image = model.preprocessor.pixels_len();
    let bs = args.batch_size.max(1);
    let mut figures = Vec::new();

    if want("preprocess") {
        let mut out = vec![0f32; per_image];
        let mut i = 0;
        let (rate, n) = timed(args.seconds, || {
            model
                .preprocessor
                .preprocess_into(&blobs[i % blobs.len()], &mut out)?;
            i += 1;
            Ok(1)
        })?;
        figures.push(Figure {
            name: "preprocess (decode+resize+normalise, 1 core)",
            per_s: rate,
            unit: "images/s",
            n,
        });
    }

    // One batch of real pixels, reused.
    let mut pixels = vec![0f32; bs * per_image];
    for (k, chunk) in pixels.chunks_exact_mut(per_image).enumerate() {
        model
            .preprocessor
            .preprocess_into(&blobs[k % blobs.len()], chunk)?;
    }
    // The raw session and the pipeline in turn, `rounds` times.
    let both = want("vision") && want("pipeline");
    let rounds = if both { args.rounds as usize } else { 1 };
    let (mut raw_rates, mut pipe_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut raw_n = 0;
    for round in 0..rounds {
        if want("vision") {
            // The session alone: the pixels as they are, no copy.
            let size = model.preprocessor.config.output_size();
            let (rate, n) = timed(args.seconds, || {
                Ok(model.vision.embed(&pixels, bs, size)?.len())
            })?;
            raw_rates.push(rate);
            raw_n += n;
        }
        if want("pipeline") {
            pipe_rates.push(pipeline_rate(&args, &files)?);
        }
        if both {
            let ratio = pipe_rates[round] / raw_rates[round];
            println!(
                "round {}: vision session {:.1} images/s, pipeline {:.1} images/s, ratio {ratio:.3}",
                round + 1,
                raw_rates[round],
                pipe_rates[round]
            );
            ratios.push(ratio);
        }
    }
    if want("vision") {
        figures.push(Figure {
            name: "vision session (raw)",
            per_s: median(&mut raw_rates),
            unit: "images/s",
            n: raw_n,
        });
    }
    if want("text") {
        let texts: Vec<String> = (0..bs)
            .map(|i| {
                format!(
                    "a photo of a {} {} on a {} background, item {i}",
                    COLOURS[i % 6],
                    SHAPES[i % 4],
                    COLOURS[(i + 3) % 6]
                )
            })
            .collect();
        let (rate, n) = timed(args.seconds, || Ok(model.embed_texts(&texts)?.len()))?;
        figures.push(Figure {
            name: "text session (raw)",
            per_s: rate,
            unit: "texts/s",
            n,
        });
    }
    if want("embed") {
        let mut i = 0;
        let (rate, n) = timed(args.seconds, || {
            let mut batch = vec![0f32; bs * per_image];
            for chunk in batch.chunks_exact_mut(per_image) {
                let bytes = std::fs::read(&files[i % files.len()])?;
                model.preprocessor.preprocess_into(&bytes, chunk)?;
                i += 1;
            }
            Ok(model.embed_pixels(&batch, bs)?.len())
        })?;
        figures.push(Figure {
            name: "embed end to end (sequential)",
            per_s: rate,
            unit: "images/s",
            n,
        });
    }

    if want("pipeline") {
        figures.push(Figure {
            name: "pipeline (clipstream run, local files)",
            per_s: median(&mut pipe_rates),
            unit: "images/s",
            n: args.pipeline_records * rounds,
        });
    }

    println!(
        "model {} ({}), provider {}, batch {bs}, {} images from {}",
        model.model_id(),
        model.vision.path().display(),
        model.vision.provider(),
        files.len(),
        args.image_dir.display()
    );
    for f in &figures {
        println!("{:<48} {:>10.1} {:<9} (n={})", f.name, f.per_s, f.unit, f.n);
    }
    for f in &figures {
        let key = f.name.split_whitespace().next().unwrap_or(f.name);
        println!(
            "bench {key} {}={:.2}",
            f.unit.replace('/', "_per_"),
            f.per_s
        );
    }
    if !ratios.is_empty() {
        println!(
            "bench pipeline_over_raw_vision ratio={:.3} rounds={}",
            median(&mut ratios),
            ratios.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the engine on `pipeline_records` image events over `files` and
/// returns images/s (wall time of the whole run, model already loaded).
fn pipeline_rate(args: &BenchArgs, files: &[PathBuf]) -> anyhow::Result<f64> {
    use std::io::Write;
    let dir = std::env::temp_dir().join(format!("clipstream-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let manifest = dir.join("events.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&manifest)?);
    for i in 0..args.pipeline_records {
        let p = std::fs::canonicalize(&files[i % files.len()])?;
        writeln!(
            f,
            "{}",
            serde_json::json!({"id": format!("b{i}"), "image": p.display().to_string()})
        )?;
    }
    f.flush()?;
    let bs = args.batch_size.max(1);
    let toml = format!(
        "[model]\ndir = {:?}\nvariant = {:?}\n[source]\nkind = \"files\"\nmanifest = {:?}\n\
         [engine]\nmax_in_flight = {}\nvision_batch = {{ max_size = {bs}, max_wait_ms = 50 }}\n\
         [fetch]\nroot = {:?}\n[sink.parquet]\ndir = {:?}\n",
        std::fs::canonicalize(&args.model.model)?
            .display()
            .to_string(),
        args.model.variant.to_string(),
        manifest.display().to_string(),
        (bs * 4).max(64),
        std::fs::canonicalize(&args.image_dir)?
            .display()
            .to_string(),
        dir.join("out").display().to_string(),
    );
    let mut cfg = clipstream_pipeline::config::PipelineConfig::from_toml(&toml, &dir, |_| None)
        .map_err(|p| anyhow::anyhow!("bench pipeline config: {p:?}"))?;
    cfg.runtime = args.model.runtime.options();
    cfg.image.limits = args.images.limits();
    cfg.image.mode = args.images.image_mode;
    let parts = super::run::components(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let stats = std::sync::Arc::new(clipstream_pipeline::stats::Stats::default());
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let t = Instant::now();
    let report = rt.block_on(clipstream_pipeline::engine::run(
        &cfg,
        parts,
        stop_rx,
        stats.clone(),
    ))?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        report.images as usize == args.pipeline_records,
        "pipeline encoded {} of {} images",
        report.images,
        args.pipeline_records
    );
    let _ = std::fs::remove_dir_all(&dir);
    let vision = clipstream_pipeline::stats::Tower::Vision;
    let (busy, batches) = stats.encoder.inference_total(vision);
    println!(
        "pipeline: {:.1} s, the vision tower busy {:.1} s ({:.0}%) in {batches} batches ({:.1} images/s while busy); \
         its runs took {:.2} host CPU-ms per image",
        secs,
        busy,
        100.0 * busy / secs,
        report.images as f64 / busy,
        1000.0 * stats.encoder.cpu_seconds(vision) / report.images.max(1) as f64
    );
    Ok(report.images as f64 / secs)
}

/// Lists the images of `dir`, writing 64 synthetic 640x480 JPEGs
/// (progressive, quality 88) first if there are none.
fn ensure_images(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let files = list_images(dir);
    if !files.is_empty() {
        return Ok(files);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (w, h) = (640usize, 480usize);
    let mut rand = common::xorshift(0x9E37_79B9_7F4A_7C15);
    for k in 0..64 {
        let rgb = corpus::photo(w, h, &mut rand);
        let jpeg = corpus::encode_jpeg(&rgb, w, h, 88.0, true)?;
        std::fs::write(dir.join(format!("bench-{k:03}.jpg")), jpeg)?;
    }
    Ok(list_images(dir))
}
