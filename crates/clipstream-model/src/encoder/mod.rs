//! The two towers as ONNX Runtime sessions.
//!
//! Input and output names are discovered from each session rather than
//! assumed, and the element types are adapted (float16 or float32 pixels,
//! int64 or int32 ids), so fp32, fp16 and quantized exports load alike.
//! Embeddings come back L2-normalised. `Session::run` takes `&mut self` in
//! ort 2.0.0-rc.15: a tower is used from one thread at a time.

use std::path::Path;

use half::f16;
use ort::value::{Outlet, PrimitiveTensorElementType, TensorElementType, TensorRef};

use crate::error::ModelError;
use crate::runtime::RuntimeOptions;
pub use crate::staging::PixelsMut;
use crate::staging::Staging;

pub use self::text::TextEncoder;
use self::tower::{Tower, describe, tensor_info};
pub use crate::embedding::{EmbeddingBatch, dot, l2_normalize_rows};

mod text;
mod tower;

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
    /// [`VisionEncoder::embed_filled`]'s buffer, made on first use;
    /// declared (so dropped) before the session it was made for.
    staging: Option<Staging>,
    tower: Tower,
    input: String,
    input_type: TensorElementType,
    /// The GPU the session runs on, if any.
    device: Option<i32>,
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
        let tower = Tower::load_from("vision", path, bytes, options, "image_embeds")?;
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
        let (shape, need) = batch_dims(n, (h, w))?;
        if need != len {
            return Err(ModelError::Runtime(format!(
                "a batch of {n} images of {w}x{h} takes {need} pixel values, and {len} were given \
                 (a caller bug)"
            )));
        }
        Ok(Some(shape))
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
        self.run_view(shape, pixels, n)
    }

    /// Runs the tower on `data` laid out as `shape`, read in place.
    fn run_view<T: PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static>(
        &mut self,
        shape: [i64; 4],
        data: &[T],
        n: usize,
    ) -> Result<EmbeddingBatch, ModelError> {
        let tensor = TensorRef::from_array_view((shape, data))?;
        let input = self.input.as_str();
        self.tower
            .embed(n, |s| s.run(ort::inputs![input => tensor]))
    }

    /// Host CPU time of this tower's runs so far: ONNX Runtime's pool
    /// threads and the callers' time inside the runs (on the CPU provider,
    /// the inference itself; see [`crate::cpu`]).
    pub fn cpu_time(&self) -> std::time::Duration {
        self.tower.cpu_time()
    }

    /// ONNX Runtime's pool threads' part of [`VisionEncoder::cpu_time`]
    /// (for tests).
    #[doc(hidden)]
    pub fn pool_cpu_time(&self) -> std::time::Duration {
        self.tower.pool_cpu_time()
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
        let (shape, _) = batch_dims(n, (h, w))?;
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
        let Tower {
            session,
            run_time,
            output,
            output_type,
            ..
        } = t;
        staging.run(
            (session, run_time),
            &self.input,
            self.input_type,
            shape,
            fill,
            |outputs| Tower::extract(outputs, output, *output_type, n),
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
        match self.input_type {
            TensorElementType::Float16 => {
                let half: Vec<f16> = pixels.iter().map(|&v| f16::from_f32(v)).collect();
                self.run_view(shape, &half, n)
            }
            _ => self.run_view(shape, pixels, n),
        }
    }
}

/// The `[n, 3, h, w]` shape of a batch and how many values it holds; an
/// error where that does not fit the address space or ONNX Runtime's
/// dimensions.
fn batch_dims(n: usize, (h, w): (usize, usize)) -> Result<([i64; 4], usize), ModelError> {
    let values = [3, h, w].iter().try_fold(n, |a, &b| a.checked_mul(b));
    let dim = |v: usize| i64::try_from(v).ok();
    match (values, dim(n), dim(h), dim(w)) {
        (Some(values), Some(n), Some(h), Some(w)) => Ok(([n, 3, h, w], values)),
        _ => Err(ModelError::Runtime(format!(
            "a batch of {n} images of {w}x{h} takes more pixel values than fit in memory \
             (a caller bug)"
        ))),
    }
}
