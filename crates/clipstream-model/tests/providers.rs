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

/// Names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|n| n.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_towers_runs_count_their_host_cpu_and_its_pool_threads_are_named() {
    let mut enc = VisionEncoder::load(
        &vision_model(),
        &RuntimeOptions {
            intra_threads: 2,
            ..RuntimeOptions::default()
        },
    )
    .expect("the tiny vision tower loads");
    assert!(
        thread_names().iter().any(|n| n == "ort-vision"),
        "ONNX Runtime's pool thread is spawned named: {:?}",
        thread_names()
    );
    let (n, side) = (8, 224);
    let pixels = vec![0.25f32; n * 3 * side * side];
    let mut last = enc.cpu_time();
    for round in 0..3 {
        enc.embed(&pixels, n, (side, side)).expect("embed");
        enc.embed_filled(n, (side, side), |b| match b {
            clipstream_model::encoder::PixelsMut::Float(dst) => {
                dst.fill(0.25);
                Ok(())
            }
            clipstream_model::encoder::PixelsMut::Bytes(_) => panic!("a float tower"),
        })
        .expect("embed_filled");
        let now = enc.cpu_time();
        assert!(now > last, "round {round}: {now:?} after {last:?}");
        last = now;
    }
    // 48 images of 224x224 through a ViT with 32-pixel patches: well over
    // a millisecond of CPU, well under the wall time of a slow machine.
    assert!(last > std::time::Duration::from_millis(1), "{last:?}");
    // Two intra-op threads: ONNX Runtime's pool thread did part of it, and
    // was counted.
    let pool = enc.pool_cpu_time();
    assert!(
        pool > std::time::Duration::ZERO && pool < last,
        "{pool:?} of {last:?}"
    );
}

/// A pixel buffer whose length does not match the batch is the caller's
/// error, returned, not a panic; a size whose product overflows too.
#[test]
fn a_pixel_buffer_of_the_wrong_length_is_an_error() {
    let mut v = load(vec![ExecutionProvider::Cpu], false).expect("loads");
    let err = v
        .embed(&[0.0; 10], 1, (224, 224))
        .expect_err("10 values for a 224x224 image");
    assert!(err.to_string().contains("150528 pixel values"), "{err}");
    let err = v
        .embed(&[0.0; 10], usize::MAX / 2, (224, 224))
        .expect_err("an overflowing size");
    assert!(err.to_string().contains("pixel values"), "{err}");
    let err = v
        .embed_filled(usize::MAX / 2, (224, 224), |_| Ok(()))
        .expect_err("an overflowing batch in the tower's buffer");
    assert!(err.to_string().contains("pixel values"), "{err}");
}
