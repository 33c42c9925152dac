//! What both towers share: an ONNX Runtime session loaded with the
//! configured providers and threads, its embeddings output found and
//! checked, and the output read back L2-normalised.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use half::f16;
use ort::session::{Session, SessionOutputs};
use ort::value::{Outlet, TensorElementType, ValueType};

use crate::cpu::{PoolThreads, PoolTime};
use crate::embedding::{EmbeddingBatch, l2_normalize_rows};
use crate::error::ModelError;
use crate::runtime::{self, RuntimeOptions};

/// What is common to both towers.
#[derive(Debug)]
pub(super) struct Tower {
    pub(super) session: Session,
    pub(super) path: PathBuf,
    pub(super) provider: &'static str,
    pub(super) output: String,
    pub(super) output_type: TensorElementType,
    /// CPU time of the session's pool threads (`ort-<name>`).
    pool_time: Arc<PoolTime>,
    /// CPU time of the calling threads inside the runs ([`Tower::embed`],
    /// the staging buffer's).
    pub(super) run_time: Duration,
}

pub(super) fn tensor_info(outlet: &Outlet) -> Option<(TensorElementType, Vec<i64>)> {
    match outlet.dtype() {
        ValueType::Tensor { ty, shape, .. } => Some((*ty, shape.iter().copied().collect())),
        _ => None,
    }
}

pub(super) fn describe(outlets: &[Outlet]) -> String {
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
    /// Loads the tower `name` (`vision`, `text`: its pool threads are
    /// named `ort-<name>`).
    pub(super) fn load(
        name: &str,
        path: &Path,
        options: &RuntimeOptions,
        output_name: &str,
    ) -> Result<Self, ModelError> {
        Self::load_from(name, path, None, options, output_name)
    }

    /// [`Tower::load`] of `bytes` (an edited `path`) when given.
    pub(super) fn load_from(
        name: &str,
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
        let pool_time = Arc::new(PoolTime::default());
        let mut builder = builder
            .with_inter_op_spinning(options.spinning)
            .map_err(ort_err)?
            .with_thread_manager(PoolThreads {
                name: format!("ort-{name}"),
                time: Arc::clone(&pool_time),
            })
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
            pool_time,
            run_time: Duration::ZERO,
        })
    }

    pub(super) fn input<'a>(&'a self, wanted: &[&str]) -> Option<&'a Outlet> {
        let inputs = self.session.inputs();
        wanted
            .iter()
            .find_map(|w| inputs.iter().find(|i| i.name() == *w))
    }

    /// Runs the session (`run` is given it), counting the calling
    /// thread's CPU time inside, and reads the `n` embeddings.
    pub(super) fn embed<'s>(
        &'s mut self,
        n: usize,
        run: impl FnOnce(&'s mut Session) -> ort::Result<SessionOutputs<'s>>,
    ) -> Result<EmbeddingBatch, ModelError> {
        let Tower {
            session,
            run_time,
            output,
            output_type,
            ..
        } = self;
        let outputs = crate::cpu::timed(run_time, || run(session))?;
        Tower::extract(&outputs, output, *output_type, n)
    }

    /// Host CPU time of the tower's runs so far: the callers' time inside
    /// the runs and the pool threads'.
    pub(super) fn cpu_time(&self) -> Duration {
        self.run_time.saturating_add(self.pool_time.total())
    }

    /// The pool threads' part of [`Tower::cpu_time`].
    pub(super) fn pool_cpu_time(&self) -> Duration {
        self.pool_time.total()
    }

    pub(super) fn extract(
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
