//! `CLIPTokenizerFast` through the `tokenizers` crate: the model's
//! `tokenizer.json`, padded to the model's length with its pad token,
//! truncated so that the end-of-text token survives.

use std::path::Path;

use serde::Deserialize;
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::error::ModelError;
use crate::model_dir::ModelDir;

/// Token ids and attention masks of a batch, row-major `[n, max_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    /// Number of texts.
    pub len: usize,
    /// Sequence length (77 for CLIP).
    pub max_len: usize,
    /// `input_ids`.
    pub input_ids: Vec<i64>,
    /// `attention_mask`.
    pub attention_mask: Vec<i64>,
}

impl TokenBatch {
    /// Ids of row `i`.
    pub fn ids(&self, i: usize) -> &[i64] {
        &self.input_ids[i * self.max_len..(i + 1) * self.max_len]
    }
    /// Mask of row `i`.
    pub fn mask(&self, i: usize) -> &[i64] {
        &self.attention_mask[i * self.max_len..(i + 1) * self.max_len]
    }
}

/// The CLIP tokenizer of a model directory.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    max_len: usize,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_len", &self.max_len)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TokenJson {
    Plain(String),
    Added { content: String },
}

impl TokenJson {
    fn content(self) -> String {
        match self {
            TokenJson::Plain(s) => s,
            TokenJson::Added { content } => content,
        }
    }
}

#[derive(Deserialize, Default)]
struct TokenizerConfigJson {
    #[serde(default)]
    model_max_length: Option<f64>,
    #[serde(default)]
    pad_token: Option<TokenJson>,
}

impl ClipTokenizer {
    /// Loads `tokenizer.json`; the maximum length comes from
    /// `tokenizer_config.json` (`model_max_length`), capped by
    /// `config.json`'s `text_config.max_position_embeddings` (77 if neither
    /// says); the pad token from `tokenizer_config.json` or
    /// `special_tokens_map.json` (`<|endoftext|>` if neither says).
    pub fn from_model_dir(dir: &ModelDir) -> Result<Self, ModelError> {
        let cfg: TokenizerConfigJson = match dir.optional("tokenizer_config.json") {
            Some(p) => crate::model_dir::read_json(&p)?,
            None => TokenizerConfigJson::default(),
        };
        let special: TokenizerConfigJson = match dir.optional("special_tokens_map.json") {
            Some(p) => crate::model_dir::read_json(&p)?,
            None => TokenizerConfigJson::default(),
        };
        let positions = dir.config.text_config.max_position_embeddings;
        // transformers uses a huge sentinel for "no limit".
        let from_cfg = cfg
            .model_max_length
            .filter(|&v| v > 0.0 && v < 1e9)
            .map(|v| v as usize);
        let max_len = match (from_cfg, positions) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => 77,
        };
        let pad_token = cfg
            .pad_token
            .or(special.pad_token)
            .map(TokenJson::content)
            .unwrap_or_else(|| "<|endoftext|>".to_string());
        Self::from_file(&dir.tokenizer, max_len, &pad_token)
    }

    /// Loads a `tokenizer.json` with an explicit length and pad token.
    pub fn from_file(path: &Path, max_len: usize, pad_token: &str) -> Result<Self, ModelError> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| ModelError::BadFile {
            path: path.to_path_buf(),
            reason: format!("not a tokenizers JSON file: {e}"),
        })?;
        let pad_id = inner
            .token_to_id(pad_token)
            .ok_or_else(|| ModelError::BadFile {
                path: path.to_path_buf(),
                reason: format!("pad token {pad_token:?} is not in the vocabulary"),
            })?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_len),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad_token.to_string(),
        }));
        Ok(ClipTokenizer {
            inner,
            max_len,
            pad_id,
        })
    }

    /// Sequence length of every row.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The pad token's id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Tokenizes a batch (with BOS/EOS, truncated, padded).
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<TokenBatch, ModelError> {
        let mut input_ids = Vec::with_capacity(texts.len() * self.max_len);
        let mut attention_mask = Vec::with_capacity(texts.len() * self.max_len);
        for text in texts {
            let enc = self
                .inner
                .encode(text.as_ref(), true)
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
            if enc.get_ids().len() != self.max_len {
                return Err(ModelError::Tokenizer(format!(
                    "expected {} tokens after padding, got {}",
                    self.max_len,
                    enc.get_ids().len()
                )));
            }
            input_ids.extend(enc.get_ids().iter().map(|&v| i64::from(v)));
            attention_mask.extend(enc.get_attention_mask().iter().map(|&v| i64::from(v)));
        }
        Ok(TokenBatch {
            len: texts.len(),
            max_len: self.max_len,
            input_ids,
            attention_mask,
        })
    }
}
