//! Bad input, in one place: every kind of permanent failure a record can
//! have and the stage that finds it (what a dead letter carries is
//! [`crate::record::DeadLetter`], beside the record's origin). Kinds here
//! are never retried; transient faults (I/O hiccups, S3 5xx, timeouts) are
//! retried where they happen and never become dead letters. Where dead
//! letters go is `[dead_letter]` ([`DeadLetterConfig`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::file::Problems;

/// `[dead_letter]`: a file or a topic ([`DeadLetterConfig::destination`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// JSONL file for dead letters. Default: `_dead_letters.jsonl` in the
    /// Parquet directory (local output).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Kafka dead-letter topic: the original key, value and headers, plus
    /// `clipstream.*` headers saying why. Uses `[sink.kafka]`'s brokers.
    #[serde(default)]
    pub topic: Option<String>,
}

/// Where dead letters go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetters {
    /// A JSON-lines file.
    File(PathBuf),
    /// A Kafka topic.
    Topic(String),
}

impl DeadLetterConfig {
    /// Where dead letters go, given the local Parquet directory (when the
    /// output is local): the one rule, used by validation and by the run.
    pub fn destination(
        &self,
        parquet_dir: Option<&Path>,
    ) -> Result<DeadLetters, (&'static str, &'static str)> {
        match (&self.path, &self.topic) {
            (Some(_), Some(_)) => Err(("dead_letter", "set `path` or `topic`, not both")),
            (None, Some(t)) if t.trim().is_empty() => {
                Err(("dead_letter.topic", "must not be empty"))
            }
            (None, Some(t)) => Ok(DeadLetters::Topic(t.clone())),
            (Some(p), None) => Ok(DeadLetters::File(p.clone())),
            (None, None) => parquet_dir
                .map(|d| DeadLetters::File(d.join("_dead_letters.jsonl")))
                .ok_or((
                    "dead_letter",
                    "with Parquet on S3, set `topic` (a Kafka dead-letter topic) or `path` (a local file)",
                )),
        }
    }

    pub(crate) fn check(&self, parquet_dir: Option<&Path>, p: &mut Problems) {
        if let Err((at, m)) = self.destination(parquet_dir) {
            p.bad(at, m);
        }
    }
}

/// The stage that rejected a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Reading and parsing the event.
    Source,
    /// Fetching the referenced object.
    Fetch,
    /// Decoding and preprocessing the image.
    Decode,
    /// Tokenizing the text.
    Tokenize,
    /// Running a tower of the model.
    Encode,
    /// Writing the results to an output topic.
    Output,
}

impl Stage {
    /// Every stage.
    pub const ALL: [Stage; 6] = [
        Stage::Source,
        Stage::Fetch,
        Stage::Decode,
        Stage::Tokenize,
        Stage::Encode,
        Stage::Output,
    ];

    /// Lower-case name, for headers and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Source => "source",
            Stage::Fetch => "fetch",
            Stage::Decode => "decode",
            Stage::Tokenize => "tokenize",
            Stage::Encode => "encode",
            Stage::Output => "output",
        }
    }
}

/// Every permanent failure kind. Names are stable: they appear in dead-letter
/// headers, metrics and summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The event is not valid JSON.
    InvalidJson,
    /// The event is not UTF-8.
    InvalidUtf8,
    /// Valid JSON, wrong shape (missing id, wrong types).
    InvalidEvent,
    /// Neither `image` nor `text`.
    EmptyEvent,
    /// The event is larger than the configured limit.
    EventTooLarge,
    /// The image URI is not a URI this pipeline accepts.
    InvalidUri,
    /// The URI's scheme is not allowed by this pipeline (e.g. `file://` in a
    /// Kafka pipeline).
    SchemeNotAllowed,
    /// The bucket is not in the allow-list.
    BucketNotAllowed,
    /// A local path outside the allowed root (`fetch.root`).
    PathNotAllowed,
    /// The object does not exist.
    ObjectNotFound,
    /// Access to the object is denied.
    ObjectForbidden,
    /// The object is larger than the configured limit.
    ObjectTooLarge,
    /// The store refused the request for another reason (a 4xx).
    FetchFailed,
    /// The bytes are not an image of a supported format.
    NotAnImage,
    /// A broken or truncated image.
    CorruptImage,
    /// A valid image of a kind that is not supported.
    UnsupportedImage,
    /// More pixels than allowed (decompression bomb).
    ImageTooManyPixels,
    /// More bytes than allowed for an image.
    ImageTooLarge,
    /// Zero width or height.
    EmptyImage,
    /// The tokenizer rejected the text.
    InvalidText,
    /// The model fails on this input (and works on others).
    EncodeFailed,
    /// An output topic refused the record's results for good (larger than
    /// the broker accepts, an invalid record): retrying cannot help.
    OutputRejected,
}

impl Kind {
    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::InvalidJson => "invalid_json",
            Kind::InvalidUtf8 => "invalid_utf8",
            Kind::InvalidEvent => "invalid_event",
            Kind::EmptyEvent => "empty_event",
            Kind::EventTooLarge => "event_too_large",
            Kind::InvalidUri => "invalid_uri",
            Kind::SchemeNotAllowed => "scheme_not_allowed",
            Kind::BucketNotAllowed => "bucket_not_allowed",
            Kind::PathNotAllowed => "path_not_allowed",
            Kind::ObjectNotFound => "object_not_found",
            Kind::ObjectForbidden => "object_forbidden",
            Kind::ObjectTooLarge => "object_too_large",
            Kind::FetchFailed => "fetch_failed",
            Kind::NotAnImage => "not_an_image",
            Kind::CorruptImage => "corrupt_image",
            Kind::UnsupportedImage => "unsupported_image",
            Kind::ImageTooManyPixels => "image_too_many_pixels",
            Kind::ImageTooLarge => "image_too_large",
            Kind::EmptyImage => "empty_image",
            Kind::InvalidText => "invalid_text",
            Kind::EncodeFailed => "encode_failed",
            Kind::OutputRejected => "output_rejected",
        }
    }

    /// Every kind, for documentation and metric initialisation.
    pub const ALL: [Kind; 22] = [
        Kind::InvalidJson,
        Kind::InvalidUtf8,
        Kind::InvalidEvent,
        Kind::EmptyEvent,
        Kind::EventTooLarge,
        Kind::InvalidUri,
        Kind::SchemeNotAllowed,
        Kind::BucketNotAllowed,
        Kind::PathNotAllowed,
        Kind::ObjectNotFound,
        Kind::ObjectForbidden,
        Kind::ObjectTooLarge,
        Kind::FetchFailed,
        Kind::NotAnImage,
        Kind::CorruptImage,
        Kind::UnsupportedImage,
        Kind::ImageTooManyPixels,
        Kind::ImageTooLarge,
        Kind::EmptyImage,
        Kind::InvalidText,
        Kind::EncodeFailed,
        Kind::OutputRejected,
    ];

    /// The kind of an image error from the model crate.
    pub fn of_image_error(e: &clipstream_model::ImageError) -> Kind {
        use clipstream_model::ImageError as E;
        match e {
            E::TooManyBytes { .. } => Kind::ImageTooLarge,
            E::TooManyPixels { .. } => Kind::ImageTooManyPixels,
            E::UnknownFormat(_) => Kind::NotAnImage,
            E::Corrupt { .. } => Kind::CorruptImage,
            E::Unsupported { .. } => Kind::UnsupportedImage,
            E::Empty { .. } => Kind::EmptyImage,
        }
    }
}

/// Message headers: name and value (a header may have no value).
pub type Headers = Arc<[(String, Option<Vec<u8>>)]>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_are_unique_and_match_serde() {
        let mut names: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        for k in Kind::ALL {
            assert_eq!(serde_json::to_value(k).expect("ser"), k.as_str());
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Kind::ALL.len());
    }
}
