//! Execution provider selection with the CPU build of ONNX Runtime (which
//! has no CUDA or TensorRT provider): a GPU that was asked for is an error
//! that says why, unless a later provider is listed or CPU fallback is
//! allowed. Needs ONNX Runtime: `scripts/fetch-onnxruntime.sh`.

use std::path::{Path, PathBuf};

use clipstream_model::{ExecutionProvider, ModelError, RuntimeOptions, VisionEncoder};

fn vision_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/clip-tiny/vision_model.onnx")
}

fn cuda() -> ExecutionProvider {
    ExecutionProvider::Cuda {
        device_id: 0,
        memory_limit_bytes: None,
    }
}

fn load(
    providers: Vec<ExecutionProvider>,
    allow_cpu_fallback: bool,
) -> Result<VisionEncoder, ModelError> {
    VisionEncoder::load(
        &vision_model(),
        &RuntimeOptions {
            providers,
            allow_cpu_fallback,
            ..RuntimeOptions::default()
        },
    )
}

/// Skipped where the loaded library does have CUDA (a GPU build): the
/// behaviour under test is the missing provider.
fn cpu_only_library() -> bool {
    let lib = clipstream_model::runtime::locate_library(None).expect("ONNX Runtime is fetched");
    !lib.parent()
        .is_some_and(|d| d.join("libonnxruntime_providers_cuda.so").exists())
}

#[test]
fn a_missing_gpu_is_an_error_unless_something_else_is_allowed() {
    if !cpu_only_library() {
        eprintln!("the GPU build of ONNX Runtime is loaded; this test is about the CPU build");
        return;
    }
    let err = load(vec![cuda()], false).expect_err("no CUDA in the CPU build");
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            ModelError::Provider {
                provider: "cuda",
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("onnxruntime-gpu"), "says what to do: {msg}");

    let v = load(vec![cuda(), ExecutionProvider::Cpu], false).expect("cpu listed after cuda");
    assert_eq!(v.provider(), "cpu");
    let v = load(vec![cuda()], true).expect("fallback allowed");
    assert_eq!(v.provider(), "cpu");
    let v = load(vec![ExecutionProvider::Cpu], false).expect("cpu");
    assert_eq!(v.provider(), "cpu");
}
