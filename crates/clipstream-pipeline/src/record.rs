//! Records as they travel: the input event contract, the record that wraps
//! it with its position and acknowledgement, and the row that comes out.

use std::sync::Arc;

use clipstream_model::zero_shot::Label;
use serde_json::{Map, Value};
use tokio::sync::OwnedSemaphorePermit;

use crate::ack::{AckToken, PartitionKey, Position};
use crate::dead_letter::{Kind, Stage};

/// The input event (a Kafka message value or a manifest line):
/// `{"id": "...", "image": "s3://bucket/key", "text": "...", "attributes": {...}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Record id, unique per input; the output key.
    pub id: String,
    /// Image URI (`s3://`, or `file://` where allowed).
    pub image: Option<String>,
    /// Caption / text.
    pub text: Option<String>,
    /// Passed through to the output as JSON.
    pub attributes: Option<Map<String, Value>>,
}

/// Why an event was rejected, and its id if it had a usable one.
#[derive(Debug, Clone, PartialEq)]
pub struct EventError {
    /// The id, when one could be read.
    pub id: Option<String>,
    /// Kind of failure.
    pub kind: Kind,
    /// What is wrong, for a person.
    pub reason: String,
}

/// Parses and checks an event. Unknown top-level fields are ignored.
pub fn parse_event(bytes: &[u8], max_bytes: usize) -> Result<Event, EventError> {
    let err = |id: Option<String>, kind, reason: String| EventError { id, kind, reason };
    if bytes.len() > max_bytes {
        return Err(err(
            None,
            Kind::EventTooLarge,
            format!(
                "event is {} bytes, over the limit of {max_bytes}",
                bytes.len()
            ),
        ));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| err(None, Kind::InvalidUtf8, format!("event is not UTF-8: {e}")))?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| err(None, Kind::InvalidJson, format!("event is not JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(err(
            None,
            Kind::InvalidEvent,
            "event must be a JSON object".into(),
        ));
    };
    let id = match obj.remove("id") {
        Some(Value::String(s)) if !s.trim().is_empty() => s,
        Some(Value::String(_)) => {
            return Err(err(None, Kind::InvalidEvent, "`id` is empty".into()));
        }
        None | Some(Value::Null) => {
            return Err(err(None, Kind::InvalidEvent, "`id` is missing".into()));
        }
        Some(other) => {
            return Err(err(
                None,
                Kind::InvalidEvent,
                format!("`id` must be a string, got {}", type_name(&other)),
            ));
        }
    };
    let mut optional_string = |field: &str| -> Result<Option<String>, EventError> {
        match obj.remove(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(err(
                Some(id.clone()),
                Kind::InvalidEvent,
                format!("`{field}` must be a string, got {}", type_name(&other)),
            )),
        }
    };
    let image = optional_string("image")?;
    let text = optional_string("text")?;
    let attributes = match obj.remove("attributes") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(other) => {
            return Err(err(
                Some(id),
                Kind::InvalidEvent,
                format!("`attributes` must be an object, got {}", type_name(&other)),
            ));
        }
    };
    if image.is_none() && text.is_none() {
        return Err(err(
            Some(id),
            Kind::EmptyEvent,
            "event has neither `image` nor `text`".into(),
        ));
    }
    Ok(Event {
        id,
        image,
        text,
        attributes,
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A record's place in the pipeline: one of the `max_in_flight` slots, and
/// its charge against the memory budget (its event, then its row; objects,
/// images and model inputs are charged where they live). Both are given back
/// when the record's result reaches the file writer, or its dead letter is
/// written.
#[derive(Debug)]
pub struct Permit {
    _slot: OwnedSemaphorePermit,
    /// The record's bytes charged to the budget.
    pub memory: crate::budget::Charge,
}

impl Permit {
    /// A permit of `slot`, charging `memory`.
    pub fn new(slot: OwnedSemaphorePermit, memory: crate::budget::Charge) -> Permit {
        Permit {
            _slot: slot,
            memory,
        }
    }
}

/// Where a record came from, with the bytes a dead letter must carry. Every
/// field is cheap to clone (shared bytes).
#[derive(Debug, Clone)]
pub struct Origin {
    /// Partition of origin.
    pub partition: PartitionKey,
    /// Position in the partition.
    pub position: Position,
    /// The Kafka key, if any.
    pub key: Option<Arc<[u8]>>,
    /// The Kafka headers, if any.
    pub headers: crate::dead_letter::Headers,
    /// The original bytes, as read.
    pub raw: Arc<[u8]>,
    /// Event time (Kafka timestamp), milliseconds since the epoch.
    pub event_time_ms: Option<i64>,
}

impl Origin {
    /// The same origin without its original bytes and headers (once no dead
    /// letter can need them).
    pub fn without_bytes(self) -> Origin {
        Origin {
            key: None,
            headers: Arc::from([]),
            raw: Arc::from([]),
            ..self
        }
    }

    /// A dead letter for this input.
    pub fn dead_letter(
        self,
        id: Option<String>,
        stage: Stage,
        kind: Kind,
        reason: String,
    ) -> DeadLetter {
        DeadLetter {
            origin: self,
            id,
            stage,
            kind,
            reason,
        }
    }
}

/// A message as a source read it, before its event is known to be good.
#[derive(Debug)]
pub struct Received {
    /// Where it came from.
    pub origin: Origin,
    /// Acknowledgement.
    pub ack: AckToken,
    /// In-flight slot.
    pub permit: Permit,
}

/// A record in flight: where it came from, its event, its acknowledgement.
#[derive(Debug)]
pub struct Record {
    /// Where it came from.
    pub origin: Origin,
    /// The parsed event.
    pub event: Event,
    /// Acknowledgement.
    pub ack: AckToken,
    /// In-flight slot.
    pub permit: Permit,
}

impl Received {
    /// A record for the pipeline, or, when the event is bad, its dead
    /// letter (stage `source`; boxed: bad events are the rare case).
    pub fn admit(self, parsed: Result<Event, EventError>) -> Result<Record, Box<Done>> {
        match parsed {
            Ok(event) => Ok(Record {
                origin: self.origin,
                event,
                ack: self.ack,
                permit: self.permit,
            }),
            Err(e) => Err(Box::new(Done::Dead {
                letter: self
                    .origin
                    .dead_letter(e.id, Stage::Source, e.kind, e.reason),
                ack: self.ack,
                permit: self.permit,
            })),
        }
    }
}

impl Record {
    /// Gives up on the record without blaming the input.
    pub fn failed(self, reason: String) -> Done {
        Done::Failed {
            reason,
            ack: self.ack,
            permit: self.permit,
        }
    }

    /// Turns the record into a dead letter.
    pub fn dead(self, stage: Stage, kind: Kind, reason: String) -> Done {
        Done::Dead {
            letter: self
                .origin
                .dead_letter(Some(self.event.id), stage, kind, reason),
            ack: self.ack,
            permit: self.permit,
        }
    }
}

/// One output row (the Parquet schema and the downstream messages).
#[derive(Debug, Clone, PartialEq)]
pub struct OutputRow {
    /// Record id.
    pub id: String,
    /// Topic or input name.
    pub source: Arc<str>,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Image URI.
    pub image_uri: Option<String>,
    /// Image ETag (S3) when known.
    pub image_etag: Option<String>,
    /// Text.
    pub text: Option<String>,
    /// Attributes, as JSON text.
    pub attributes: Option<String>,
    /// Unit image embedding.
    pub image_embedding: Option<Vec<f32>>,
    /// Unit text embedding.
    pub text_embedding: Option<Vec<f32>>,
    /// Top-k zero-shot labels (images only, when a label set is configured).
    pub labels: Option<Vec<Label>>,
    /// Cosine between image and text embeddings, when both exist.
    pub clip_score: Option<f32>,
    /// Whether a person should check the labels (`None`: no review
    /// thresholds, or no labels).
    pub needs_review: Option<bool>,
    /// Why, when it should.
    pub review_reason: Option<String>,
    /// Event time, ms since the epoch.
    pub event_time_ms: Option<i64>,
    /// When the row was produced, ms since the epoch.
    pub processed_at_ms: i64,
}

/// What reaches the sinks for every record: a row or a dead letter.
// A row is what nearly every record becomes: boxing it would allocate once
// more per record, to save copying a few hundred bytes into a channel for
// the rare dead letter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Done {
    /// Processed.
    Row {
        /// The result.
        row: OutputRow,
        /// Its input (for a dead letter, should an output refuse the row).
        origin: Origin,
        /// Acknowledgement.
        ack: AckToken,
        /// In-flight slot.
        permit: Permit,
    },
    /// Rejected.
    Dead {
        /// The dead letter.
        letter: DeadLetter,
        /// Acknowledgement.
        ack: AckToken,
        /// In-flight slot.
        permit: Permit,
    },
    /// Could not be processed for a reason that is not the input's fault
    /// (retries exhausted): nothing is written, the token fails, the
    /// partition's position stays before it, and a rerun retries it.
    Failed {
        /// Why.
        reason: String,
        /// Acknowledgement (dropped unmarked: failed).
        ack: AckToken,
        /// In-flight slot.
        permit: Permit,
    },
}

impl Done {
    /// The record's acknowledgement.
    pub fn ack(&self) -> &AckToken {
        match self {
            Done::Row { ack, .. } | Done::Dead { ack, .. } | Done::Failed { ack, .. } => ack,
        }
    }
}

/// A rejected record: the original bytes and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Where it came from, with its original key, headers and bytes.
    pub origin: Origin,
    /// The record id, when the event was readable enough to have one.
    pub id: Option<String>,
    /// Where it failed.
    pub stage: Stage,
    /// What kind of failure.
    pub kind: Kind,
    /// The human-readable reason.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(bytes: &[u8]) -> Kind {
        parse_event(bytes, 1000).expect_err("invalid").kind
    }

    #[test]
    fn good_events_parse() {
        let e = parse_event(
            br#"{"id": "a", "image": "s3://b/k.jpg", "text": "hi", "attributes": {"x": 1}, "extra": true}"#,
            1000,
        )
        .expect("valid");
        assert_eq!(e.id, "a");
        assert_eq!(e.image.as_deref(), Some("s3://b/k.jpg"));
        assert_eq!(e.text.as_deref(), Some("hi"));
        assert!(e.attributes.is_some());
        let e = parse_event(br#"{"id": "t", "text": "only", "image": null}"#, 1000).expect("valid");
        assert_eq!(e.image, None);
    }

    #[test]
    fn bad_events_are_classified() {
        assert_eq!(kind(b"\xff\xfe"), Kind::InvalidUtf8);
        assert_eq!(kind(b"{not json"), Kind::InvalidJson);
        assert_eq!(kind(b"[1, 2]"), Kind::InvalidEvent);
        assert_eq!(kind(br#"{"image": "s3://b/k"}"#), Kind::InvalidEvent);
        assert_eq!(kind(br#"{"id": 7, "text": "x"}"#), Kind::InvalidEvent);
        assert_eq!(kind(br#"{"id": "x", "text": 5}"#), Kind::InvalidEvent);
        assert_eq!(
            kind(br#"{"id": "x", "attributes": [1], "text": "t"}"#),
            Kind::InvalidEvent
        );
        assert_eq!(kind(br#"{"id": "x"}"#), Kind::EmptyEvent);
        assert_eq!(kind(br#"{"id": "x", "text": ""}"#), Kind::EmptyEvent);
        assert_eq!(
            parse_event(&[b' '; 2000], 1000).expect_err("big").kind,
            Kind::EventTooLarge
        );
        let e = parse_event(br#"{"id": "x"}"#, 1000).expect_err("empty");
        assert_eq!(e.id.as_deref(), Some("x"));
    }
}
