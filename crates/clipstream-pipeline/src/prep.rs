//! The CPU stage: decode and preprocess images, tokenize texts, on a pool of
//! dedicated threads (never on the async runtime). A record that passes is
//! split into one job per tower; the tower that finishes last assembles the
//! row (zero-shot labels, clip score) and hands it to the sinks.

use std::sync::{Arc, Mutex};

use clipstream_model::encoder::dot;
use clipstream_model::{ClipTokenizer, ImagePreprocessor, ZeroShotHead};

use crate::dead_letter::{Kind, Stage};
use crate::fetch::Fetched;
use crate::record::{Done, OutputRow, Record};
use crate::stats::Stats;

/// A record whose towers are running.
#[derive(Debug)]
pub struct InFlight {
    state: Mutex<State>,
    /// When its parts were queued for the towers.
    pub queued: std::time::Instant,
}

#[derive(Debug)]
struct State {
    record: Option<Record>,
    etag: Option<String>,
    image: Option<Vec<f32>>,
    text: Option<Vec<f32>>,
    remaining: u8,
}

/// Which tower produced an embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Vision tower.
    Image,
    /// Text tower.
    Text,
}

/// An image waiting for the vision tower.
#[derive(Debug)]
pub struct VisionJob {
    /// Its record.
    pub rec: Arc<InFlight>,
    /// `[3, H, W]` pixel values.
    pub pixels: Vec<f32>,
    /// The pixels' charge against the memory budget.
    pub memory: crate::budget::Charge,
}

impl Drop for VisionJob {
    /// The pixel buffer goes back for the next image (mapping a fresh one
    /// per image costs page faults; see `preprocess::buffers`).
    fn drop(&mut self) {
        clipstream_model::preprocess::buffers::give_pixels(std::mem::take(&mut self.pixels));
    }
}

/// A text waiting for the text tower.
#[derive(Debug)]
pub struct TextJob {
    /// Its record.
    pub rec: Arc<InFlight>,
    /// Token ids, padded.
    pub ids: Vec<i64>,
    /// Attention mask.
    pub mask: Vec<i64>,
}

/// What the last tower of a record needs to build its row.
#[derive(Debug, Clone)]
pub struct Assembler {
    /// Zero-shot head, if a label set is configured.
    pub head: Option<Arc<ZeroShotHead>>,
    /// Labels per image.
    pub top_k: usize,
    /// Embedding width (for a row's size).
    pub dim: usize,
    /// The sinks.
    pub done: flume::Sender<Done>,
    /// Counters.
    pub stats: Arc<Stats>,
}

impl Assembler {
    /// Records one tower's embedding; builds and sends the row when it was
    /// the last one. Returns false when the sinks are gone.
    pub fn part_done(&self, rec: &InFlight, part: Part, embedding: Vec<f32>) -> bool {
        let mut st = rec.state.lock().unwrap_or_else(|e| e.into_inner());
        match part {
            Part::Image => st.image = Some(embedding),
            Part::Text => st.text = Some(embedding),
        }
        st.remaining -= 1;
        if st.remaining > 0 {
            return true;
        }
        let Some(record) = st.record.take() else {
            return true;
        };
        let (image, text, etag) = (st.image.take(), st.text.take(), st.etag.take());
        drop(st);
        let labels = match (&self.head, &image) {
            (Some(h), Some(img)) => {
                let top = h.top_k(img, self.top_k);
                if let Some(best) = top.first() {
                    self.stats.top1(&best.label);
                }
                Some(top)
            }
            _ => None,
        };
        let clip_score = match (&image, &text) {
            (Some(i), Some(t)) => Some(dot(i, t)),
            _ => None,
        };
        // The event's strings move into the row (the original bytes stay
        // in the origin, for a dead letter).
        let event = record.event;
        let row = OutputRow {
            id: event.id,
            source: Arc::clone(&record.origin.partition.source),
            partition: record.origin.partition.partition,
            offset: record.origin.position.offset,
            image_uri: event.image,
            image_etag: etag,
            text: event.text,
            attributes: event
                .attributes
                .map(|a| serde_json::Value::Object(a).to_string()),
            image_embedding: image,
            text_embedding: text,
            labels,
            clip_score,
            event_time_ms: record.origin.event_time_ms,
            processed_at_ms: now_ms(),
        };
        // The event's share of the charge moves to the row.
        let mut permit = record.permit;
        permit.memory.shrink(record.origin.raw.len() as u64);
        permit
            .memory
            .grow(crate::sink::parquet::estimated_bytes(&row, self.dim));
        self.done
            .send(Done::Row {
                row,
                origin: record.origin,
                ack: record.ack,
                permit,
            })
            .is_ok()
    }
}

impl Assembler {
    /// The tower failed on this record's input (and works on others): the
    /// record becomes a dead letter, whatever its other tower does. False
    /// when the sinks are gone.
    pub fn part_failed(&self, rec: &InFlight, reason: String) -> bool {
        let mut st = rec.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(record) = st.record.take() else {
            return true;
        };
        drop(st);
        self.done
            .send(record.dead(Stage::Encode, Kind::EncodeFailed, reason))
            .is_ok()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Everything one prep thread needs.
#[derive(Debug, Clone)]
pub struct PrepContext {
    /// Image preprocessing.
    pub preprocessor: ImagePreprocessor,
    /// Tokenizer.
    pub tokenizer: ClipTokenizer,
    /// Jobs for the vision tower.
    pub vision: flume::Sender<VisionJob>,
    /// Jobs for the text tower.
    pub text: flume::Sender<TextJob>,
    /// Dead letters.
    pub done: flume::Sender<Done>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// The memory budget (decoded images and model inputs are charged).
    pub budget: Arc<crate::budget::Budget>,
}

/// Runs `threads` prep threads until `rx` closes.
pub fn spawn_threads(
    threads: usize,
    rx: flume::Receiver<Fetched>,
    ctx: PrepContext,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..threads)
        .map(|i| {
            let (rx, ctx) = (rx.clone(), ctx.clone());
            std::thread::Builder::new()
                .name(format!("prep-{i}"))
                .spawn(move || {
                    for f in rx.iter() {
                        if !prepare(f, &ctx) {
                            break;
                        }
                    }
                })
                .expect("spawning a prep thread")
        })
        .collect()
}

/// Prepares one record; false when downstream is gone.
fn prepare(f: Fetched, ctx: &PrepContext) -> bool {
    let Fetched {
        record,
        bytes,
        etag,
        memory,
    } = f;
    let started = std::time::Instant::now();
    // The decoded image, while it exists (RGB plus the resize's rows; a
    // header that cannot be read costs nothing here: the decoder refuses
    // the image).
    let decoding = bytes
        .as_deref()
        .and_then(clipstream_model::preprocess::decode::dimensions)
        .map(|(w, h)| {
            let pixels = (u64::from(w) * u64::from(h)).min(ctx.preprocessor.limits.max_pixels);
            ctx.budget.charge(pixels * 4)
        });
    let pixels = match &bytes {
        Some(b) => match ctx.preprocessor.preprocess(b).inspect(|_| {
            ctx.stats
                .decode_seconds
                .observe(started.elapsed().as_secs_f64());
        }) {
            Ok(p) => Some(p),
            Err(e) => {
                let kind = Kind::of_image_error(&e);
                return ctx
                    .done
                    .send(record.dead(Stage::Decode, kind, e.to_string()))
                    .is_ok();
            }
        },
        None => None,
    };
    drop((bytes, memory, decoding));
    let tokenize_started = std::time::Instant::now();
    let tokens = match &record.event.text {
        // A panic in the tokenizer is this text's fault as far as the
        // pipeline is concerned: a dead letter, and the thread goes on.
        Some(t) => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ctx.tokenizer.encode_batch(&[t.as_str()])
        }))
        .unwrap_or_else(|p| {
            Err(clipstream_model::ModelError::Tokenizer(format!(
                "the tokenizer failed: {}",
                clipstream_model::preprocess::decode::panic_message(p.as_ref())
            )))
        }) {
            Ok(b) => {
                ctx.stats
                    .tokenize_seconds
                    .observe(tokenize_started.elapsed().as_secs_f64());
                Some((b.input_ids, b.attention_mask))
            }
            Err(e) => {
                return ctx
                    .done
                    .send(record.dead(Stage::Tokenize, Kind::InvalidText, e.to_string()))
                    .is_ok();
            }
        },
        None => None,
    };
    let remaining = u8::from(pixels.is_some()) + u8::from(tokens.is_some());
    let rec = Arc::new(InFlight {
        queued: std::time::Instant::now(),
        state: Mutex::new(State {
            record: Some(record),
            etag,
            image: None,
            text: None,
            remaining,
        }),
    });
    if let Some(pixels) = pixels
        && ctx
            .vision
            .send(VisionJob {
                rec: Arc::clone(&rec),
                memory: ctx.budget.charge(4 * pixels.len() as u64),
                pixels,
            })
            .is_err()
    {
        return false;
    }
    if let Some((ids, mask)) = tokens
        && ctx.text.send(TextJob { rec, ids, mask }).is_err()
    {
        return false;
    }
    true
}
