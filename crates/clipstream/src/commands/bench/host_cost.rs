//! `clipstream bench --host-cost`: what the host spends per record outside
//! the model, the figure that decides how many cores keep one GPU fed.
//!
//! CPU time is user + system time of every thread (`getrusage`), divided by
//! records. With the bundled tiny model, whose inference is negligible, the
//! figure is the host's own cost: fetch, decode, resize, normalise,
//! tokenise, batch assembly and output. "Cores per GPU" is how many of them
//! a GPU encoding 10,000 records/s needs at that cost (CPU-ms × 10).
//!
//! Everything is measured in the same run, side by side: the decode floor
//! (libjpeg-turbo alone), exact preprocessing with and without the SIMD
//! resize, the local job, and, when `--python` names an interpreter with
//! Pillow and transformers, the Python peers on the same files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clipstream_model::ClipModel;
use clipstream_model::preprocess::{ImageMode, ImagePreprocessor, buffers, decode, resample};

use super::common::{BenchArgs, Part, interleaved};
use super::corpus;

/// CPU seconds (user + system) used so far by `who`.
fn cpu_seconds(who: libc::c_int) -> f64 {
    super::common::usage(who).0
}

/// One line of the table.
struct Row {
    name: String,
    /// Items per second (wall time).
    rate: f64,
    unit: &'static str,
    /// Host CPU milliseconds per item (all threads).
    cpu_ms: f64,
    /// Of `cpu_ms`, the model's runs (ONNX Runtime's threads and the
    /// encoder threads inside `run`), for the local jobs.
    model_ms: Option<f64>,
    n: usize,
    note: String,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let corpus = corpus::ensure(&args.corpus)?;
    let mut model = ClipModel::load(
        &args.model.model,
        &args.model.variant,
        &args.model.runtime.options(),
    )?;
    model.preprocessor.limits = args.images.limits();
    let pre = model.preprocessor.clone();
    let mut rows = Vec::new();

    let small = read_all(&corpus.jpeg_small)?;
    let large = read_all(&corpus.jpeg_large)?;
    let s = args.seconds;
    let mut fast = model.preprocessor.clone();
    fast.mode = ImageMode::Fast;

    // Each size's parts are timed item by item in turn (see `interleaved`),
    // so that the ratios in the notes compare like with like.
    // 640x480: decode alone (the floor of exact output), exact
    // preprocessing, fast mode.
    let small_parts = interleaved(
        s,
        &mut [
            &mut |i| {
                let d = std::hint::black_box(pre.decode(&small[i % small.len()])?);
                // As preprocessing does: the pixel buffer is reused.
                buffers::give_bytes(d.rgb.data);
                Ok(())
            },
            &mut prep_step(&pre, &small),
            &mut prep_step(&fast, &small),
        ],
    )?;
    // 1600x1200: decoded whole, and at the smallest DCT scale (1/8), where
    // little is left but the entropy decoding every scale pays: the floor
    // of what a reduced-scale decode (fast mode) can cost; then exact
    // preprocessing and fast mode.
    let decode_step = |cover: Option<(usize, usize)>| {
        let (large, limits) = (&large, &pre.limits);
        move |i: usize| -> anyhow::Result<()> {
            let bytes = &large[i % large.len()];
            let d = decode::decode_reduced(bytes, limits, false, &|_, _| cover)?;
            buffers::give_bytes(std::hint::black_box(d).rgb.data);
            Ok(())
        }
    };
    let large_parts = interleaved(
        s,
        &mut [
            &mut decode_step(None),
            &mut decode_step(Some((1, 1))),
            &mut prep_step(&pre, &large),
            &mut prep_step(&fast, &large),
        ],
    )?;
    let row = |name: String, (rate, cpu_ms, n): Part, note: String| Row {
        name,
        rate,
        unit: "images/s",
        cpu_ms,
        model_ms: None,
        n,
        note,
    };
    let [floor, exact_small, fast_small] = small_parts;
    let [whole_large, eighth_large, exact_large, fast_large] = large_parts;
    // The scalar resize (before) on its own: taken in turn with the others,
    // its buffers and caches slowed the parts after it by a tenth.
    resample::set_simd(false);
    let [scalar_small] = interleaved(s, &mut [&mut prep_step(&pre, &small)])?;
    let [scalar_large] = interleaved(s, &mut [&mut prep_step(&pre, &large)])?;
    resample::set_simd(true);
    let simd_note = format!(
        "SIMD decoder {}",
        if cfg!(feature = "jpeg-simd") {
            "built in (`jpeg-simd`; on when nasm was found at build time)"
        } else {
            "not built (`jpeg-simd` off)"
        }
    );
    // Ratios of CPU per image, taken in turn.
    let of_floor = |p: Part| format!("{:.2} x the decode floor (CPU per image)", floor.1 / p.1);
    let of_exact = |p: Part, exact: Part| format!("{:.2} x exact (CPU per image)", exact.1 / p.1);
    rows.push(row(
        "JPEG decode alone, 640x480 (libjpeg-turbo)".into(),
        floor,
        simd_note,
    ));
    rows.push(row(
        "JPEG decode, 1600x1200, whole".into(),
        whole_large,
        String::new(),
    ));
    rows.push(row(
        "JPEG decode, 1600x1200, at 1/8 DCT scale: the entropy-decoding floor".into(),
        eighth_large,
        String::new(),
    ));
    rows.push(row(
        "exact preprocess, 640x480 JPEG (scalar resize, before)".into(),
        scalar_small,
        "timed on its own, after the others".into(),
    ));
    rows.push(row(
        "exact preprocess, 1600x1200 JPEG (scalar resize, before)".into(),
        scalar_large,
        "timed on its own, after the others".into(),
    ));
    rows.push(row(
        "exact preprocess, 640x480 JPEG (default)".into(),
        exact_small,
        of_floor(exact_small),
    ));
    rows.push(row(
        "exact preprocess, 1600x1200 JPEG (default)".into(),
        exact_large,
        String::new(),
    ));
    rows.push(row(
        "fast preprocess, 640x480 JPEG (`[image] mode = \"fast\"`)".into(),
        fast_small,
        of_exact(fast_small, exact_small),
    ));
    rows.push(row(
        "fast preprocess, 1600x1200 JPEG (`[image] mode = \"fast\"`)".into(),
        fast_large,
        of_exact(fast_large, exact_large),
    ));
    drop(model);

    let records = args.host_cost_records;
    let mut before = args.model.runtime.options();
    before.spinning = true;
    use clipstream_model::encoder::PixelInput::{Float, Uint8};
    let all = corpus.all();
    let opts = || args.model.runtime.options();
    let jobs = [
        ("exact", &all, opts(), ImageMode::Exact, Float),
        (
            "exact, uint8 model input",
            &all,
            opts(),
            ImageMode::Exact,
            Uint8,
        ),
        ("fast", &all, opts(), ImageMode::Fast, Float),
        (
            "fast, uint8 model input",
            &all,
            opts(),
            ImageMode::Fast,
            Uint8,
        ),
        (
            "exact, 640x480 JPEGs only",
            &corpus.jpeg_small,
            opts(),
            ImageMode::Exact,
            Float,
        ),
        (
            "fast, 640x480 JPEGs only",
            &corpus.jpeg_small,
            opts(),
            ImageMode::Fast,
            Float,
        ),
        (
            "exact, ORT threads spinning: the old default",
            &all,
            before,
            ImageMode::Exact,
            Float,
        ),
    ];
    for (label, files, runtime, mode, input) in jobs {
        let job = local_job(args, files, records, runtime, mode, input)?;
        rows.push(Row {
            name: format!("local job, {label}"),
            rate: job.records as f64 / job.wall,
            unit: "records/s",
            cpu_ms: 1000.0 * job.cpu / job.records as f64,
            model_ms: Some(1000.0 * job.model_cpu / job.records as f64),
            n: job.records,
            note: job.threads,
        });
    }

    match &args.python {
        Some(py) => rows.extend(python_peers(py, &corpus.jpeg_small, s)?),
        None => eprintln!(
            "(Python peers skipped: pass --python PATH, an interpreter with Pillow and transformers)"
        ),
    }

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "host cost per record, model {}, {cores} cores; corpus {} ({} + {} + {} files)",
        args.model.model.display(),
        args.corpus.display(),
        corpus.jpeg_small.len(),
        corpus.jpeg_large.len(),
        corpus.png.len()
    );
    println!(
        "{:<64} {:>10} {:<10} {:>11} {:>13} {:>9} {:>9}  note",
        "part", "rate", "", "CPU-ms/item", "cores/GPU@10k", "of which", "outside"
    );
    println!(
        "{:<64} {:>10} {:<10} {:>11} {:>13} {:>9} {:>9}",
        "", "", "", "", "", "model", "model"
    );
    let or_dash = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for r in &rows {
        println!(
            "{:<64} {:>10.1} {:<10} {:>11.2} {:>13.1} {:>9} {:>9}  {}",
            r.name,
            r.rate,
            r.unit,
            r.cpu_ms,
            r.cpu_ms * 10.0,
            or_dash(r.model_ms),
            or_dash(r.model_ms.map(|m| r.cpu_ms - m)),
            r.note
        );
    }
    println!(
        "(model: the host CPU time of the towers' ONNX Runtime runs, the inference itself on the \
         CPU provider; outside model: the rest, decode, resize, batches, output)"
    );
    for r in &rows {
        let key: String = r
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect::<String>()
            .split('_')
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join("_")
            .to_lowercase();
        let model = r
            .model_ms
            .map_or(String::new(), |m| format!(" model_cpu_ms={m:.3}"));
        println!(
            "bench host_cost.{key} per_s={:.2} cpu_ms={:.3}{model} n={}",
            r.rate, r.cpu_ms, r.n
        );
    }
    Ok(())
}

/// A step for [`interleaved`]: `pre` preprocesses item `i` of `files`
/// (round robin) into a buffer of its own.
fn prep_step<'a>(
    pre: &'a ImagePreprocessor,
    files: &'a [Vec<u8>],
) -> impl FnMut(usize) -> anyhow::Result<()> + 'a {
    let mut out = vec![0f32; pre.pixels_len()];
    move |i| Ok(pre.preprocess_into(&files[i % files.len()], &mut out)?)
}

fn read_all(files: &[PathBuf]) -> anyhow::Result<Vec<Vec<u8>>> {
    files
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect()
}

struct Job {
    records: usize,
    wall: f64,
    cpu: f64,
    /// CPU seconds of the towers' runs, within `cpu`.
    model_cpu: f64,
    threads: String,
}

/// `clipstream run` with default engine settings on `records` events over
/// `files` (round robin; a caption on every other record), measured
/// from the start of the engine to its report (model loaded beforehand).
/// The note says how ONNX Runtime's threads were set.
fn local_job(
    args: &BenchArgs,
    files: &[PathBuf],
    records: usize,
    runtime: clipstream_model::RuntimeOptions,
    mode: ImageMode,
    model_input: clipstream_model::encoder::PixelInput,
) -> anyhow::Result<Job> {
    use std::io::Write;
    let dir = std::env::temp_dir().join(format!("clipstream-host-cost-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let manifest = dir.join("events.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&manifest)?);
    for i in 0..records {
        let p = std::fs::canonicalize(&files[i % files.len()])?;
        let mut ev = serde_json::json!({"id": format!("r{i}"), "image": p.display().to_string()});
        if i % 2 == 0 {
            ev["text"] = format!(
                "a photo of a {} {} on a {} background, item {i}",
                super::common::COLOURS[i % 6],
                super::common::SHAPES[i % 4],
                super::common::COLOURS[(i + 3) % 6]
            )
            .into();
        }
        writeln!(f, "{ev}")?;
    }
    f.flush()?;
    let toml = format!(
        "[model]\ndir = {:?}\nvariant = {:?}\n[source]\nkind = \"files\"\nmanifest = {:?}\n\
         [fetch]\nroot = {:?}\n[sink.parquet]\ndir = {:?}\n",
        std::fs::canonicalize(&args.model.model)?
            .display()
            .to_string(),
        args.model.variant.to_string(),
        manifest.display().to_string(),
        std::fs::canonicalize(&args.corpus)?.display().to_string(),
        dir.join("out").display().to_string(),
    );
    let mut cfg = clipstream_pipeline::config::PipelineConfig::from_toml(&toml, &dir, |_| None)
        .map_err(|p| anyhow::anyhow!("bench pipeline config: {p:?}"))?;
    cfg.runtime = runtime;
    cfg.image.limits = args.images.limits();
    cfg.image.mode = mode;
    cfg.image.model_input = model_input;
    let threads = format!(
        "{records} records over {} files, captions on half; ORT intra threads {}, spinning {}",
        files.len(),
        cfg.runtime
            .intra_threads_for("cpu")
            .map_or("ORT's default".to_string(), |n| n.to_string()),
        if cfg.runtime.spinning { "on" } else { "off" }
    );
    let parts = crate::commands::run::components(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let stats = std::sync::Arc::new(clipstream_pipeline::stats::Stats::default());
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (t, cpu) = (Instant::now(), cpu_seconds(libc::RUSAGE_SELF));
    let report = rt.block_on(clipstream_pipeline::engine::run(
        &cfg,
        parts,
        stop_rx,
        std::sync::Arc::clone(&stats),
    ))?;
    let (wall, cpu) = (
        t.elapsed().as_secs_f64(),
        cpu_seconds(libc::RUSAGE_SELF) - cpu,
    );
    anyhow::ensure!(
        report.images as usize == records,
        "the job encoded {} of {records} images ({} dead letters, in {})",
        report.images,
        report.dead_letters,
        report.dead_letters_to
    );
    let _ = std::fs::remove_dir_all(&dir);
    use clipstream_pipeline::stats::Tower;
    // From each tower's first batch on (its load's runs are not counted).
    let model_cpu =
        stats.encoder.cpu_seconds(Tower::Vision) + stats.encoder.cpu_seconds(Tower::Text);
    Ok(Job {
        records,
        wall,
        cpu,
        model_cpu,
        threads,
    })
}

/// Runs `scripts/bench_hf_preprocess.py` (Pillow decode alone, then
/// transformers' processors) on `files`' folder with `python`.
fn python_peers(python: &Path, files: &[PathBuf], seconds: f64) -> anyhow::Result<Vec<Row>> {
    let script = Path::new("scripts/bench_hf_preprocess.py");
    anyhow::ensure!(
        script.is_file(),
        "{} not found: run the benchmark from the clipstream checkout",
        script.display()
    );
    let dir = files
        .first()
        .and_then(|p| p.parent())
        .context("no images for the Python peers")?;
    let out = std::process::Command::new(python)
        .arg(script)
        .arg("--images")
        .arg(dir)
        .arg("--seconds")
        .arg(format!("{seconds}"))
        .output()
        .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rows = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // peer <name> images_per_s=<f> cpu_ms=<f> n=<n> <description...>
        let mut w = line.split_whitespace();
        if w.next() != Some("peer") {
            continue;
        }
        let name = w.next().unwrap_or_default().to_string();
        let mut field = |key: &str| -> anyhow::Result<f64> {
            let v = w
                .next()
                .and_then(|kv| kv.strip_prefix(key))
                .with_context(|| format!("bad peer line {line:?}"))?;
            Ok(v.parse()?)
        };
        let (rate, cpu_ms, n) = (field("images_per_s=")?, field("cpu_ms=")?, field("n=")?);
        let what: Vec<&str> = w.collect();
        rows.push(Row {
            name: format!("python: {}", what.join(" ")),
            rate,
            unit: "images/s",
            cpu_ms,
            model_ms: None,
            n: n as usize,
            note: name,
        });
    }
    Ok(rows)
}
