//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use clipstream_model::preprocess::ImageMode;
use clipstream_model::{DecodeLimits, ExecutionProvider, RuntimeOptions, Variant};

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
    Embed(EmbedArgs),
    /// Zero-shot labels for images: one JSON line per image,
    /// {"input", "labels": [{"label", "score"}, ...]} best first.
    Classify(ClassifyArgs),
    /// Write the model's pixel_values for images to a .npy file (float32
    /// [N, 3, H, W]), to compare with transformers' CLIPImageProcessor.
    Preprocess(PreprocessArgs),
    /// Tokenize texts: one JSON line per text, {"text", "input_ids",
    /// "attention_mask"}, to compare with transformers' CLIPTokenizerFast.
    Tokenize(TokenizeArgs),
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

/// Where the model is and how to run it.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Model directory (Hugging Face / transformers.js ONNX layout).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Which export of the towers to load: fp32 (vision_model.onnx), fp16
    /// (vision_model_fp16.onnx), quantized (vision_model_quantized.onnx), or
    /// any other transformers.js suffix (int8, uint8, q4, ...).
    #[arg(long, default_value = "fp32", value_name = "VARIANT")]
    pub variant: Variant,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// ONNX Runtime settings.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// Path of libonnxruntime.so (default: ORT_DYLIB_PATH, then the
    /// checkout's .cache/onnxruntime filled by scripts/fetch-onnxruntime.sh,
    /// then the onnxruntime Python package).
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Execution provider, repeatable, in order of preference: cpu,
    /// cuda[:DEVICE], tensorrt[:DEVICE[:fp16]].
    #[arg(long = "provider", value_name = "EP", default_value = "cpu", value_parser = ExecutionProvider::parse_short)]
    pub providers: Vec<ExecutionProvider>,
    /// Run on CPU when a GPU provider that was asked for cannot be used,
    /// instead of failing.
    #[arg(long)]
    pub allow_cpu_fallback: bool,
    /// Threads inside one ONNX Runtime operator (0 = ONNX Runtime's default,
    /// one per physical core, on the CPU provider; one on a GPU provider).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub intra_threads: usize,
    /// Let ONNX Runtime's idle threads spin (lower latency, but they burn
    /// the cores that preprocessing needs; off by default).
    #[arg(long)]
    pub spinning: bool,
}

impl RuntimeArgs {
    pub fn options(&self) -> RuntimeOptions {
        RuntimeOptions {
            library: self.ort_lib.clone(),
            providers: self.providers.clone(),
            allow_cpu_fallback: self.allow_cpu_fallback,
            intra_threads: self.intra_threads,
            spinning: self.spinning,
        }
    }
}

/// How images are read.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// Apply the EXIF orientation before preprocessing. transformers does not,
    /// so the default matches it; photos from phones may want this.
    #[arg(long)]
    pub exif_orientation: bool,
    /// Refuse images larger than this many bytes.
    #[arg(long, default_value_t = DecodeLimits::default().max_bytes, value_name = "BYTES")]
    pub max_image_bytes: u64,
    /// Refuse images with more pixels than this (decompression bombs).
    #[arg(long, default_value_t = DecodeLimits::default().max_pixels, value_name = "PIXELS")]
    pub max_image_pixels: u64,
    /// exact: bit-identical to transformers' CLIPImageProcessor. fast: large
    /// JPEGs are decoded at a reduced DCT scale (1/2, 1/4, 1/8) that still
    /// covers the model's input; much less CPU, embeddings not identical.
    #[arg(long, default_value = "exact", value_name = "MODE")]
    pub image_mode: ImageMode,
}

impl ImageArgs {
    pub fn limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_bytes: self.max_image_bytes,
            max_pixels: self.max_image_pixels,
        }
    }
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub images: ImageArgs,
    /// An image file to embed (repeatable).
    #[arg(long = "image", value_name = "PATH")]
    pub image: Vec<PathBuf>,
    /// A text to embed (repeatable); any text, one that starts with a dash
    /// too.
    #[arg(long = "text", value_name = "STR", allow_hyphen_values = true)]
    pub text: Vec<String>,
    /// Inputs per ONNX Runtime call.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub batch_size: usize,
}

#[derive(Debug, Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub images: ImageArgs,
    /// Label set (TOML): `classes = [...]`, `templates = ["a photo of a {}."]`,
    /// optional `logit_scale` (default 100).
    #[arg(long, value_name = "FILE.toml")]
    pub labels: PathBuf,
    /// Image files to classify.
    #[arg(long = "image", value_name = "PATH", required = true)]
    pub image: Vec<PathBuf>,
    /// Labels per image.
    #[arg(long, default_value_t = 5, value_name = "K")]
    pub top_k: usize,
    /// Images per ONNX Runtime call.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub batch_size: usize,
}

#[derive(Debug, Args)]
pub struct PreprocessArgs {
    /// Model directory (only preprocessor_config.json is read).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    #[command(flatten)]
    pub images: ImageArgs,
    /// Output .npy file.
    #[arg(long, value_name = "OUT.npy")]
    pub npy: PathBuf,
    /// Images, in output order.
    #[arg(value_name = "IMAGE", required = true)]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// Model directory (tokenizer.json, tokenizer_config.json, config.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A text to tokenize (repeatable); any text, one that starts with a
    /// dash too.
    #[arg(
        long = "text",
        value_name = "STR",
        required = true,
        allow_hyphen_values = true
    )]
    pub text: Vec<String>,
}

/// `--seconds`-like arguments: a positive, finite number of seconds up to a
/// day (a duration out of that range would stop the program).
pub fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not between 0 and 86400 seconds")),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

/// Percentages: a number from 0 to 100.
pub fn percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
        Ok(v) => Err(format!("{v} is not a percentage from 0 to 100")),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

/// Rates: a positive, finite number.
pub fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not a positive number")),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}
