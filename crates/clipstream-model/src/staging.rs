//! The vision tower's input buffer, kept from batch to batch and handed to
//! ONNX Runtime through I/O binding.
//!
//! A caller writes a batch's pixels straight into it
//! ([`crate::VisionEncoder::embed_filled`]): one copy per image, the same as
//! gathering them into a `Vec`, but into memory ONNX Runtime allocated. It
//! is kept between batches (a fresh multi-megabyte buffer per batch costs
//! page faults and zeroing). On a CUDA or TensorRT session that memory is
//! pinned
//! (page-locked, from the session's `CudaPinned` allocator), so the copy to
//! the device is a DMA the GPU drives instead of a staged copy through
//! pageable memory, and the batch goes in through ONNX Runtime's I/O
//! binding, with the output bound to host memory (bound, a buffer holds
//! exactly one batch size: the two sizes used last are kept, so full
//! batches and the odd partial one do not allocate, and a third size
//! allocates from the session's pinned arena). On the CPU provider the
//! session reads the buffer in place, one buffer that only grows.
//! Measured on CPU only: no GPU has run this yet.

use std::time::Duration;

use half::f16;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session, SessionOutputs};
use ort::value::{DynTensor, TensorElementType, TensorRef};

use crate::cpu::timed;
use crate::error::ModelError;

/// The batch buffer in the form the tower takes.
#[derive(Debug)]
pub enum PixelsMut<'a> {
    /// `[n, 3, h, w]` rescaled, normalised floats.
    Float(&'a mut [f32]),
    /// `[n, 3, h, w]` resized, cropped bytes (a tower loaded with
    /// [`crate::VisionEncoder::load_uint8`]).
    Bytes(&'a mut [u8]),
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Staging {
    // Declared (so dropped) first: the buffers, then what they came from.
    /// The buffers and the images each has room for: one that only grows
    /// (run directly), or, bound, one per batch size, the two sizes used
    /// last (full batches and the last partial one), most recent first.
    buffers: Vec<(usize, DynTensor)>,
    /// Floats for a float16 tower, converted into the buffer.
    scratch: Vec<f32>,
    /// Made on the first bound run.
    binding: Option<IoBinding>,
    /// Run through `binding` (GPU providers) rather than `Session::run`.
    pub(crate) bind: bool,
    /// The output, bound to host memory.
    output: String,
    allocator: Allocator,
    pinned: bool,
}

impl Staging {
    /// The buffer for `session`'s input; `output` comes back in host
    /// memory. `device` is the GPU's id on a GPU provider.
    pub(crate) fn new(
        session: &Session,
        device: Option<i32>,
        output: &str,
    ) -> Result<Self, ModelError> {
        let pinned = device.and_then(|id| {
            MemoryInfo::new(
                AllocationDevice::CUDA_PINNED,
                id,
                AllocatorType::Device,
                MemoryType::CPUInput,
            )
            .and_then(|info| Allocator::new(session, info))
            .inspect_err(|e| {
                tracing::warn!(error = %e, "no pinned host memory from this session; batches are copied to the device from ordinary memory")
            })
            .ok()
        });
        let is_pinned = pinned.is_some();
        tracing::info!(
            pinned = is_pinned,
            io_binding = device.is_some(),
            "vision input buffer"
        );
        Ok(Staging {
            buffers: Vec::new(),
            scratch: Vec::new(),
            binding: None,
            bind: device.is_some(),
            output: output.to_string(),
            allocator: pinned.unwrap_or_default(),
            pinned: is_pinned,
        })
    }

    /// Whether the buffer is pinned host memory.
    pub(crate) fn pinned(&self) -> bool {
        self.pinned
    }

    /// Lets `fill` write the batch of `shape` (`[n, 3, h, w]`) in `ty`'s
    /// form, runs `session` on it as `input` (the calling thread's CPU
    /// time in the run added to `run_time`), and hands the outputs to
    /// `read`.
    pub(crate) fn run<R>(
        &mut self,
        (session, run_time): (&mut Session, &mut Duration),
        input: &str,
        ty: TensorElementType,
        shape: [i64; 4],
        fill: impl FnOnce(PixelsMut<'_>) -> Result<(), ModelError>,
        read: impl FnOnce(&SessionOutputs<'_>) -> Result<R, ModelError>,
    ) -> Result<R, ModelError> {
        let n = shape[0] as usize;
        let len = shape.iter().map(|&d| d as usize).product::<usize>();
        // Bound, the buffer is the batch: exactly `n` images (ort clones a
        // borrowed view it is given to bind, and in rc.15 that clone
        // deadlocks on a CPU session; a raw tensor over part of the buffer
        // would take `unsafe`). Run directly, a view of the first `n`
        // images of one buffer that only grows.
        let found = if self.bind {
            self.buffers.iter().position(|(rows, _)| *rows == n)
        } else {
            self.buffers
                .first()
                .filter(|(rows, _)| *rows >= n)
                .map(|_| 0)
        };
        match found {
            Some(i) => {
                let b = self.buffers.remove(i);
                self.buffers.insert(0, b);
            }
            None => {
                // Nothing may point into a buffer once it is gone.
                if let Some(b) = &mut self.binding {
                    b.clear_inputs();
                }
                self.buffers.truncate(if self.bind { 1 } else { 0 });
                let b = DynTensor::new(&self.allocator, ty, shape)?;
                self.buffers.insert(0, (n, b));
            }
        }
        let (_, buffer) = &mut self.buffers[0];
        match ty {
            TensorElementType::Float32 => fill(PixelsMut::Float(
                &mut buffer.try_extract_tensor_mut::<f32>()?.1[..len],
            ))?,
            TensorElementType::Uint8 => fill(PixelsMut::Bytes(
                &mut buffer.try_extract_tensor_mut::<u8>()?.1[..len],
            ))?,
            TensorElementType::Float16 => {
                if self.scratch.len() < len {
                    self.scratch.resize(len, 0.0);
                }
                let scratch = &mut self.scratch[..len];
                fill(PixelsMut::Float(scratch))?;
                let dst = &mut buffer.try_extract_tensor_mut::<f16>()?.1[..len];
                for (d, s) in dst.iter_mut().zip(scratch.iter()) {
                    *d = f16::from_f32(*s);
                }
            }
            other => {
                return Err(ModelError::Ort(format!(
                    "a vision input of {other:?} cannot be staged"
                )));
            }
        }
        if self.bind {
            let binding = match &mut self.binding {
                Some(b) => b,
                None => self.binding.insert(session.create_binding()?),
            };
            binding.bind_input(input, &*buffer)?;
            // The copy to the device starts at binding, asynchronously:
            // done before the buffer can be written or freed again.
            binding.synchronize_inputs()?;
            // Afresh each run: a bound output keeps the tensor ONNX Runtime
            // allocated for the last batch, whose shape a batch of another
            // size does not fit.
            binding.bind_output_to_device(&self.output, &MemoryInfo::default())?;
            let outputs = timed(run_time, || session.run_binding(binding))?;
            return read(&outputs);
        }
        // The batch: a view of the buffer's first `n` images.
        let view = match ty {
            TensorElementType::Float32 => {
                let data = &buffer.try_extract_tensor::<f32>()?.1[..len];
                TensorRef::from_array_view((shape, data))?.into_dyn()
            }
            TensorElementType::Uint8 => {
                let data = &buffer.try_extract_tensor::<u8>()?.1[..len];
                TensorRef::from_array_view((shape, data))?.into_dyn()
            }
            _ => {
                let data = &buffer.try_extract_tensor::<f16>()?.1[..len];
                TensorRef::from_array_view((shape, data))?.into_dyn()
            }
        };
        let outputs = timed(run_time, || session.run(ort::inputs![input => view]))?;
        read(&outputs)
    }
}
