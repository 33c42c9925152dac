//! A record between the towers: its jobs for the vision and text towers,
//! and the row that the tower finishing last builds (zero-shot labels, clip
//! score) and hands to the sinks. This runs on the encoder threads
//! ([`crate::batch`]); [`crate::prep`] creates the jobs.

use std::sync::{Arc, Mutex};

use clipstream_model::ZeroShotHead;
use clipstream_model::encoder::dot;

use crate::dead_letter::{Kind, Stage};
use crate::record::{Done, OutputRow, Record};
use crate::review::{Decision, ReviewPolicy};
use crate::stats::Stats;

/// A record whose towers are running.
#[derive(Debug)]
pub struct InFlight {
    state: Mutex<State>,
    /// When its parts were queued for the towers.
    pub queued: std::time::Instant,
}

impl InFlight {
    /// `record`, waiting for `remaining` towers (1 or 2).
    pub fn new(record: Record, etag: Option<String>, remaining: u8) -> Self {
        InFlight {
            queued: std::time::Instant::now(),
            state: Mutex::new(State {
                record: Some(record),
                etag,
                image: None,
                text: None,
                remaining,
            }),
        }
    }
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

/// An image's `[3, H, W]` model input, in the form its tower takes.
#[derive(Debug)]
pub enum Pixels {
    /// Rescaled, normalised values.
    Float(Vec<f32>),
    /// The resized, cropped bytes (a tower with a uint8 input).
    Bytes(Vec<u8>),
}

impl Pixels {
    /// Bytes of memory it takes.
    pub fn memory(&self) -> u64 {
        match self {
            Pixels::Float(v) => 4 * v.len() as u64,
            Pixels::Bytes(v) => v.len() as u64,
        }
    }
}

/// An image waiting for the vision tower.
#[derive(Debug)]
pub struct VisionJob {
    /// Its record.
    pub rec: Arc<InFlight>,
    /// Its model input.
    pub pixels: Pixels,
    /// The pixels' charge against the memory budget.
    pub memory: crate::budget::Charge,
}

impl Drop for VisionJob {
    /// The pixel buffer goes back for the next image (mapping a fresh one
    /// per image costs page faults; see `preprocess::buffers`).
    fn drop(&mut self) {
        use clipstream_model::preprocess::buffers;
        match &mut self.pixels {
            Pixels::Float(v) => buffers::give_pixels(std::mem::take(v)),
            Pixels::Bytes(v) => buffers::give_pixel_bytes(std::mem::take(v)),
        }
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
    /// Which labelled rows a person should check.
    pub review: ReviewPolicy,
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
        let (labels, decision) = match (&self.head, &image) {
            (Some(h), Some(img)) => {
                // One more than kept when the margin decides review.
                let mut top = h.top_k(img, self.review.labels_needed(self.top_k));
                if let Some(best) = top.first() {
                    self.stats.top1(&best.label);
                }
                let decision = self.review.decide(&top);
                if let Some(d) = &decision {
                    self.stats.review.decided(matches!(d, Decision::Routed(_)));
                }
                top.truncate(self.top_k);
                (Some(top), decision)
            }
            _ => (None, None),
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
            needs_review: decision.as_ref().map(|d| matches!(d, Decision::Routed(_))),
            review_reason: match decision {
                Some(Decision::Routed(why)) => Some(why),
                _ => None,
            },
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
