//! `[image] mode = "fast"` against exact mode on generated photos from
//! 640x480 to 4000x3000 (both orientations): fast mode must really decode
//! at a reduced DCT scale, keep the model's input geometry, and give image
//! embeddings with cosine >= 0.999 on average and >= 0.995 at worst to exact
//! mode's (the bundled tiny CLIP).
//!
//! Needs ONNX Runtime: `scripts/fetch-onnxruntime.sh`.

use std::path::{Path, PathBuf};

use clipstream_model::encoder::dot;
use clipstream_model::preprocess::ImageMode;
use clipstream_model::{ClipModel, RuntimeOptions, Variant};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/clip-tiny")
}

/// A photo-like scene: soft gradients, a few discs and sensor noise,
/// scaled with the image (a large photo is the same scene, finer).
fn photo(w: usize, h: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let s = w.min(h) as f32 / 480.0;
    let discs: Vec<(f32, f32, f32, [f32; 3])> = (0..4)
        .map(|_| {
            (
                (rand() % w as u64) as f32,
                (rand() % h as u64) as f32,
                s * (30.0 + (rand() % 100) as f32),
                [
                    (rand() % 256) as f32,
                    (rand() % 256) as f32,
                    (rand() % 256) as f32,
                ],
            )
        })
        .collect();
    let (fx, fy) = (
        s * (25.0 + (rand() % 40) as f32),
        s * (25.0 + (rand() % 40) as f32),
    );
    let mut rgb = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let (xf, yf) = (x as f32, y as f32);
            let mut px = [
                128.0 + 90.0 * (xf / fx).sin(),
                128.0 + 80.0 * (yf / fy).cos(),
                255.0 * xf / w as f32,
            ];
            for (cx, cy, r, col) in &discs {
                if (xf - cx).powi(2) + (yf - cy).powi(2) < r * r {
                    px = *col;
                }
            }
            for (c, v) in px.iter().enumerate() {
                let noise = (rand() % 25) as f32 - 12.0;
                rgb[(y * w + x) * 3 + c] = (v + noise).clamp(0.0, 255.0) as u8;
            }
        }
    }
    rgb
}

fn jpeg(rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
    let mut comp = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
    comp.set_fastest_defaults();
    comp.set_size(w, h);
    comp.set_quality(90.0);
    let mut started = comp.start_compress(Vec::new()).expect("start");
    started.write_scanlines(rgb).expect("scanlines");
    started.finish().expect("finish")
}

#[test]
fn fast_mode_embeddings_stay_close_to_exact_mode() {
    let mut model = ClipModel::load(model_dir(), &Variant::Fp32, &RuntimeOptions::default())
        .unwrap_or_else(|e| panic!("loading the fixture model: {e}"));
    let exact = model.preprocessor.clone();
    let mut fast = exact.clone();
    fast.mode = ImageMode::Fast;
    let sizes = [
        (640, 480),
        (480, 640),
        (800, 600),
        (1024, 768),
        (1600, 1200),
        (1200, 1600),
        (2048, 1536),
        (3000, 2000),
        (4000, 3000),
    ];
    let mut cosines = Vec::new();
    for (k, &(w, h)) in sizes.iter().enumerate() {
        for seed in 0..3u64 {
            let bytes = jpeg(&photo(w, h, 0x5EED + 7919 * (k as u64 * 3 + seed)), w, h);
            // Fast mode really decodes fewer pixels, and knows the full size.
            let d = fast.decode(&bytes).expect("fast decode");
            assert_eq!(d.full_size, (w, h));
            assert!(
                d.rgb.width < w && d.rgb.height < h,
                "{w}x{h}: fast mode decoded {}x{}",
                d.rgb.width,
                d.rgb.height
            );
            // ... but never fewer than the resize target has.
            let (rh, rw) = exact.config.resized_size(h, w);
            assert!(d.rgb.width >= rw && d.rgb.height >= rh, "{w}x{h}");
            let a = exact.preprocess(&bytes).expect("exact");
            let b = fast.preprocess(&bytes).expect("fast");
            assert_ne!(a, b, "{w}x{h}: fast mode gave exact mode's pixels");
            // How far the model inputs are, in uint8 steps (a model that
            // sees finer detail than the tiny one feels these).
            let plane = a.len() / 3;
            let steps: Vec<f64> = a
                .iter()
                .zip(&b)
                .enumerate()
                .map(|(i, (x, y))| {
                    let step = exact.config.rescale_factor / exact.config.image_std[i / plane];
                    f64::from((x - y).abs()) / step
                })
                .collect();
            let mean = steps.iter().sum::<f64>() / steps.len() as f64;
            let max = steps.iter().copied().fold(0.0, f64::max);
            let mut both = a;
            both.extend_from_slice(&b);
            let e = model.embed_pixels(&both, 2).expect("embed");
            let cos = dot(e.row(0), e.row(1));
            println!(
                "{w}x{h} seed {seed}: cosine {cos:.6}; pixels differ by {mean:.2} uint8 steps on average, {max:.0} at most"
            );
            cosines.push(cos);
        }
    }
    let mean = cosines.iter().sum::<f32>() / cosines.len() as f32;
    let worst = cosines.iter().copied().fold(f32::INFINITY, f32::min);
    println!(
        "fast vs exact over {} photos: mean cosine {mean:.6}, worst {worst:.6}",
        cosines.len()
    );
    assert!(mean >= 0.999, "mean cosine {mean}");
    assert!(worst >= 0.995, "worst cosine {worst}");
}

#[test]
fn fast_mode_leaves_small_images_and_other_formats_exact() {
    let model = ClipModel::load(model_dir(), &Variant::Fp32, &RuntimeOptions::default())
        .unwrap_or_else(|e| panic!("loading the fixture model: {e}"));
    let exact = model.preprocessor.clone();
    let mut fast = exact.clone();
    fast.mode = ImageMode::Fast;
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images");
    // Too small to scale (the resize target needs every pixel), or not a
    // JPEG: fast mode is exact mode.
    for name in [
        "jpeg-224x224.jpg",
        "jpeg-50x40.jpg",
        "png-rgb.png",
        "webp-lossy.webp",
    ] {
        let bytes = std::fs::read(images.join(name)).expect("fixture");
        assert_eq!(
            exact.preprocess(&bytes).expect("exact"),
            fast.preprocess(&bytes).expect("fast"),
            "{name}"
        );
    }
}
