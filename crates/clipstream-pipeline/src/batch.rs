//! Dynamic batching and the encoders. Per tower: a batcher thread collects
//! jobs until the batch is full or its first job has waited `max_wait`, and
//! hands the batch over a channel of capacity one to the encoder thread,
//! which owns the ONNX Runtime session. So the next batch is assembled
//! while the current one runs, and no more than one batch waits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use clipstream_model::tokenize::TokenBatch;
use clipstream_model::{EmbeddingBatch, ModelError, TextEncoder, VisionEncoder};

use crate::config::BatchConfig;
use crate::prep::{Assembler, InFlight, Part, TextJob, VisionJob};
use crate::stats::Stats;

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

/// Set when a tower fails: the pipeline stops and reports it.
#[derive(Debug, Default)]
pub struct Fatal {
    failed: AtomicBool,
    message: std::sync::Mutex<Option<String>>,
}

impl Fatal {
    /// Records the first fatal error.
    pub fn set(&self, message: String) {
        let mut m = self.message.lock().unwrap_or_else(|e| e.into_inner());
        if m.is_none() {
            tracing::error!(%message, "pipeline failed");
            *m = Some(message);
        }
        self.failed.store(true, Ordering::Release);
    }

    /// True once a fatal error happened.
    pub fn is_set(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The first fatal error.
    pub fn message(&self) -> Option<String> {
        self.message
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Counts a tower's batch and hands each embedding to the assembler; a
/// failed batch is fatal. False when the encoder thread must stop.
fn finish_batch<'a>(
    asm: &Assembler,
    fatal: &Fatal,
    part: Part,
    recs: impl ExactSizeIterator<Item = &'a Arc<InFlight>>,
    result: Result<EmbeddingBatch, ModelError>,
    started: Instant,
) -> bool {
    let (tower, encoded) = match part {
        Part::Image => ("vision", &asm.stats.images),
        Part::Text => ("text", &asm.stats.texts),
    };
    let e = match result {
        Ok(e) => e,
        Err(e) => {
            fatal.set(format!("{tower} tower: {e}"));
            return false;
        }
    };
    asm.stats.batch(tower, recs.len(), started.elapsed());
    Stats::add(encoded, recs.len() as u64);
    let wait = asm.stats.queue_wait_seconds.with_label_values(&[tower]);
    recs.inspect(|rec| wait.observe(started.saturating_duration_since(rec.queued).as_secs_f64()))
        .zip(e.rows())
        .all(|(rec, row)| asm.part_done(rec, part, row.to_vec()))
}

/// Runs the vision tower on batches until `rx` closes or the tower fails.
pub fn vision_encoder(
    mut encoder: VisionEncoder,
    size: (usize, usize),
    rx: flume::Receiver<Vec<VisionJob>>,
    asm: Assembler,
    fatal: Arc<Fatal>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("encode-vision".into())
        .spawn(move || {
            let per = 3 * size.0 * size.1;
            let mut pixels = Vec::new();
            for batch in rx.iter() {
                pixels.clear();
                pixels.reserve(batch.len() * per);
                for j in &batch {
                    pixels.extend_from_slice(&j.pixels);
                }
                let started = Instant::now();
                let result = encoder.embed(&pixels, batch.len(), size);
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
            for batch in rx.iter() {
                let tokens = TokenBatch {
                    len: batch.len(),
                    max_len,
                    input_ids: batch.iter().flat_map(|j| j.ids.iter().copied()).collect(),
                    attention_mask: batch.iter().flat_map(|j| j.mask.iter().copied()).collect(),
                };
                let started = Instant::now();
                let result = encoder.embed(&tokens);
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
