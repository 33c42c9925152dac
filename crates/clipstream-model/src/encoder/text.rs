//! The text tower: `input_ids` (int64 or int32) and an optional
//! `attention_mask` in, `text_embeds` out.

use ort::value::{Outlet, TensorElementType, TensorRef};
use std::path::Path;

use super::tower::{Tower, describe, tensor_info};
use crate::embedding::EmbeddingBatch;
use crate::error::ModelError;
use crate::runtime::RuntimeOptions;
use crate::tokenize::TokenBatch;

/// The text tower.
#[derive(Debug)]
pub struct TextEncoder {
    tower: Tower,
    ids: String,
    ids_type: TensorElementType,
    mask: Option<(String, TensorElementType)>,
}

impl TextEncoder {
    /// Loads `text_model*.onnx`; finds `input_ids` (int64 or int32), the
    /// optional `attention_mask`, and the `text_embeds` output.
    pub fn load(path: &Path, options: &RuntimeOptions) -> Result<Self, ModelError> {
        let tower = Tower::load("text", path, options, "text_embeds")?;
        let ids = tower
            .input(&["input_ids"])
            .ok_or_else(|| ModelError::BadGraph {
                path: path.to_path_buf(),
                reason: format!(
                    "no `input_ids` input (inputs: {})",
                    describe(tower.session.inputs())
                ),
            })?;
        let int_type = |o: &Outlet| -> Result<TensorElementType, ModelError> {
            match tensor_info(o) {
                Some((ty @ (TensorElementType::Int64 | TensorElementType::Int32), _)) => Ok(ty),
                other => Err(ModelError::BadGraph {
                    path: path.to_path_buf(),
                    reason: format!(
                        "input `{}` is {:?}; int64 or int32 expected",
                        o.name(),
                        other.map(|o| o.0)
                    ),
                }),
            }
        };
        let ids_type = int_type(ids)?;
        let ids = ids.name().to_string();
        let mask = match tower.input(&["attention_mask"]) {
            Some(m) => Some((m.name().to_string(), int_type(m)?)),
            None => None,
        };
        if let Some(extra) = tower
            .session
            .inputs()
            .iter()
            .find(|i| i.name() != ids && mask.as_ref().is_none_or(|(m, _)| i.name() != m))
        {
            return Err(ModelError::BadGraph {
                path: path.to_path_buf(),
                reason: format!(
                    "unexpected input `{}` (inputs: {}); a CLIP text tower takes input_ids and optionally attention_mask",
                    extra.name(),
                    describe(tower.session.inputs())
                ),
            });
        }
        Ok(TextEncoder {
            tower,
            ids,
            ids_type,
            mask,
        })
    }

    /// The execution provider in use.
    pub fn provider(&self) -> &'static str {
        self.tower.provider
    }

    /// Host CPU time of this tower's runs so far (see
    /// [`crate::encoder::VisionEncoder::cpu_time`]).
    pub fn cpu_time(&self) -> std::time::Duration {
        self.tower.cpu_time()
    }

    /// The ONNX file.
    pub fn path(&self) -> &Path {
        &self.tower.path
    }

    /// Embeds a tokenized batch.
    pub fn embed(&mut self, tokens: &TokenBatch) -> Result<EmbeddingBatch, ModelError> {
        if tokens.len == 0 {
            return Ok(EmbeddingBatch::empty());
        }
        let shape = [tokens.len as i64, tokens.max_len as i64];
        let as_i32 = |v: &[i64]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        let ids32;
        let mask32;
        let mut inputs: Vec<(
            std::borrow::Cow<'_, str>,
            ort::session::SessionInputValue<'_>,
        )> = Vec::with_capacity(2);
        match self.ids_type {
            TensorElementType::Int32 => {
                ids32 = as_i32(&tokens.input_ids);
                inputs.push((
                    self.ids.as_str().into(),
                    TensorRef::from_array_view((shape, ids32.as_slice()))?.into(),
                ));
            }
            _ => inputs.push((
                self.ids.as_str().into(),
                TensorRef::from_array_view((shape, tokens.input_ids.as_slice()))?.into(),
            )),
        }
        if let Some((name, ty)) = &self.mask {
            match ty {
                TensorElementType::Int32 => {
                    mask32 = as_i32(&tokens.attention_mask);
                    inputs.push((
                        name.as_str().into(),
                        TensorRef::from_array_view((shape, mask32.as_slice()))?.into(),
                    ));
                }
                _ => inputs.push((
                    name.as_str().into(),
                    TensorRef::from_array_view((shape, tokens.attention_mask.as_slice()))?.into(),
                )),
            }
        }
        let t = &mut self.tower;
        t.embed(tokens.len, |s| s.run(inputs))
    }
}
