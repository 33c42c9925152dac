//! Finding and loading ONNX Runtime, and choosing where the towers run.
//!
//! clipstream links ONNX Runtime at run time (ort's `load-dynamic`), so the
//! same binary runs on the CPU wheel's library or on the GPU wheel's. The
//! library is looked for, in order: an explicit path (config or `--ort-lib`),
//! `ORT_DYLIB_PATH`, the project cache that `scripts/fetch-onnxruntime.sh`
//! fills (`.cache/onnxruntime/`), and the `onnxruntime` Python package.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// The ONNX Runtime release ort 2.0.0-rc.15 is built against.
pub const ORT_VERSION: &str = "1.31.1";

/// Where and how to run ONNX Runtime.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeOptions {
    /// Path of `libonnxruntime.so`; default: looked up (see the module docs).
    #[serde(default)]
    pub library: Option<PathBuf>,
    /// Execution providers in order of preference. Default: `[cpu]`.
    #[serde(default = "default_providers")]
    pub providers: Vec<ExecutionProvider>,
    /// If the last listed provider cannot be registered, run on CPU instead
    /// of failing. Default: false (a GPU that was asked for and is missing is
    /// an error, unless a later provider is listed).
    #[serde(default)]
    pub allow_cpu_fallback: bool,
    /// Threads ONNX Runtime uses inside one CPU operator. 0 (the default)
    /// sizes the pool from where the tower runs: ONNX Runtime's own choice
    /// (one per physical core) on the CPU provider, one on a GPU provider
    /// (there the host threads only launch kernels, and every spare core is
    /// better spent decoding images; set it higher if many nodes of your
    /// graph fall back to the CPU).
    #[serde(default)]
    pub intra_threads: usize,
    /// Let ONNX Runtime's idle pool threads spin waiting for work. Default
    /// false: a pipeline's encoder waits for batches between runs, and
    /// spinning threads burn the cores that decode the next batch (with
    /// the bundled tiny model, spinning doubled the host CPU per record).
    /// Turn on only for a machine that does nothing but run the model.
    #[serde(default)]
    pub spinning: bool,
}

impl RuntimeOptions {
    /// The intra-op pool size for a tower whose registered provider is
    /// `provider` (see [`RuntimeOptions::intra_threads`]); `None`: ONNX
    /// Runtime's default.
    pub fn intra_threads_for(&self, provider: &str) -> Option<usize> {
        match (self.intra_threads, provider) {
            (0, "cpu") => None,
            (0, _) => Some(1),
            (n, _) => Some(n),
        }
    }
}

fn default_providers() -> Vec<ExecutionProvider> {
    vec![ExecutionProvider::Cpu]
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            library: None,
            providers: default_providers(),
            allow_cpu_fallback: false,
            intra_threads: 0,
            spinning: false,
        }
    }
}

/// One execution provider and its settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ExecutionProvider {
    /// ONNX Runtime's default CPU provider.
    Cpu,
    /// NVIDIA CUDA (needs the `onnxruntime-gpu` library, CUDA 13, cuDNN 9).
    Cuda {
        /// GPU ordinal. Default 0.
        #[serde(default)]
        device_id: i32,
        /// Arena limit in bytes; default: no limit.
        #[serde(default)]
        memory_limit_bytes: Option<usize>,
    },
    /// NVIDIA TensorRT (needs TensorRT 10 besides the CUDA libraries).
    #[serde(rename = "tensorrt")]
    TensorRt {
        /// GPU ordinal. Default 0.
        #[serde(default)]
        device_id: i32,
        /// Build fp16 engines. Default false.
        #[serde(default)]
        fp16: bool,
        /// Directory to cache built engines in (they take minutes to build).
        #[serde(default)]
        engine_cache_dir: Option<PathBuf>,
    },
}

impl ExecutionProvider {
    /// `cpu`, `cuda` or `tensorrt`.
    pub fn name(&self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "cpu",
            ExecutionProvider::Cuda { .. } => "cuda",
            ExecutionProvider::TensorRt { .. } => "tensorrt",
        }
    }

    /// The GPU's ordinal; `None` on the CPU.
    pub fn device_id(&self) -> Option<i32> {
        match self {
            ExecutionProvider::Cpu => None,
            ExecutionProvider::Cuda { device_id, .. }
            | ExecutionProvider::TensorRt { device_id, .. } => Some(*device_id),
        }
    }

    /// Parses the short CLI form: `cpu`, `cuda`, `cuda:1`, `tensorrt`,
    /// `tensorrt:0:fp16`.
    pub fn parse_short(s: &str) -> Result<Self, String> {
        let mut parts = s.split(':');
        let name = parts.next().unwrap_or_default();
        let device_id = match parts.next() {
            Some(d) => d
                .parse::<i32>()
                .map_err(|_| format!("bad device id {d:?} in {s:?}"))?,
            None => 0,
        };
        let flag = parts.next();
        match (name, flag) {
            ("cpu", None) => Ok(ExecutionProvider::Cpu),
            ("cuda", None) => Ok(ExecutionProvider::Cuda {
                device_id,
                memory_limit_bytes: None,
            }),
            ("tensorrt" | "trt", None | Some("fp16")) => Ok(ExecutionProvider::TensorRt {
                device_id,
                fp16: flag.is_some(),
                engine_cache_dir: None,
            }),
            _ => Err(format!(
                "unknown execution provider {s:?}: use cpu, cuda[:DEVICE] or tensorrt[:DEVICE[:fp16]]"
            )),
        }
    }
}

/// The loaded ONNX Runtime: the library it came from, and the environment
/// every session is built in.
#[derive(Debug)]
pub struct Runtime {
    /// The shared library that was loaded.
    pub library: PathBuf,
    /// ort's environment (process-wide).
    pub environment: ort::environment::Environment,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// Loads ONNX Runtime once per process. Later calls return the first
/// runtime; asking for a different library afterwards is an error (a process
/// can hold one ONNX Runtime only).
pub fn init(explicit: Option<&Path>) -> Result<&'static Runtime, ModelError> {
    if let Some(rt) = RUNTIME.get() {
        if let Some(p) = explicit
            && p != rt.library
        {
            return Err(ModelError::Runtime(format!(
                "ONNX Runtime is already loaded from {}; cannot load {} as well",
                rt.library.display(),
                p.display()
            )));
        }
        return Ok(rt);
    }
    let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let library = locate_library(explicit)?;
    let builder = ort::init_from(&library).map_err(|e| {
        ModelError::Runtime(format!(
            "could not load ONNX Runtime from {}: {e}. clipstream needs ONNX Runtime {ORT_VERSION} \
             (run scripts/fetch-onnxruntime.sh, or point --ort-lib / ORT_DYLIB_PATH at \
             libonnxruntime.so.{ORT_VERSION})",
            library.display()
        ))
    })?;
    let environment = builder
        .with_name("clipstream")
        .build()
        .map_err(|e| ModelError::Runtime(format!("ONNX Runtime environment: {e}")))?;
    tracing::info!(library = %library.display(), "loaded ONNX Runtime");
    Ok(RUNTIME.get_or_init(|| Runtime {
        library,
        environment,
    }))
}

/// Finds the ONNX Runtime library without loading it. The error lists every
/// place that was looked at and the command that fixes it.
pub fn locate_library(explicit: Option<&Path>) -> Result<PathBuf, ModelError> {
    let mut looked = Vec::new();
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        return Err(ModelError::Runtime(format!(
            "ONNX Runtime library {} (from --ort-lib or the config) does not exist; \
             run scripts/fetch-onnxruntime.sh or fix the path",
            p.display()
        )));
    }
    looked.push("--ort-lib / config `runtime.library`: not set".to_string());

    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            if p.is_file() {
                return Ok(p);
            }
            return Err(ModelError::Runtime(format!(
                "ORT_DYLIB_PATH={} does not exist; unset it or point it at libonnxruntime.so.{ORT_VERSION}",
                p.display()
            )));
        }
        _ => looked.push("ORT_DYLIB_PATH: not set".to_string()),
    }

    for dir in cache_dirs() {
        for flavour in ["gpu", "cpu"] {
            let lib = dir
                .join(format!("{flavour}-{ORT_VERSION}"))
                .join(format!("libonnxruntime.so.{ORT_VERSION}"));
            if lib.is_file() {
                return Ok(lib);
            }
        }
        looked.push(format!("{}: no library", dir.display()));
    }

    match python_package_library() {
        Ok(p) => return Ok(p),
        Err(why) => looked.push(format!("python3 `onnxruntime` package: {why}")),
    }

    Err(ModelError::Runtime(format!(
        "ONNX Runtime library not found. Looked at:\n  - {}\nFix: run `scripts/fetch-onnxruntime.sh` in the \
         clipstream checkout (fetches libonnxruntime.so.{ORT_VERSION} from the PyPI wheel into .cache/), \
         or pass --ort-lib PATH / set ORT_DYLIB_PATH",
        looked.join("\n  - ")
    )))
}

/// `.cache/onnxruntime` under the working directory, the directory of the
/// executable, and each of their parents (so `target/release/clipstream` finds
/// the checkout's cache). `CLIPSTREAM_CACHE_DIR` comes first when set.
fn cache_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(d) = std::env::var_os("CLIPSTREAM_CACHE_DIR") {
        out.push(PathBuf::from(d).join("onnxruntime"));
    }
    let mut starts = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(parent) = exe.parent()
    {
        starts.push(parent.to_path_buf());
    }
    for start in starts {
        for dir in start.ancestors() {
            let candidate = dir.join(".cache").join("onnxruntime");
            if candidate.is_dir() && !out.contains(&candidate) {
                out.push(candidate);
            }
        }
    }
    out
}

fn python_package_library() -> Result<PathBuf, String> {
    let output = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, onnxruntime; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .map_err(|_| "no python3".to_string())?;
    if !output.status.success() {
        return Err("not installed".to_string());
    }
    let capi = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let mut libs: Vec<PathBuf> = std::fs::read_dir(&capi)
        .map_err(|e| format!("{}: {e}", capi.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so."))
        })
        .collect();
    libs.sort();
    libs.pop()
        .ok_or_else(|| format!("no libonnxruntime.so.* in {}", capi.display()))
}

/// Registers the configured providers on a session builder, in order (all
/// of them: TensorRT then CUDA gives CUDA the nodes TensorRT cannot take;
/// ONNX Runtime's CPU provider is always last). Returns the builder and the
/// name of the first provider that registered.
///
/// A provider that cannot be registered is skipped with a warning when a
/// later one is listed or `allow_cpu_fallback` is set, and is an error
/// otherwise.
pub(crate) fn apply_providers(
    mut builder: ort::session::builder::SessionBuilder,
    options: &RuntimeOptions,
) -> Result<(ort::session::builder::SessionBuilder, &'static str), ModelError> {
    use ort::ep::ExecutionProvider as _;
    let mut active = None;
    for (i, provider) in options.providers.iter().enumerate() {
        let result = match provider {
            ExecutionProvider::Cpu => {
                active.get_or_insert("cpu");
                break;
            }
            ExecutionProvider::Cuda {
                device_id,
                memory_limit_bytes,
            } => {
                let mut ep = ort::ep::CUDA::default().with_device_id(*device_id);
                if let Some(limit) = memory_limit_bytes {
                    ep = ep.with_memory_limit(*limit);
                }
                check_available::<ort::ep::CUDA>("cuda")
                    .and_then(|()| ep.register(&mut builder).map_err(|e| e.to_string()))
            }
            ExecutionProvider::TensorRt {
                device_id,
                fp16,
                engine_cache_dir,
            } => {
                let mut ep = ort::ep::TensorRT::default()
                    .with_device_id(*device_id)
                    .with_fp16(*fp16);
                if let Some(dir) = engine_cache_dir {
                    ep = ep
                        .with_engine_cache(true)
                        .with_engine_cache_path(dir.display().to_string());
                }
                check_available::<ort::ep::TensorRT>("tensorrt")
                    .and_then(|()| ep.register(&mut builder).map_err(|e| e.to_string()))
            }
        };
        match result {
            Ok(()) => {
                active.get_or_insert(provider.name());
            }
            Err(reason) => {
                let reason = with_hint(provider.name(), &reason);
                let later = i + 1 < options.providers.len();
                if !later && !options.allow_cpu_fallback && active.is_none() {
                    return Err(ModelError::Provider {
                        provider: provider.name(),
                        reason,
                    });
                }
                tracing::warn!(provider = provider.name(), %reason, "execution provider not usable, skipping it");
            }
        }
    }
    let active = active.unwrap_or_else(|| {
        tracing::warn!("falling back to the CPU execution provider");
        "cpu"
    });
    Ok((builder, active))
}

fn check_available<E: ort::ep::ExecutionProvider>(name: &str) -> Result<(), String> {
    match E::is_available() {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "the loaded ONNX Runtime library was built without the {name} provider"
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn with_hint(provider: &str, reason: &str) -> String {
    let hint = match provider {
        "cuda" => {
            "use the library of the `onnxruntime-gpu` wheel (scripts/fetch-onnxruntime.sh --gpu) with \
             libonnxruntime_providers_cuda.so beside it, and make CUDA 13 (cudart, cuBLAS) and cuDNN 9 \
             findable through LD_LIBRARY_PATH; or set allow_cpu_fallback"
        }
        "tensorrt" => {
            "TensorRT 10 must be installed besides the CUDA 13 / cuDNN 9 libraries, with the \
             `onnxruntime-gpu` library; or set allow_cpu_fallback"
        }
        _ => "",
    };
    if hint.is_empty() {
        reason.to_string()
    } else {
        format!("{reason} (hint: {hint})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_short_provider_names() {
        assert_eq!(
            ExecutionProvider::parse_short("cpu"),
            Ok(ExecutionProvider::Cpu)
        );
        assert_eq!(
            ExecutionProvider::parse_short("cuda:1"),
            Ok(ExecutionProvider::Cuda {
                device_id: 1,
                memory_limit_bytes: None
            })
        );
        assert_eq!(
            ExecutionProvider::parse_short("tensorrt:0:fp16"),
            Ok(ExecutionProvider::TensorRt {
                device_id: 0,
                fp16: true,
                engine_cache_dir: None
            })
        );
        assert!(ExecutionProvider::parse_short("rocm").is_err());
        assert!(ExecutionProvider::parse_short("cuda:x").is_err());
    }

    #[test]
    fn explicit_missing_library_says_what_to_do() {
        let err = locate_library(Some(Path::new("/nonexistent/libonnxruntime.so")))
            .expect_err("missing file");
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/libonnxruntime.so"), "{msg}");
        assert!(msg.contains("scripts/fetch-onnxruntime.sh"), "{msg}");
    }

    #[test]
    fn providers_deserialize_from_toml() {
        #[derive(Deserialize)]
        struct W {
            runtime: RuntimeOptions,
        }
        let w: W = toml::from_str(
            r#"
            [runtime]
            allow_cpu_fallback = true
            providers = [{ kind = "tensorrt", fp16 = true }, { kind = "cuda", device_id = 1 }, { kind = "cpu" }]
            "#,
        )
        .expect("valid");
        assert_eq!(w.runtime.providers.len(), 3);
        assert!(w.runtime.allow_cpu_fallback);
    }
}
