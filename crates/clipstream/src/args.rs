//! Arguments several subcommands share: where the model is and how to run
//! it, how images are read, and checked number parsers.

use std::path::PathBuf;

use clap::Args;
use clipstream_model::preprocess::ImageMode;
use clipstream_model::{DecodeLimits, ExecutionProvider, RuntimeOptions, Variant};

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
