//! `clipstream bench --messages`: the two formats of the embeddings topic's
//! messages (`[sink.kafka] embeddings_format`), side by side in one run:
//! bytes per message and host CPU per message, on rows like a ViT-B/32
//! fleet writes (512-d image and text vectors, a caption, attributes).

use std::sync::Arc;
use std::time::Instant;

use clipstream_pipeline::record::OutputRow;
use clipstream_pipeline::sink::kafka::config::EmbeddingsFormat;
use clipstream_pipeline::sink::kafka::message::embeddings_message;

use super::common::BenchArgs;

/// Width of the vectors (ViT-B/32's).
const DIM: usize = 512;

/// Rows like a catalog's: a unit image vector, a text vector on half.
fn rows(n: usize) -> Vec<OutputRow> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32 - 0.5
    };
    let unit = |next: &mut dyn FnMut() -> f32| {
        let v: Vec<f32> = (0..DIM).map(|_| next()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / norm).collect::<Vec<f32>>()
    };
    (0..n)
        .map(|k| OutputRow {
            id: format!("sku-{k:08}"),
            source: Arc::from("catalog-events"),
            partition: (k % 12) as i32,
            offset: k as i64,
            image_uri: Some(format!("s3://catalog-images/products/{k:08}/main.jpg")),
            image_etag: Some(format!("\"{:032x}\"", k * 7919)),
            text: (k % 2 == 0).then(|| format!("Product {k}: a red leather shoe, size 42")),
            attributes: Some(format!(r#"{{"brand":"acme","category":"shoes","k":{k}}}"#)),
            image_embedding: Some(unit(&mut next)),
            text_embedding: (k % 2 == 0).then(|| unit(&mut next)),
            labels: None,
            clip_score: (k % 2 == 0).then_some(0.27),
            needs_review: None,
            review_reason: None,
            event_time_ms: Some(1_764_633_600_000 + k as i64),
            processed_at_ms: 1_764_633_900_000 + k as i64,
        })
        .collect()
}

/// Encodes `rows` in `format` for `seconds` on this one thread; (µs of
/// wall time per message, bytes per message). One busy thread: on an idle
/// machine its wall time is its CPU time.
fn measure(
    rows: &[OutputRow],
    format: EmbeddingsFormat,
    seconds: f64,
) -> anyhow::Result<(f64, f64)> {
    let (mut n, mut bytes) = (0usize, 0usize);
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        for r in rows {
            bytes += embeddings_message(r, "openai/clip-vit-base-patch32", format)
                .map_err(|e| anyhow::anyhow!(e))?
                .len();
            n += 1;
        }
    }
    Ok((
        start.elapsed().as_secs_f64() * 1e6 / n as f64,
        bytes as f64 / n as f64,
    ))
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let rows = rows(1_000);
    let seconds = args.seconds / 2.0;
    // Alternated, twice each, so that both see the same machine.
    let mut json = Vec::new();
    let mut f32le = Vec::new();
    for _ in 0..2 {
        json.push(measure(&rows, EmbeddingsFormat::Json, seconds / 2.0)?);
        f32le.push(measure(&rows, EmbeddingsFormat::F32le, seconds / 2.0)?);
    }
    let best = |v: &[(f64, f64)]| {
        v.iter()
            .copied()
            .fold((f64::MAX, 0.0), |a, b| (a.0.min(b.0), b.1))
    };
    let (j, f) = (best(&json), best(&f32le));
    println!(
        "embeddings messages, {DIM}-d vectors (text on half the rows), 1 core, best of 2 runs each:"
    );
    println!(
        "{:<8} {:>12} {:>14}",
        "format", "bytes/msg", "µs/msg (wall)"
    );
    println!("{:<8} {:>12.0} {:>14.2}", "json", j.1, j.0);
    println!("{:<8} {:>12.0} {:>14.2}", "f32le", f.1, f.0);
    println!(
        "f32le: {:.2}x fewer bytes, {:.1}x less CPU per message",
        j.1 / f.1,
        j.0 / f.0
    );
    println!(
        "bench messages json_us={:.2} f32le_us={:.2} json_bytes={:.0} f32le_bytes={:.0}",
        j.0, f.0, j.1, f.1
    );
    Ok(())
}
