//! `clipstream bench`: throughput figures for a model on this machine.
//!
//! Prints, for one model and batch size: JPEG decode + preprocessing on one
//! core (images/s), the raw vision session (images/s, pixels prepared
//! beforehand), the raw text session (texts/s), and `embed` end to end
//! (read, decode, preprocess and encode, one thread feeding the session).
//! Figures are printed, never asserted.
//!
//! `--host-cost` prints the host's CPU cost per record instead (see
//! [`host_cost`]).

mod corpus;
mod host_cost;
mod nightly;
mod search;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use clipstream_model::ClipModel;

use crate::cli::{ImageArgs, ModelArgs};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub images: ImageArgs,
    /// Directory of images to use. If it holds no images, 64 synthetic
    /// 640x480 JPEGs are written there first.
    #[arg(long, value_name = "DIR", default_value = ".cache/bench-images")]
    pub image_dir: PathBuf,
    /// Batch size for the sessions.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub batch_size: usize,
    /// Seconds to spend on each measurement (after one warm-up batch).
    #[arg(long, default_value_t = 5.0, value_name = "S", value_parser = crate::cli::positive_seconds)]
    pub seconds: f64,
    /// Only measure these parts (repeatable): preprocess, vision, text,
    /// embed, pipeline.
    #[arg(long = "only", value_name = "PART")]
    pub only: Vec<String>,
    /// Records for the `pipeline` part (`clipstream run` on the images,
    /// round robin, with the same batch size).
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub pipeline_records: usize,
    /// Print the host CPU cost per record instead: decode floor, exact
    /// preprocessing (SIMD resize and scalar, side by side), the local job
    /// on a catalog-like corpus, and the Python peers with `--python`.
    #[arg(long)]
    pub host_cost: bool,
    /// The `--host-cost` corpus: 640x480 and 1600x1200 JPEGs and a few PNGs,
    /// written there first if missing.
    #[arg(long, value_name = "DIR", default_value = ".cache/bench-corpus")]
    pub corpus: PathBuf,
    /// Records for the `--host-cost` local job.
    #[arg(long, default_value_t = 2000, value_name = "N")]
    pub host_cost_records: usize,
    /// A Python with Pillow and transformers (and torchvision for the fast
    /// processor): `--host-cost` then times transformers' preprocessing and
    /// Pillow's decode on the same files (scripts/bench_hf_preprocess.py,
    /// run from the checkout).
    #[arg(long, value_name = "PATH", env = "CLIPSTREAM_BENCH_PYTHON")]
    pub python: Option<PathBuf>,
    /// Time `clipstream plan` and `clipstream snapshot` on a catalog of N
    /// products (5% changed, 1% removed) against a previous snapshot of N
    /// rows of 512-d embeddings, beside copying that snapshot's files.
    #[arg(long, value_name = "N")]
    pub nightly: Option<usize>,
    /// Where `--nightly` writes its data (removed afterwards unless
    /// --keep-nightly; about 4.5 GB per million rows at the peak).
    #[arg(long, value_name = "DIR", default_value = ".cache/bench-nightly")]
    pub nightly_dir: PathBuf,
    /// Keep `--nightly`'s data.
    #[arg(long)]
    pub keep_nightly: bool,
    /// Time an exact `clipstream search` over N rows of 512-d embeddings:
    /// Parquet decoding, a plain read of the decoded floats, and the scan,
    /// side by side (the data goes under --nightly-dir).
    #[arg(long, value_name = "N")]
    pub search: Option<usize>,
}

/// CPU seconds (user + system) used so far by `who` (`RUSAGE_SELF`,
/// `RUSAGE_CHILDREN`, ...), and its peak RSS in KiB.
#[allow(unsafe_code)]
fn usage(who: libc::c_int) -> (f64, i64) {
    // SAFETY: getrusage writes one `rusage` into the zeroed value we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return (f64::NAN, 0);
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (t(ru.ru_utime) + t(ru.ru_stime), ru.ru_maxrss)
}

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
    if want("vision") {
        let (rate, n) = timed(args.seconds, || Ok(model.embed_pixels(&pixels, bs)?.len()))?;
        figures.push(Figure {
            name: "vision session (raw)",
            per_s: rate,
            unit: "images/s",
            n,
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
        let rate = pipeline_rate(&args, &files)?;
        figures.push(Figure {
            name: "pipeline (clipstream run, local files)",
            per_s: rate,
            unit: "images/s",
            n: args.pipeline_records,
        });
    }
    let raw = figures
        .iter()
        .find(|f| f.name.starts_with("vision"))
        .map(|f| f.per_s);
    let pipe = figures
        .iter()
        .find(|f| f.name.starts_with("pipeline"))
        .map(|f| f.per_s);

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
    if let (Some(raw), Some(pipe)) = (raw, pipe) {
        println!("bench pipeline_over_raw_vision ratio={:.3}", pipe / raw);
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
        &cfg, parts, stop_rx, stats,
    ))?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        report.images as usize == args.pipeline_records,
        "pipeline encoded {} of {} images",
        report.images,
        args.pipeline_records
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report.images as f64 / secs)
}

const COLOURS: [&str; 6] = ["red", "green", "blue", "yellow", "purple", "orange"];
const SHAPES: [&str; 4] = ["circle", "square", "triangle", "star"];

fn list_images(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        matches!(
                            e.to_ascii_lowercase().as_str(),
                            "jpg" | "jpeg" | "png" | "webp"
                        )
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
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
    let mut rand = corpus::xorshift(0x9E37_79B9_7F4A_7C15);
    for k in 0..64 {
        let rgb = corpus::photo(w, h, &mut rand);
        let jpeg = corpus::encode_jpeg(&rgb, w, h, 88.0, true)?;
        std::fs::write(dir.join(format!("bench-{k:03}.jpg")), jpeg)?;
    }
    Ok(list_images(dir))
}
