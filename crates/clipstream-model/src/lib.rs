//! CLIP on ONNX Runtime, exact to Hugging Face `transformers`.
//!
//! This crate knows nothing of Kafka or S3: it turns image bytes and strings
//! into L2-normalised CLIP embeddings and zero-shot labels. The map:
//!
//! - [`runtime`]: finds the ONNX Runtime shared library (ort's `load-dynamic`)
//!   and chooses execution providers (CPU, CUDA, TensorRT).
//! - [`model_dir`]: the Hugging Face / transformers.js ONNX export layout
//!   (`vision_model.onnx`, `text_model.onnx`, `tokenizer.json`,
//!   `preprocessor_config.json`, `config.json`) and its variants.
//! - [`preprocess`]: image decoding and `CLIPImageProcessor` reproduced bit
//!   for bit (Pillow's colour conversions and bicubic resampling).
//! - [`tokenize`]: `CLIPTokenizerFast` through the `tokenizers` crate.
//! - [`encoder`]: one ORT session per tower; input/output names discovered
//!   from the session; fp32 / fp16 / int8 exports alike; a vision tower can
//!   take uint8 pixels through [`onnx_edit`], a graph edit at load time;
//!   a pipeline writes a batch straight into the tower's input buffer
//!   (`staging`: on a GPU, pinned host memory and I/O binding).
//! - [`clip_model`]: the whole model (preprocessing, tokenizer, towers).
//! - [`zero_shot`]: label sets (class names × prompt templates) and the
//!   softmax head.
//! - [`cpu`]: the host CPU time of a tower's runs (the caller inside `run`
//!   and ONNX Runtime's pool threads, named `ort-vision` / `ort-text`).
//! - [`npy`]: reading and writing `.npy` arrays, for parity checks.
//!
//! The types are synchronous and `Send`; callers decide on threads (the
//! pipeline runs preprocessing on a CPU pool and each tower on its own thread).

pub mod clip_model;
pub mod cpu;
pub mod embedding;
pub mod encoder;
pub mod error;
pub mod model_dir;
pub mod npy;
pub mod onnx_edit;
pub mod preprocess;
pub mod runtime;
mod staging;
pub mod tokenize;
pub mod zero_shot;

pub use clip_model::ClipModel;
pub use encoder::{EmbeddingBatch, TextEncoder, VisionEncoder};
pub use error::{ImageError, ModelError};
pub use model_dir::{ModelDir, Tower, Variant};
pub use preprocess::{DecodeLimits, ImagePreprocessor, PreprocessorConfig};
pub use runtime::{ExecutionProvider, RuntimeOptions};
pub use tokenize::ClipTokenizer;
pub use zero_shot::{LabelSet, ZeroShotHead};
