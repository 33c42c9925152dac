//! The clipstream engine: records with acknowledgements, bounded stages,
//! dynamic batching, sources and sinks. The stages, in the order a record
//! meets them:
//!
//! ```text
//!  source ──► fetch ──► prep (CPU pool) ──► batcher ─► encoder (vision) ──┐
//!  files/     file://,  decode, resize      batcher ─► encoder (text)  ──┤ the last tower
//!  kafka      s3://     tokenize                                        │ builds the row
//!    │                                                                  ▼
//!    │                     outputs: embeddings, labels, review, dead-letter topics
//!    │                                         │
//!    │                                         ▼
//!    │     ◄──── acks (range published) ◄── sink thread: order per partition,
//!    ▼                                      Parquet ranges (local or S3), dead-letter file
//!  tracker: highest contiguous acknowledged offset per partition → commit
//! ```
//!
//! - [`source`]: where records come from — [`source::files`] (a manifest
//!   or a directory; [`source::files::resume`] skips what a run wrote) and
//!   [`source::kafka`] (a consumer group; [`source::kafka::start`] starts a
//!   newly assigned partition from an offset read from the broker).
//! - [`fetch`]: image URIs to bytes (local files under a root, S3 through
//!   [`s3`]).
//! - [`prep`]: decoding and preprocessing, tokenizing, on a CPU pool.
//! - [`assemble`]: a record between the towers; the [`assemble::Assembler`]
//!   builds its row when the last tower is done (on the encoder threads).
//! - [`batch`]: dynamic batching and the encoder threads (a tower that fails
//!   on one input makes it a dead letter; one that fails on all is fatal).
//! - [`sink`]: the outputs stage ([`sink::kafka`]), the sink thread, and
//!   Parquet ([`sink::parquet`]: ranges of records, published without ever
//!   replacing a file).
//! - [`engine`]: wires the stages, runs them, drains on stop or failure.
//! - [`catalog`]: nightly re-embedding around a run: `plan` (what changed
//!   since earlier output) and `snapshot` (one row per product).
//! - [`eval`] and [`search`]: on a run's output — how far to trust its
//!   labels, and text or image queries over its embeddings.
//! - Across the stages: [`ack`] (tokens, the contiguous tracker, epochs),
//!   [`record`] (the event contract, records, rows), [`dead_letter`] (the
//!   one list of permanent failure kinds), [`retry`] (permanent vs
//!   transient, backoff), [`budget`] (the memory budget), [`fatal`] (a stage
//!   that cannot go on), [`config`] (the pipeline TOML, strict, validated
//!   without I/O), [`stats`] (the registry, the record counters and the
//!   closed label values), [`review`] (review routing).
//!
//! Each stage keeps its settings and its metrics beside its logic: a
//! `config` module (or a section type in the stage's file) with the
//! section's defaults and its own `check`, and a `metrics` module (or a
//! `*Metrics` type) whose methods say what happened. [`config`] holds the
//! whole file, the rules that span sections, and a table of where each
//! section lives; [`stats`] assembles the stages' metrics, with a table of
//! where each lives. A stage's unit tests are in its files; the end-to-end
//! tests are in the repository's `tests/`.
//!
//! Every queue between stages is bounded, every record holds an in-flight
//! slot and a charge against the memory budget until its result is handed
//! to the file writer, so memory does not grow with the backlog.

pub mod ack;
pub mod assemble;
pub mod batch;
pub mod budget;
pub mod catalog;
pub mod config;
pub mod dead_letter;
pub mod engine;
pub mod eval;
pub mod fatal;
pub mod fetch;
pub mod prep;
pub mod record;
pub mod retry;
pub mod review;
pub mod s3;
pub mod search;
pub mod sink;
pub mod source;
pub mod stats;
