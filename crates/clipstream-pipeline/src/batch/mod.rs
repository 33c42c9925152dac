//! Dynamic batching and the encoders. Per tower: a batcher thread collects
//! jobs until the batch is full or its first job has waited `max_wait`, and
//! hands the batch over a channel of capacity one to the encoder thread,
//! which owns the ONNX Runtime session. So the next batch is assembled
//! while the current one runs, and no more than one batch waits.

pub mod config;
pub mod metrics;

use std::sync::Arc;
use std::time::Instant;

use clipstream_model::encoder::{PixelInput, PixelsMut};
use clipstream_model::tokenize::TokenBatch;
use clipstream_model::{EmbeddingBatch, ModelError, TextEncoder, VisionEncoder};

pub use self::config::BatchConfig;
pub use self::metrics::EncoderMetrics;
use crate::assemble::{Assembler, InFlight, Part, Pixels, TextJob, VisionJob};
use crate::fatal::Fatal;
use crate::stats::{Stats, Tower};

/// Collects jobs from `rx` into batches for `tx`, until `rx` closes.
pub fn batcher<J: Send + 'static>(
    name: &str,
    rx: flume::Receiver<J>,
    tx: flume::Sender<Vec<J>>,
    cfg: BatchConfig,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(format!("batch-{name}"))
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let deadline = Instant::now() + cfg.max_wait();
                let mut batch = Vec::with_capacity(cfg.max_size);
                batch.push(first);
                while batch.len() < cfg.max_size {
                    match rx.recv_deadline(deadline) {
                        Ok(j) => batch.push(j),
                        Err(_) => break,
                    }
                }
                if tx.send(batch).is_err() {
                    break;
                }
            }
        })
        .expect("spawning a batcher thread")
}

/// What a tower made of a batch: one embedding per input, or for an input
/// the tower fails on (while it still works on a neutral input) the reason.
type Outcome = Vec<Result<Vec<f32>, String>>;

/// Runs `embed` on the whole batch; when that fails, finds out whether the
/// inputs or the tower are at fault: each input is run alone, and when one
/// fails alone, a neutral input (`embed(None)`, a probe) is run too. If the
/// probe works, the tower is fine and the inputs that failed alone are at
/// fault (their records become dead letters); if the probe fails, the tower
/// is broken and the error is returned (fatal).
fn encode_isolating<J>(
    jobs: &[J],
    mut embed: impl FnMut(Option<&[&J]>) -> Result<EmbeddingBatch, ModelError>,
) -> Result<Outcome, ModelError> {
    let all: Vec<&J> = jobs.iter().collect();
    let first = match embed(Some(&all)) {
        Ok(e) => return Ok(e.rows().map(<[f32]>::to_vec).map(Ok).collect()),
        Err(e) => e,
    };
    let mut out = Vec::with_capacity(jobs.len());
    let mut any_failed = false;
    for j in jobs {
        match embed(Some(&[j])) {
            Ok(e) => out.push(Ok(e.row(0).to_vec())),
            Err(e) => {
                any_failed = true;
                out.push(Err(e.to_string()));
            }
        }
    }
    if any_failed {
        if let Err(e) = embed(None) {
            tracing::error!(error = %e, batch_error = %first, "the tower fails on a neutral input too");
            return Err(e);
        }
    } else {
        tracing::warn!(error = %first, size = jobs.len(), "a batch failed but each of its inputs worked alone");
    }
    Ok(out)
}

/// Counts a tower's batch and hands each result to the assembler; a broken
/// tower is fatal. False when the encoder thread must stop.
fn finish_batch<'a>(
    asm: &Assembler,
    fatal: &Fatal,
    part: Part,
    recs: impl ExactSizeIterator<Item = &'a Arc<InFlight>>,
    result: Result<Outcome, ModelError>,
    started: Instant,
) -> bool {
    let (tower, encoded) = match part {
        Part::Image => (Tower::Vision, &asm.stats.records.images),
        Part::Text => (Tower::Text, &asm.stats.records.texts),
    };
    let rows = match result {
        Ok(r) => r,
        Err(e) => {
            fatal.set(format!("the {} tower failed: {e}", tower.as_str()));
            return false;
        }
    };
    asm.stats
        .encoder
        .batch(tower, recs.len(), started.elapsed());
    Stats::add(encoded, rows.iter().filter(|r| r.is_ok()).count() as u64);
    let wait = asm.stats.encoder.queue_wait(tower);
    recs.inspect(|rec| wait.observe(started.saturating_duration_since(rec.queued).as_secs_f64()))
        .zip(rows)
        .all(|(rec, row)| match row {
            Ok(row) => asm.part_done(rec, part, row),
            Err(why) => asm.part_failed(
                rec,
                format!("the {} tower fails on this input: {why}", tower.as_str()),
            ),
        })
}

/// Copies the jobs' pixels into the tower's buffer, `per` values each.
fn fill_batch(jobs: &[&VisionJob], buffer: PixelsMut<'_>, per: usize) -> Result<(), ModelError> {
    if per == 0 {
        return Err(ModelError::Ort("the model's input size is empty".into()));
    }
    match buffer {
        PixelsMut::Float(dst) => copy_each(jobs, dst, per, |p| match p {
            Pixels::Float(v) => Some(v),
            Pixels::Bytes(_) => None,
        }),
        PixelsMut::Bytes(dst) => copy_each(jobs, dst, per, |p| match p {
            Pixels::Bytes(v) => Some(v),
            Pixels::Float(_) => None,
        }),
    }
}

/// [`fill_batch`] for one form: `form` gives a job's pixels in it, or
/// `None` when they were preprocessed for the other.
fn copy_each<T: Copy>(
    jobs: &[&VisionJob],
    dst: &mut [T],
    per: usize,
    form: impl Fn(&Pixels) -> Option<&Vec<T>>,
) -> Result<(), ModelError> {
    for (job, dst) in jobs.iter().zip(dst.chunks_exact_mut(per)) {
        let src = form(&job.pixels).ok_or_else(|| {
            ModelError::Ort("an image was preprocessed for another input form".into())
        })?;
        if src.len() != per {
            return Err(ModelError::Ort(format!(
                "an image has {} pixel values; the tower takes {per}",
                src.len()
            )));
        }
        dst.copy_from_slice(src);
    }
    Ok(())
}

/// Runs the vision tower on batches until `rx` closes or the tower fails.
pub fn vision_encoder(
    mut encoder: VisionEncoder,
    size: (usize, usize),
    rx: flume::Receiver<Vec<VisionJob>>,
    asm: Assembler,
    fatal: Arc<Fatal>,
    budget: Arc<crate::budget::Budget>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("encode-vision".into())
        .spawn(move || {
            let per = 3 * size.0 * size.1;
            // Bytes per value of the batch's input and ONNX Runtime's
            // copies of it: floats, and their copy; or bytes, and the
            // edited graph's int32, int32 and float tensors.
            let width = match encoder.pixel_input() {
                PixelInput::Float => 2 * 4,
                PixelInput::Uint8 => 1 + 4 + 4 + 4,
            };
            // What the tower ran before (a load's probes) is not counted.
            let base = encoder.cpu_time();
            for batch in rx.iter() {
                let started = Instant::now();
                let _input = budget.charge(width * (batch.len() * per) as u64);
                let result = encode_isolating(&batch, |jobs| {
                    // Each image is copied once, straight into the tower's
                    // input buffer (pinned host memory on a GPU).
                    let n = jobs.map_or(1, <[&VisionJob]>::len);
                    encoder.embed_filled(n, size, |buffer| {
                        let Some(jobs) = jobs else {
                            // The probe: a neutral image (the mean colour;
                            // mid grey in bytes).
                            match buffer {
                                PixelsMut::Float(dst) => dst.fill(0.0),
                                PixelsMut::Bytes(dst) => dst.fill(128),
                            }
                            return Ok(());
                        };
                        fill_batch(jobs, buffer, per)
                    })
                });
                let cpu = encoder.cpu_time().saturating_sub(base);
                asm.stats.encoder.cpu_time(Tower::Vision, cpu);
                let recs = batch.iter().map(|j| &j.rec);
                if !finish_batch(&asm, &fatal, Part::Image, recs, result, started) {
                    return;
                }
            }
        })
        .expect("spawning the vision encoder")
}

/// Runs the text tower on batches until `rx` closes or the tower fails.
pub fn text_encoder(
    mut encoder: TextEncoder,
    max_len: usize,
    rx: flume::Receiver<Vec<TextJob>>,
    asm: Assembler,
    fatal: Arc<Fatal>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("encode-text".into())
        .spawn(move || {
            // What the tower ran before (the dimension probe, a label
            // set's prompts) is not counted.
            let base = encoder.cpu_time();
            for batch in rx.iter() {
                let started = Instant::now();
                let result = encode_isolating(&batch, |jobs| {
                    let Some(jobs) = jobs else {
                        // The probe: one token.
                        let mut mask = vec![0; max_len];
                        mask[0] = 1;
                        return encoder.embed(&TokenBatch {
                            len: 1,
                            max_len,
                            input_ids: vec![0; max_len],
                            attention_mask: mask,
                        });
                    };
                    encoder.embed(&TokenBatch {
                        len: jobs.len(),
                        max_len,
                        input_ids: jobs.iter().flat_map(|j| j.ids.iter().copied()).collect(),
                        attention_mask: jobs.iter().flat_map(|j| j.mask.iter().copied()).collect(),
                    })
                });
                let cpu = encoder.cpu_time().saturating_sub(base);
                asm.stats.encoder.cpu_time(Tower::Text, cpu);
                let recs = batch.iter().map(|j| &j.rec);
                if !finish_batch(&asm, &fatal, Part::Text, recs, result, started) {
                    return;
                }
            }
        })
        .expect("spawning the text encoder")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A fake tower over numbers: fails on any batch holding a "poison"
    /// value (negative), or on everything when `broken`.
    fn tower(broken: bool) -> impl FnMut(Option<&[&i32]>) -> Result<EmbeddingBatch, ModelError> {
        move |jobs| {
            let values: Vec<i32> = jobs.map_or(vec![0], |j| j.iter().map(|v| **v).collect());
            if broken || values.iter().any(|v| *v < 0) {
                return Err(ModelError::Ort("cannot reshape".into()));
            }
            Ok(EmbeddingBatch {
                dim: 1,
                data: values.iter().map(|v| *v as f32).collect(),
            })
        }
    }

    #[test]
    fn an_input_the_tower_fails_on_is_isolated_and_the_rest_encoded() {
        let out = encode_isolating(&[1, -2, 3], tower(false)).expect("tower works");
        assert_eq!(out[0], Ok(vec![1.0]));
        assert!(out[1].as_ref().is_err_and(|e| e.contains("cannot reshape")));
        assert_eq!(out[2], Ok(vec![3.0]));
        let out = encode_isolating(&[4, 5], tower(false)).expect("tower works");
        assert_eq!(out, vec![Ok(vec![4.0]), Ok(vec![5.0])]);
    }

    #[test]
    fn a_tower_that_fails_on_a_neutral_input_too_is_broken() {
        assert!(encode_isolating(&[1, 2], tower(true)).is_err());
    }

    #[test]
    fn batches_fill_up_or_time_out() {
        let (tx, rx) = flume::bounded(100);
        let (btx, brx) = flume::bounded(1);
        let h = batcher(
            "t",
            rx,
            btx,
            BatchConfig {
                max_size: 4,
                max_wait_ms: 30,
            },
        );
        for i in 0..6 {
            tx.send(i).expect("send");
        }
        assert_eq!(
            brx.recv_timeout(Duration::from_secs(2))
                .expect("full batch"),
            vec![0, 1, 2, 3]
        );
        let t = Instant::now();
        assert_eq!(
            brx.recv_timeout(Duration::from_secs(2))
                .expect("partial batch"),
            vec![4, 5]
        );
        assert!(t.elapsed() < Duration::from_secs(1));
        drop(tx);
        h.join().expect("batcher ends when its input closes");
    }
}
