//! `clipstream bench --nightly N`: `plan` and `snapshot` at catalog scale.
//!
//! Writes a previous snapshot of N rows (512-d image and text embeddings,
//! in files of 100,000 rows, as `snapshot` writes them) and tonight's
//! catalog of N products with a change-token column, 5% of them changed
//! (2% images, 2% titles, 1% new) and 1% removed; then runs `clipstream
//! plan` and, on a night output of the planned rows, `clipstream snapshot`,
//! each as a child process, and prints wall time, CPU time and peak RSS of
//! each beside the time to copy the previous snapshot's files byte for byte.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clipstream_model::ModelDir;
use clipstream_pipeline::catalog::TOKEN_ATTRIBUTE;
use clipstream_pipeline::record::OutputRow;
use clipstream_pipeline::sink::parquet::FINGERPRINT_KEY;
use clipstream_pipeline::sink::parquet::schema::{schema, to_batch};
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use super::common::BenchArgs;

const DIM: usize = 512;
const ROWS_PER_FILE: usize = 100_000;

/// CPU seconds and peak RSS (KiB) of the finished child processes.
fn children() -> (f64, i64) {
    super::common::usage(libc::RUSAGE_CHILDREN)
}

fn pseudo(i: usize, salt: u64) -> f32 {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt;
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 32;
    // 24 random bits: as incompressible as real embeddings.
    (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

pub(super) fn row(k: usize, token: &str, title: &str, at: i64) -> OutputRow {
    let emb = |salt| (0..DIM).map(|d| pseudo(k * DIM + d, salt)).collect();
    OutputRow {
        id: format!("sku-{k:07}"),
        source: Arc::from("catalog"),
        partition: 0,
        offset: k as i64,
        image_uri: Some(format!("s3://shop/img/{k:07}.jpg")),
        image_etag: None,
        text: Some(title.to_string()),
        attributes: Some(serde_json::json!({ TOKEN_ATTRIBUTE: token }).to_string()),
        image_embedding: Some(emb(1)),
        text_embedding: Some(emb(2)),
        labels: None,
        clip_score: None,
        needs_review: None,
        review_reason: None,
        event_time_ms: None,
        processed_at_ms: at,
    }
}

/// Writes `rows` into Parquet files of `ROWS_PER_FILE` under `dir`.
pub(super) fn write_rows(
    dir: &Path,
    fingerprint: &str,
    rows: impl Iterator<Item = OutputRow>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let schema = schema(DIM);
    let props = || {
        WriterProperties::builder()
            .set_compression(parquet::basic::Compression::ZSTD(
                parquet::basic::ZstdLevel::try_new(3).expect("level"),
            ))
            .set_key_value_metadata(Some(vec![KeyValue::new(
                FINGERPRINT_KEY.to_string(),
                Some(fingerprint.to_string()),
            )]))
            .build()
    };
    let mut writer: Option<ArrowWriter<std::fs::File>> = None;
    let (mut in_file, mut files) = (0, 0);
    let mut batch = Vec::with_capacity(8192);
    let flush = |batch: &mut Vec<OutputRow>,
                 writer: &mut Option<ArrowWriter<std::fs::File>>|
     -> anyhow::Result<()> {
        if let Some(w) = writer {
            w.write(&to_batch(&schema, DIM, "bench", batch)?)?;
        }
        batch.clear();
        Ok(())
    };
    for r in rows {
        if writer.is_none() {
            let f = std::fs::File::create(dir.join(format!("part-bench-{files:05}.parquet")))?;
            writer = Some(ArrowWriter::try_new(f, Arc::clone(&schema), Some(props()))?);
            files += 1;
        }
        batch.push(r);
        in_file += 1;
        if batch.len() == 8192 || in_file == ROWS_PER_FILE {
            flush(&mut batch, &mut writer)?;
        }
        if in_file == ROWS_PER_FILE {
            if let Some(w) = writer.take() {
                w.close()?;
            }
            in_file = 0;
        }
    }
    flush(&mut batch, &mut writer)?;
    if let Some(w) = writer.take() {
        w.close()?;
    }
    Ok(())
}

fn kind(k: usize) -> usize {
    // 0..=1: image changed, 2..=3: title changed, 4: removed, else same.
    k % 100
}

pub fn run(args: &BenchArgs, n: usize) -> anyhow::Result<()> {
    let root = args.nightly_dir.clone();
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let fingerprint = ModelDir::open(&args.model.model)?.fingerprint(&args.model.variant)?;
    let exe = std::env::current_exe()?;

    eprintln!("writing a previous snapshot of {n} rows of {DIM}-d embeddings ...");
    let t = Instant::now();
    let prev = root.join("previous");
    write_rows(
        &prev,
        &fingerprint,
        (0..n).map(|k| row(k, "col:v1", &format!("product number {k}"), 1)),
    )?;
    let gen_secs = t.elapsed().as_secs_f64();

    let catalog = root.join("catalog.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&catalog)?);
    let new = n / 100;
    for k in 0..n + new {
        let (sum, title) = match kind(k) {
            _ if k >= n => ("v1".to_string(), format!("product number {k}")),
            0 | 1 => ("v2".to_string(), format!("product number {k}")),
            2 | 3 => ("v1".to_string(), format!("product number {k}, renamed")),
            4 => continue,
            _ => ("v1".to_string(), format!("product number {k}")),
        };
        writeln!(
            f,
            "{}",
            serde_json::json!({"id": format!("sku-{k:07}"), "image": format!("s3://shop/img/{k:07}.jpg"), "title": title, "sum": sum})
        )?;
    }
    f.flush()?;
    drop(f);

    let night = root.join("night");
    let timed = |what: &str, cmd: &mut std::process::Command| -> anyhow::Result<(f64, f64, i64)> {
        let (cpu0, _) = children();
        let t = Instant::now();
        let out = cmd.output().with_context(|| format!("running {what}"))?;
        let wall = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            out.status.success(),
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (cpu1, maxrss) = children();
        Ok((wall, cpu1 - cpu0, maxrss))
    };
    let (plan_wall, plan_cpu, plan_rss) = timed(
        "clipstream plan",
        std::process::Command::new(&exe)
            .arg("plan")
            .arg("--catalog")
            .arg(&catalog)
            .arg("--model")
            .arg(&args.model.model)
            .arg("--variant")
            .arg(args.model.variant.to_string())
            .arg("--previous")
            .arg(&prev)
            .arg("--night")
            .arg(&night)
            .args(["--text-column", "title", "--change-column", "sum", "--json"]),
    )?;
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(night.join("plan.json"))?)?;
    let planned = summary["planned"].as_u64().unwrap_or(0) as usize;

    // Tonight's output: the planned rows, encoded (synthetically).
    let events = std::fs::read_to_string(night.join("events.jsonl"))?;
    let tonight = events.lines().enumerate().map(|(i, l)| {
        let ev: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
        let id = ev["id"].as_str().unwrap_or_default();
        let k: usize = id.trim_start_matches("sku-").parse().unwrap_or(i);
        let token = ev["attributes"][TOKEN_ATTRIBUTE]
            .as_str()
            .unwrap_or_default();
        let title = ev["text"].as_str().unwrap_or_default();
        row(k, token, title, 2)
    });
    write_rows(&night.join("out"), &fingerprint, tonight)?;

    let snap = root.join("snapshot");
    let (snap_wall, snap_cpu, snap_rss) = timed(
        "clipstream snapshot",
        std::process::Command::new(&exe)
            .arg("snapshot")
            .arg("--night")
            .arg(&night)
            .arg("--output")
            .arg(night.join("out"))
            .arg("--previous")
            .arg(&prev)
            .arg("--out")
            .arg(&snap),
    )?;
    let snap_summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("_snapshot.json"))?)?;

    let copy = root.join("copy");
    std::fs::create_dir_all(&copy)?;
    let t = Instant::now();
    let mut bytes = 0;
    for p in clipstream_pipeline::catalog::parquet_files(&prev)? {
        bytes += std::fs::copy(&p, copy.join(p.file_name().context("name")?))?;
    }
    std::fs::File::open(&copy)?.sync_all()?;
    let copy_secs = t.elapsed().as_secs_f64();

    let gib = |kib: i64| kib as f64 / (1024.0 * 1024.0);
    println!(
        "nightly at scale: {n} products, {DIM}-d embeddings, previous snapshot {:.2} GB (written in {gen_secs:.0} s)",
        bytes as f64 / 1e9
    );
    println!(
        "plan:     {plan_wall:>6.1} s wall, {plan_cpu:>6.1} s CPU, peak RSS {:.2} GiB; {planned} planned of {} products (new {}, image {}, text {}), {} deleted",
        gib(plan_rss),
        summary["products"],
        summary["new"],
        summary["changed_image"],
        summary["changed_text"],
        summary["deleted"]
    );
    println!(
        "snapshot: {snap_wall:>6.1} s wall, {snap_cpu:>6.1} s CPU, peak RSS of plan or snapshot {:.2} GiB; {} rows ({} from tonight, {} carried over)",
        gib(snap_rss),
        snap_summary["rows"],
        snap_summary["from_tonight"],
        snap_summary["carried_over"]
    );
    println!("copying the previous snapshot's files byte for byte: {copy_secs:.1} s");
    println!(
        "bench nightly plan_s={plan_wall:.2} snapshot_s={snap_wall:.2} copy_s={copy_secs:.2} plan_rss_gib={:.3} max_rss_gib={:.3}",
        gib(plan_rss),
        gib(snap_rss)
    );
    if !args.keep_nightly {
        let _ = std::fs::remove_dir_all(&root);
    }
    Ok(())
}
