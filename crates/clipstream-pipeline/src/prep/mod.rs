//! The CPU stage: decode and preprocess images, tokenize texts, on a pool of
//! dedicated threads (never on the async runtime). A record that passes is
//! split into one job per tower ([`crate::assemble`]: the tower that
//! finishes last builds the row).

pub mod config;
pub mod metrics;

use std::sync::Arc;

use clipstream_model::encoder::PixelInput;
use clipstream_model::{ClipTokenizer, ImageError, ImagePreprocessor};

pub use self::config::ImageConfig;
pub use self::metrics::PrepMetrics;
use crate::assemble::{InFlight, Pixels, TextJob, VisionJob};
use crate::dead_letter::{Kind, Stage};
use crate::fetch::Fetched;
use crate::record::Done;
use crate::stats::Stats;

/// Everything one prep thread needs.
#[derive(Debug, Clone)]
pub struct PrepContext {
    /// Image preprocessing.
    pub preprocessor: ImagePreprocessor,
    /// What the vision tower takes.
    pub pixel_input: PixelInput,
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

/// Decodes and preprocesses an image into the form its tower takes.
fn preprocess(ctx: &PrepContext, bytes: &[u8]) -> Result<Pixels, ImageError> {
    match ctx.pixel_input {
        PixelInput::Float => ctx.preprocessor.preprocess(bytes).map(Pixels::Float),
        PixelInput::Uint8 => ctx.preprocessor.preprocess_bytes(bytes).map(Pixels::Bytes),
    }
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
        Some(b) => match preprocess(ctx, b).inspect(|_| {
            ctx.stats.prep.decoded(started.elapsed());
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
                ctx.stats.prep.tokenized(tokenize_started.elapsed());
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
    let rec = Arc::new(InFlight::new(record, etag, remaining));
    if let Some(pixels) = pixels
        && ctx
            .vision
            .send(VisionJob {
                rec: Arc::clone(&rec),
                memory: ctx.budget.charge(pixels.memory()),
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
