//! Errors of this crate, split by what a caller does with them: an
//! [`ImageError`] is bad input (the record is dead-lettered, the worker goes
//! on); a [`ModelError`] is a broken set-up (the worker cannot start).

use std::path::PathBuf;

/// Why an image could not be turned into `pixel_values`. Every variant is a
/// property of the input, never of the machine: retrying will not help.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// More bytes than [`crate::DecodeLimits::max_bytes`].
    #[error("image is {bytes} bytes, over the limit of {limit} bytes")]
    TooManyBytes {
        /// Size of the input.
        bytes: u64,
        /// The configured limit.
        limit: u64,
    },
    /// More pixels than [`crate::DecodeLimits::max_pixels`] (a decompression bomb,
    /// or simply too large).
    #[error("image is {width}x{height} = {pixels} pixels, over the limit of {limit} pixels")]
    TooManyPixels {
        /// Declared width.
        width: u64,
        /// Declared height.
        height: u64,
        /// `width * height`.
        pixels: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The bytes are not one of the supported formats.
    #[error("not a supported image (JPEG, PNG, WebP, GIF, BMP, TIFF): {0}")]
    UnknownFormat(String),
    /// The format is known but the data is broken or truncated.
    #[error("corrupt {format} image: {reason}")]
    Corrupt {
        /// The detected format.
        format: &'static str,
        /// The decoder's message.
        reason: String,
    },
    /// A valid image of a kind this crate does not handle (e.g. float TIFF).
    #[error("unsupported {format} image: {reason}")]
    Unsupported {
        /// The detected format.
        format: &'static str,
        /// What is not supported.
        reason: String,
    },
    /// Zero width or height.
    #[error("image has no pixels ({width}x{height})")]
    Empty {
        /// Declared width.
        width: u64,
        /// Declared height.
        height: u64,
    },
}

impl ImageError {
    /// A short, stable, low-cardinality name for metrics and dead-letter
    /// headers.
    pub fn kind(&self) -> &'static str {
        match self {
            ImageError::TooManyBytes { .. } => "image_too_large",
            ImageError::TooManyPixels { .. } => "image_too_many_pixels",
            ImageError::UnknownFormat(_) => "not_an_image",
            ImageError::Corrupt { .. } => "corrupt_image",
            ImageError::Unsupported { .. } => "unsupported_image",
            ImageError::Empty { .. } => "empty_image",
        }
    }
}

/// A model directory, ONNX Runtime or a session that cannot be used. These
/// stop the worker at start-up with a message that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The ONNX Runtime shared library could not be found or loaded.
    #[error("{0}")]
    Runtime(String),
    /// A file of the model directory is missing.
    #[error("model directory {dir}: {what}")]
    MissingFile {
        /// The model directory.
        dir: PathBuf,
        /// What is missing and what was looked for.
        what: String,
    },
    /// A JSON/TOML file of the model directory could not be read or parsed.
    #[error("{path}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The ONNX graph does not have the inputs/outputs a CLIP tower needs.
    #[error("{path}: {reason}")]
    BadGraph {
        /// The ONNX file.
        path: PathBuf,
        /// What is missing, with what the graph does have.
        reason: String,
    },
    /// An execution provider that was asked for could not be registered.
    #[error("execution provider {provider} is not usable: {reason}")]
    Provider {
        /// `cuda` or `tensorrt`.
        provider: &'static str,
        /// ONNX Runtime's reason, with a hint.
        reason: String,
    },
    /// ONNX Runtime failed while building a session or running a batch.
    #[error("onnx runtime: {0}")]
    Ort(String),
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A label set file is invalid.
    #[error("label set {path}: {reason}")]
    Labels {
        /// The TOML file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl From<ort::Error> for ModelError {
    fn from(e: ort::Error) -> Self {
        ModelError::Ort(e.to_string())
    }
}
