//! The model directory: the layout Hugging Face Optimum and transformers.js
//! use for CLIP exports.
//!
//! ```text
//! config.json  preprocessor_config.json  tokenizer.json  [tokenizer_config.json  special_tokens_map.json]
//! vision_model.onnx  text_model.onnx                      (Optimum-style, at the root)
//! onnx/vision_model.onnx  onnx/vision_model_fp16.onnx ... (transformers.js, with variants)
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// Which export of the towers to load (transformers.js file suffixes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Variant {
    /// `vision_model.onnx` (float32).
    #[default]
    Fp32,
    /// `vision_model_fp16.onnx`.
    Fp16,
    /// `vision_model_quantized.onnx` (dynamic int8/uint8).
    Quantized,
    /// Any other suffix: `vision_model_<suffix>.onnx` (`int8`, `uint8`, `q4`, `bnb4`, ...).
    Other(String),
}

impl Variant {
    fn suffix(&self) -> String {
        match self {
            Variant::Fp32 => String::new(),
            Variant::Fp16 => "_fp16".into(),
            Variant::Quantized => "_quantized".into(),
            Variant::Other(s) => format!("_{s}"),
        }
    }
}

impl FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "" | "fp32" | "float32" => Variant::Fp32,
            "fp16" | "float16" => Variant::Fp16,
            "quantized" => Variant::Quantized,
            other if other.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
                Variant::Other(other.to_string())
            }
            other => return Err(format!("invalid model variant {other:?}")),
        })
    }
}

impl TryFrom<String> for Variant {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Variant> for String {
    fn from(v: Variant) -> String {
        v.to_string()
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Variant::Fp32 => f.write_str("fp32"),
            Variant::Fp16 => f.write_str("fp16"),
            Variant::Quantized => f.write_str("quantized"),
            Variant::Other(s) => f.write_str(s),
        }
    }
}

/// A model directory with its JSON files found and `config.json` read. The
/// towers are resolved separately ([`ModelDir::tower`]) so that tools which
/// only preprocess or tokenize need no ONNX files.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The directory.
    pub root: PathBuf,
    /// `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// `preprocessor_config.json`.
    pub preprocessor_config: PathBuf,
    /// The parts of `config.json` clipstream uses.
    pub config: ClipConfig,
}

/// The two towers of a model directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tower {
    /// `vision_model*.onnx`.
    Vision,
    /// `text_model*.onnx`.
    Text,
}

impl Tower {
    fn stem(self) -> &'static str {
        match self {
            Tower::Vision => "vision_model",
            Tower::Text => "text_model",
        }
    }
}

/// The fields of a CLIP `config.json` that matter here. Unknown fields are
/// allowed: real configs carry dozens.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ClipConfig {
    /// Embedding dimension (`projection_dim`).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// `logit_scale_init_value` (ln of the logit scale), informative only.
    #[serde(default)]
    pub logit_scale_init_value: Option<f64>,
    /// `_name_or_path`, when the exporter kept it.
    #[serde(default, rename = "_name_or_path")]
    pub name_or_path: Option<String>,
    /// Text tower settings.
    #[serde(default)]
    pub text_config: TextConfig,
    /// Vision tower settings.
    #[serde(default)]
    pub vision_config: VisionConfig,
}

/// `config.json` → `text_config`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TextConfig {
    /// Number of positions (77 for every released CLIP).
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
}

/// `config.json` → `vision_config`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct VisionConfig {
    /// Input resolution.
    #[serde(default)]
    pub image_size: Option<usize>,
}

impl ModelDir {
    /// Finds the JSON files of `root` and reads `config.json`.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, ModelError> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(ModelError::MissingFile {
                dir: root,
                what: "is not a directory".into(),
            });
        }
        let tokenizer = require(&root, "tokenizer.json")?;
        let preprocessor_config = require(&root, "preprocessor_config.json")?;
        let config_path = require(&root, "config.json")?;
        let config: ClipConfig = read_json(&config_path)?;
        Ok(ModelDir {
            root,
            tokenizer,
            preprocessor_config,
            config,
        })
    }

    /// The ONNX file of `tower` for `variant`, at the root or under `onnx/`.
    /// A missing file is reported with the `.onnx` files that are there.
    pub fn tower(&self, tower: Tower, variant: &Variant) -> Result<PathBuf, ModelError> {
        find_tower(&self.root, tower.stem(), variant)
    }

    /// A short id for output rows: the config's `_name_or_path` if set, else
    /// the directory name, with the variant appended when not fp32.
    pub fn model_id(&self, variant: &Variant) -> String {
        let base = self
            .config
            .name_or_path
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| {
                self.root
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| self.root.display().to_string())
            });
        match variant {
            Variant::Fp32 => base,
            v => format!("{base}:{v}"),
        }
    }

    /// What determines the model's outputs, as a hash: the bytes of both
    /// towers' ONNX files for `variant` (with their external data files),
    /// of `preprocessor_config.json` and of the tokenizer's files, and the
    /// text length `config.json` sets. Neither the directory's name nor the
    /// rest of `config.json` counts, so a renamed or re-described copy has
    /// the same fingerprint and a changed weight does not. `sha256:` and 64
    /// hex digits.
    pub fn fingerprint(&self, variant: &Variant) -> Result<String, ModelError> {
        use sha2::{Digest, Sha256};
        let mut parts: Vec<(&str, PathBuf)> = Vec::new();
        for (name, tower) in [("vision", Tower::Vision), ("text", Tower::Text)] {
            let onnx = self.tower(tower, variant)?;
            // External data next to the graph (`x.onnx_data`, `x.onnx.data`).
            for suffix in ["", "_data", ".data"] {
                let mut p = onnx.clone().into_os_string();
                p.push(suffix);
                let p = PathBuf::from(p);
                if suffix.is_empty() || p.is_file() {
                    parts.push((name, p));
                }
            }
        }
        parts.push(("preprocessor", self.preprocessor_config.clone()));
        parts.push(("tokenizer", self.tokenizer.clone()));
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            if let Some(p) = self.optional(name) {
                parts.push(("tokenizer", p));
            }
        }
        let mut hash = Sha256::new();
        // config.json counts only for what changes outputs: how far texts
        // are cut.
        hash.update(
            format!(
                "max_position_embeddings={:?}\0",
                self.config.text_config.max_position_embeddings
            )
            .as_bytes(),
        );
        let mut buf = vec![0u8; 1 << 20];
        for (name, path) in &parts {
            let io = |e: std::io::Error| ModelError::BadFile {
                path: path.clone(),
                reason: format!("reading it: {e}"),
            };
            let mut f = std::fs::File::open(path).map_err(io)?;
            let len = f.metadata().map_err(io)?.len();
            hash.update(name.as_bytes());
            hash.update([0]);
            hash.update(len.to_le_bytes());
            loop {
                let n = std::io::Read::read(&mut f, &mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
            }
            hash.update([0xff]);
        }
        let digest = hash.finalize();
        Ok(format!(
            "sha256:{}",
            digest
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ))
    }

    /// Path of an optional file of the directory, if present.
    pub fn optional(&self, name: &str) -> Option<PathBuf> {
        let p = self.root.join(name);
        p.is_file().then_some(p)
    }
}

fn require(root: &Path, name: &str) -> Result<PathBuf, ModelError> {
    let p = root.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(ModelError::MissingFile {
            dir: root.to_path_buf(),
            what: format!("{name} not found"),
        })
    }
}

fn find_tower(root: &Path, tower: &str, variant: &Variant) -> Result<PathBuf, ModelError> {
    let file = format!("{tower}{}.onnx", variant.suffix());
    let candidates = [root.join(&file), root.join("onnx").join(&file)];
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let mut present: Vec<String> = Vec::new();
    for dir in [root.to_path_buf(), root.join("onnx")] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".onnx") {
                    let rel = if dir == root {
                        name
                    } else {
                        format!("onnx/{name}")
                    };
                    present.push(rel);
                }
            }
        }
    }
    present.sort();
    let hint = if present
        .iter()
        .any(|p| p == "model.onnx" || p == "onnx/model.onnx")
    {
        " (model.onnx is a combined export: export the towers separately, e.g. as transformers.js \
         repositories do, or with CLIPVisionModelWithProjection / CLIPTextModelWithProjection)"
    } else {
        ""
    };
    Err(ModelError::MissingFile {
        dir: root.to_path_buf(),
        what: format!(
            "{file} not found at the root or under onnx/ (variant {variant}); .onnx files present: {}{hint}",
            if present.is_empty() {
                "none".to_string()
            } else {
                present.join(", ")
            }
        ),
    })
}

/// Reads and parses a JSON file, naming the file in the error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::BadFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
        path: path.to_path_buf(),
        reason: format!("invalid JSON: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_parse_and_print() {
        for (s, v) in [
            ("fp32", Variant::Fp32),
            ("fp16", Variant::Fp16),
            ("quantized", Variant::Quantized),
            ("q4", Variant::Other("q4".into())),
        ] {
            assert_eq!(s.parse::<Variant>(), Ok(v.clone()));
            assert_eq!(v.to_string(), s);
        }
        assert!("../x".parse::<Variant>().is_err());
    }

    #[test]
    fn missing_tower_lists_what_is_there() {
        let dir = std::env::temp_dir().join(format!("clipstream-modeldir-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("onnx")).expect("mkdir");
        std::fs::write(dir.join("onnx/model.onnx"), b"x").expect("write");
        for f in ["tokenizer.json", "preprocessor_config.json", "config.json"] {
            std::fs::write(dir.join(f), b"{}").expect("write");
        }
        let model = ModelDir::open(&dir).expect("json files are there");
        let err = model
            .tower(Tower::Vision, &Variant::Fp16)
            .expect_err("no towers");
        let msg = err.to_string();
        assert!(msg.contains("vision_model_fp16.onnx"), "{msg}");
        assert!(msg.contains("onnx/model.onnx"), "{msg}");
        assert!(msg.contains("combined export"), "{msg}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
