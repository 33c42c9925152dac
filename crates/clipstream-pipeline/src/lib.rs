//! The clipstream engine: records with acknowledgements, bounded stages,
//! dynamic batching, sources and sinks.
//!
//! ```text
//! source ──► fetch ──► prep (CPU pool) ──► batcher ─► encoder (vision) ──┐
//!  (files)   (file://)  decode/resize     batcher ─► encoder (text)  ──┤ last part builds the row
//!    │                  tokenize                                       ▼
//!    │                                                   sink thread: reorder per partition,
//!    │   ◄─────────── acks (file closed, dead letter synced) ◄─ Parquet files, dead letters
//!    ▼
//!  tracker: highest contiguous acknowledged position per partition
//! ```
//!
//! - [`ack`]: tokens and the contiguous-position tracker.
//! - [`record`]: the event contract, records, output rows.
//! - [`dead_letter`]: the one list of permanent failure kinds.
//! - [`config`]: the pipeline TOML, strict and validated without I/O.
//! - [`source`], [`fetch`], [`prep`], [`batch`], [`sink`]: one module per stage.
//! - [`engine`]: wires the stages, runs them, drains on stop.
//! - [`stats`]: counters for progress and the summary.
//!
//! Every queue between stages is bounded and every record holds an in-flight
//! permit until its result is handed to the file writer, so memory does not
//! grow with the backlog.

pub mod ack;
pub mod batch;
pub mod budget;
pub mod config;
pub mod dead_letter;
pub mod engine;
pub mod fatal;
pub mod fetch;
pub mod prep;
pub mod record;
pub mod retry;
pub mod s3;
pub mod sink;
pub mod source;
pub mod stats;
