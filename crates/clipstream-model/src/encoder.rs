//! The two towers as ONNX Runtime sessions.
//!
//! Input and output names are discovered from each session rather than
//! assumed, and the element types are adapted (float16 or float32 pixels,
//! int64 or int32 ids), so fp32, fp16 and quantized exports load alike.
//! Embeddings come back L2-normalised. `Session::run` takes `&mut self` in
//! ort 2.0.0-rc.15: a tower is used from one thread at a time.

use std::path::{Path, PathBuf};

use half::f16;
use ort::session::Session;
use ort::value::{Outlet, TensorElementType, TensorRef, ValueType};

use crate::error::ModelError;
use crate::runtime::{self, RuntimeOptions};
pub use crate::staging::PixelsMut;
use crate::staging::Staging;
use crate::tokenize::TokenBatch;

pub use crate::embedding::{EmbeddingBatch, dot, l2_normalize_rows};

/// What is common to both towers.
#[derive(Debug)]
struct Tower {
    session: Session,
    path: PathBuf,
    provider: &'static str,
    output: String,
    output_type: TensorElementType,
}

fn tensor_info(outlet: &Outlet) -> Option<(TensorElementType, Vec<i64>)> {
    match outlet.dtype() {
        ValueType::Tensor { ty, shape, .. } => Some((*ty, shape.iter().copied().collect())),
        _ => None,
    }
}

fn describe(outlets: &[Outlet]) -> String {
    outlets
        .iter()
        .map(|o| match tensor_info(o) {
            Some((ty, shape)) => format!("{} ({ty:?} {shape:?})", o.name()),
            None => o.name().to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Tower {
    fn load(path: &Path, options: &RuntimeOptions, output_name: &str) -> Result<Self, ModelError> {
        Self::load_from(path, None, options, output_name)
    }

    /// [`Tower::load`] of `bytes` (an edited `path`) when given.
    fn load_from(
        path: &Path,
        bytes: Option<&[u8]>,
        options: &RuntimeOptions,
        output_name: &str,
    ) -> Result<Self, ModelError> {
        let rt = runtime::init(options.library.as_deref())?;
        let ort_err =
            |e: ort::Error<ort::session::builder::SessionBuilder>| ModelError::Ort(e.to_string());
        let builder = Session::builder(&rt.environment)?;
        let (builder, provider) = runtime::apply_providers(builder, options)?;
        let threads = options.intra_threads_for(provider);
        let builder = match threads {
            Some(n) => builder.with_intra_threads(n).map_err(ort_err)?,
            None => builder,
        };
        let builder = builder
            .with_intra_op_spinning(options.spinning)
            .map_err(ort_err)?;
        let mut builder = builder
            .with_inter_op_spinning(options.spinning)
            .map_err(ort_err)?;
        let session = match bytes {
            Some(b) => builder.commit_from_memory(b),
            None => builder.commit_from_file(path),
        }
        .map_err(|e| ModelError::BadGraph {
            path: path.to_path_buf(),
            reason: format!("ONNX Runtime could not load it: {e}"),
        })?;
        let output = session
            .outputs()
            .iter()
            .find(|o| o.name() == output_name)
            .or_else(|| {
                session
                    .outputs()
                    .iter()
                    .find(|o| o.name().ends_with("embeds") || o.name().ends_with("embeddings"))
            })
            .ok_or_else(|| ModelError::BadGraph {
                path: path.to_path_buf(),
                reason: format!(
                    "no `{output_name}` output (outputs: {}); export the tower with its projection \
                     (CLIPVisionModelWithProjection / CLIPTextModelWithProjection)",
                    describe(session.outputs())
                ),
            })?;
        let (output_type, _) = tensor_info(output).ok_or_else(|| ModelError::BadGraph {
            path: path.to_path_buf(),
            reason: format!("output `{}` is not a tensor", output.name()),
        })?;
        if !matches!(
            output_type,
            TensorElementType::Float32 | TensorElementType::Float16
        ) {
            return Err(ModelError::BadGraph {
                path: path.to_path_buf(),
                reason: format!(
                    "output `{}` is {output_type:?}; float32 or float16 expected",
                    output.name()
                ),
            });
        }
        let output = output.name().to_string();
        tracing::info!(model = %path.display(), provider, threads = ?threads, spinning = options.spinning, "loaded tower");
        Ok(Tower {
            session,
            path: path.to_path_buf(),
            provider,
            output,
            output_type,
        })
    }

    fn input<'a>(&'a self, wanted: &[&str]) -> Option<&'a Outlet> {
        let inputs = self.session.inputs();
        wanted
            .iter()
            .find_map(|w| inputs.iter().find(|i| i.name() == *w))
    }

    fn extract(
        outputs: &ort::session::SessionOutputs<'_>,
        name: &str,
        ty: TensorElementType,
        rows: usize,
    ) -> Result<EmbeddingBatch, ModelError> {
        let value = &outputs[name];
        let (shape, data): (Vec<i64>, Vec<f32>) = match ty {
            TensorElementType::Float16 => {
                let (shape, data) = value.try_extract_tensor::<f16>()?;
                (
                    shape.iter().copied().collect(),
                    data.iter().map(|v| v.to_f32()).collect(),
                )
            }
            _ => {
                let (shape, data) = value.try_extract_tensor::<f32>()?;
                (shape.iter().copied().collect(), data.to_vec())
            }
        };
        if shape.len() != 2 || shape[0] as usize != rows {
            return Err(ModelError::Ort(format!(
                "output `{name}` has shape {shape:?}; expected [{rows}, dim]"
            )));
        }
        let dim = shape[1] as usize;
        let mut data = data;
        l2_normalize_rows(&mut data, dim);
        Ok(EmbeddingBatch { dim, data })
    }
}

/// What the image tower takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelInput {
    /// Rescaled, normalised floats, written by the host (as exported).
    #[default]
    Float,
    /// The resized, cropped bytes; the tower rescales and normalises them
    /// itself, exactly as the host would ([`crate::onnx_edit`], a graph
    /// edit made at load time): a quarter of the bytes, and on a GPU no
    /// float work on the host (on a CPU the tower's mapping costs more
    /// than the host's: see the README's Performance).
    Uint8,
}

/// The image tower.
#[derive(Debug)]
pub struct VisionEncoder {
    tower: Tower,
    input: String,
    input_type: TensorElementType,
    /// The GPU the session runs on, if any.
    device: Option<i32>,
    /// [`VisionEncoder::embed_filled`]'s buffer, made on first use.
    staging: Option<Staging>,
    /// See [`VisionEncoder::force_io_binding`].
    force_binding: Option<bool>,
}

impl VisionEncoder {
    /// Loads `vision_model*.onnx`; finds its pixel input (`pixel_values`, or
    /// the only rank-4 float input) and its `image_embeds` output.
    pub fn load(path: &Path, options: &RuntimeOptions) -> Result<Self, ModelError> {
        Self::load_with(path, options, None)
    }

    /// Loads `vision_model*.onnx` to take uint8 pixels: its `pixel_values`
    /// input becomes `pixel_bytes`, each byte mapped through `lut` (per
    /// channel; [`crate::ImagePreprocessor::lut`]) inside the graph.
    pub fn load_uint8(
        path: &Path,
        options: &RuntimeOptions,
        lut: &[[f32; 256]; 3],
    ) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::BadGraph {
            path: path.to_path_buf(),
            reason: format!("cannot read it: {e}"),
        })?;
        let edited =
            crate::onnx_edit::uint8_pixels(&bytes, "pixel_values", lut).map_err(|why| {
                ModelError::BadGraph {
                    path: path.to_path_buf(),
                    reason: format!("cannot give it a uint8 input: {why}"),
                }
            })?;
        drop(bytes);
        Self::load_with(path, options, Some(&edited))
    }

    fn load_with(
        path: &Path,
        options: &RuntimeOptions,
        bytes: Option<&[u8]>,
    ) -> Result<Self, ModelError> {
        let tower = Tower::load_from(path, bytes, options, "image_embeds")?;
        let input = tower
            .input(&[crate::onnx_edit::BYTES_INPUT, "pixel_values"])
            .or_else(|| {
                let floats: Vec<&Outlet> = tower
                    .session
                    .inputs()
                    .iter()
                    .filter(|i| {
                        tensor_info(i).is_some_and(|(ty, shape)| {
                            shape.len() == 4
                                && matches!(
                                    ty,
                                    TensorElementType::Float32 | TensorElementType::Float16
                                )
                        })
                    })
                    .collect();
                (floats.len() == 1).then(|| floats[0])
            })
            .ok_or_else(|| ModelError::BadGraph {
                path: path.to_path_buf(),
                reason: format!(
                    "no `pixel_values` input (inputs: {})",
                    describe(tower.session.inputs())
                ),
            })?;
        let (input_type, _) = tensor_info(input).unwrap_or((TensorElementType::Float32, vec![]));
        // Bytes only where the edit put them: a tower exported with a uint8
        // input of its own may expect something else of them.
        let bytes_ok = bytes.is_some() && input.name() == crate::onnx_edit::BYTES_INPUT;
        if !(matches!(
            input_type,
            TensorElementType::Float32 | TensorElementType::Float16
        ) || bytes_ok && input_type == TensorElementType::Uint8)
        {
            return Err(ModelError::BadGraph {
                path: path.to_path_buf(),
                reason: format!("input `{}` is {input_type:?}; float expected", input.name()),
            });
        }
        let input = input.name().to_string();
        let device = options
            .providers
            .iter()
            .find(|p| p.name() == tower.provider)
            .and_then(|p| p.device_id());
        Ok(VisionEncoder {
            tower,
            input,
            input_type,
            device,
            staging: None,
            force_binding: None,
        })
    }

    /// The execution provider in use (`cpu`, `cuda`, `tensorrt`).
    pub fn provider(&self) -> &'static str {
        self.tower.provider
    }

    /// What the tower takes.
    pub fn pixel_input(&self) -> PixelInput {
        if self.input_type == TensorElementType::Uint8 {
            PixelInput::Uint8
        } else {
            PixelInput::Float
        }
    }

    /// The `[n, 3, h, w]` shape of a batch of `len` values given as
    /// `given`; `None` for an empty batch, an error when the tower takes
    /// the other form.
    fn batch_shape(
        &self,
        given: PixelInput,
        len: usize,
        n: usize,
        (h, w): (usize, usize),
    ) -> Result<Option<[i64; 4]>, ModelError> {
        if n == 0 {
            return Ok(None);
        }
        match (self.pixel_input(), given) {
            (PixelInput::Float, PixelInput::Uint8) => {
                return Err(ModelError::Ort(
                    "this vision tower takes float pixels, not bytes".into(),
                ));
            }
            (PixelInput::Uint8, PixelInput::Float) => {
                return Err(ModelError::Ort(
                    "this vision tower takes bytes (embed_bytes), not floats".into(),
                ));
            }
            _ => {}
        }
        assert_eq!(len, n * 3 * h * w, "pixel buffer size");
        Ok(Some([n as i64, 3, h as i64, w as i64]))
    }

    /// Embeds `n` images given as resized, cropped bytes `[n, 3, h, w]`
    /// (a tower loaded with [`VisionEncoder::load_uint8`]).
    pub fn embed_bytes(
        &mut self,
        pixels: &[u8],
        n: usize,
        (h, w): (usize, usize),
    ) -> Result<EmbeddingBatch, ModelError> {
        let Some(shape) = self.batch_shape(PixelInput::Uint8, pixels.len(), n, (h, w))? else {
            return Ok(EmbeddingBatch::empty());
        };
        let t = &mut self.tower;
        let tensor = TensorRef::from_array_view((shape, pixels))?;
        let outputs = t.session.run(ort::inputs![self.input.as_str() => tensor])?;
        Tower::extract(&outputs, &t.output, t.output_type, n)
    }

    /// The ONNX file.
    pub fn path(&self) -> &Path {
        &self.tower.path
    }

    /// Embeds `n` images that `fill` writes straight into the tower's own
    /// input buffer, in the form the tower takes ([`PixelsMut::Float`],
    /// `[n, 3, h, w]` as [`VisionEncoder::embed`] takes them, or
    /// [`PixelsMut::Bytes`] for a [`VisionEncoder::load_uint8`] tower; an
    /// error from `fill` is returned as is). The buffer is kept from batch
    /// to batch. On a GPU provider it is pinned host memory, so the copy
    /// to the device is a DMA ([`VisionEncoder::pinned`]), and the batch
    /// goes in through ONNX Runtime's I/O binding; on the CPU the session
    /// reads it in place. On the CPU both ways give the embeddings of
    /// [`VisionEncoder::embed`] / [`VisionEncoder::embed_bytes`] bit for
    /// bit (tested); on a GPU, `scripts/gpu-check.sh` compares them with
    /// the CPU's.
    pub fn embed_filled(
        &mut self,
        n: usize,
        (h, w): (usize, usize),
        fill: impl FnOnce(PixelsMut<'_>) -> Result<(), ModelError>,
    ) -> Result<EmbeddingBatch, ModelError> {
        if n == 0 {
            return Ok(EmbeddingBatch::empty());
        }
        let shape = [n as i64, 3, h as i64, w as i64];
        let t = &mut self.tower;
        let staging = match &mut self.staging {
            Some(s) => s,
            None => self
                .staging
                .insert(Staging::new(&t.session, self.device, &t.output)?),
        };
        if let Some(on) = self.force_binding {
            staging.bind = on;
        }
        let (output, output_type) = (&t.output, t.output_type);
        staging.run(
            &mut t.session,
            &self.input,
            self.input_type,
            shape,
            fill,
            |outputs| Tower::extract(outputs, output, output_type, n),
        )
    }

    /// Runs [`VisionEncoder::embed_filled`] through ONNX Runtime's I/O
    /// binding (`Some(true)`) or `Session::run` (`Some(false)`) whatever
    /// the provider; `None`: binding on GPU providers only (the default).
    /// For tests of both paths.
    #[doc(hidden)]
    pub fn force_io_binding(&mut self, on: Option<bool>) {
        self.force_binding = on;
    }

    /// Whether [`VisionEncoder::embed_filled`] goes through I/O binding (a
    /// GPU provider, or [`VisionEncoder::force_io_binding`]).
    pub fn io_binding(&self) -> bool {
        self.force_binding.unwrap_or(self.device.is_some())
    }

    /// Whether [`VisionEncoder::embed_filled`]'s buffer is pinned host
    /// memory (a CUDA or TensorRT session whose pinned allocator answered;
    /// `false` until the first batch).
    pub fn pinned(&self) -> bool {
        self.staging.as_ref().is_some_and(Staging::pinned)
    }

    /// Embeds `n` preprocessed images laid out `[n, 3, h, w]` in `pixels`.
    pub fn embed(
        &mut self,
        pixels: &[f32],
        n: usize,
        (h, w): (usize, usize),
    ) -> Result<EmbeddingBatch, ModelError> {
        let Some(shape) = self.batch_shape(PixelInput::Float, pixels.len(), n, (h, w))? else {
            return Ok(EmbeddingBatch::empty());
        };
        let t = &mut self.tower;
        let outputs = match self.input_type {
            TensorElementType::Float16 => {
                let half: Vec<f16> = pixels.iter().map(|&v| f16::from_f32(v)).collect();
                let tensor = TensorRef::from_array_view((shape, half.as_slice()))?;
                t.session.run(ort::inputs![self.input.as_str() => tensor])?
            }
            _ => {
                let tensor = TensorRef::from_array_view((shape, pixels))?;
                t.session.run(ort::inputs![self.input.as_str() => tensor])?
            }
        };
        Tower::extract(&outputs, &t.output, t.output_type, n)
    }
}

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
        let tower = Tower::load(path, options, "text_embeds")?;
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
        let outputs = t.session.run(inputs)?;
        Tower::extract(&outputs, &t.output, t.output_type, tokens.len)
    }
}
