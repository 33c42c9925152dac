//! Command-line arguments.

use clap::{Parser, Subcommand};

/// CLIP embeddings and zero-shot labels for images and captions, on ONNX Runtime.
///
/// Point --model at a CLIP export in the Hugging Face ONNX layout
/// (vision_model.onnx, text_model.onnx, tokenizer.json,
/// preprocessor_config.json, config.json; transformers.js repositories keep
/// the towers under onnx/). Outputs are JSON lines on stdout; problems with
/// single inputs are reported on stderr and the other inputs still print.
///
/// Exit status: 0 all inputs done, 1 some inputs failed, 2 set-up error
/// (model, ONNX Runtime, arguments).
#[derive(Debug, Parser)]
#[command(name = "clipstream", version, propagate_version = true)]
pub struct Cli {
    /// More log output on stderr (-v info, -vv debug). CLIPSTREAM_LOG overrides
    /// (e.g. CLIPSTREAM_LOG=clipstream=debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a pipeline (TOML): read events, embed and label them, write
    /// Parquet and dead letters. A rerun skips what is already written.
    /// SIGINT/SIGTERM stops reading and drains what is in flight.
    Run(crate::commands::run::RunArgs),
    /// Check pipeline files without running them: every problem, with its
    /// place in the file.
    Validate(crate::commands::run::ValidateArgs),
    /// Embed images and texts: one JSON line per input,
    /// {"input", "kind": "image"|"text", "embedding": [...]} (L2-normalised).
    Embed(crate::commands::model::EmbedArgs),
    /// Zero-shot labels for images: one JSON line per image,
    /// {"input", "labels": [{"label", "score"}, ...]} best first.
    Classify(crate::commands::model::ClassifyArgs),
    /// Write the model's pixel_values for images to a .npy file (float32
    /// [N, 3, H, W]), to compare with transformers' CLIPImageProcessor.
    Preprocess(crate::commands::model::PreprocessArgs),
    /// Tokenize texts: one JSON line per text, {"text", "input_ids",
    /// "attention_mask"}, to compare with transformers' CLIPTokenizerFast.
    Tokenize(crate::commands::model::TokenizeArgs),
    /// Measure preprocessing, raw session and end-to-end throughput of a
    /// model on this machine and print the figures.
    Bench(crate::commands::bench::BenchArgs),
    /// Nightly re-embedding, step 1: compare tonight's catalog (JSONL or
    /// CSV) with what earlier runs wrote and write the night's work: events
    /// for new and changed products only, deletions, and a summary.
    Plan(crate::commands::catalog::PlanArgs),
    /// Nightly re-embedding, step 3 (after `run` on the plan's events):
    /// write the night's complete table, one row per product, carrying
    /// unchanged rows over from the previous snapshot.
    Snapshot(crate::commands::catalog::SnapshotArgs),
    /// A whole night for a worker fleet (what the Helm chart's CronJob
    /// runs): plan and publish what changed since the newest earlier
    /// snapshot, wait for the fleet, write tonight's snapshot and
    /// tombstones. Rerun with the same --work folder to finish a night.
    Night(crate::commands::night::NightArgs),
    /// How good are the labels: accuracy, per-class precision / recall /
    /// F1, the most-confused pairs, calibration, and the score threshold
    /// for a target precision, against true labels in the records'
    /// attributes; as text, JSON and an HTML report with charts.
    Eval(crate::commands::eval::EvalArgs),
    /// Query what a run produced: the records whose image (or text)
    /// embeddings are nearest a text or an image, by an exact scan of its
    /// Parquet output, with the model that wrote it.
    Search(crate::commands::search::SearchArgs),
}
