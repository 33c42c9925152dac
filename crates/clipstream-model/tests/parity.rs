//! Parity with Hugging Face `transformers` on the committed fixtures:
//! `tests/fixtures/reference.json` holds what `CLIPImageProcessorPil`,
//! `CLIPTokenizerFast` and the torch `CLIPModel` produced for the fixture
//! images, texts and label set (see `tests/fixtures/README.md`).
//!
//! Bars: every pixel value within one uint8 step, at least 99% of values
//! within 1e-6; identical token ids and masks; embeddings with cosine
//! >= 0.99999 and max |diff| <= 1e-4.
//!
//! These tests need ONNX Runtime: `scripts/fetch-onnxruntime.sh`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use clipstream_model::encoder::dot;
use clipstream_model::preprocess::PreprocessorConfig;
use clipstream_model::{
    ClipModel, ClipTokenizer, ImagePreprocessor, LabelSet, ModelDir, RuntimeOptions, Tower,
    Variant, VisionEncoder, ZeroShotHead,
};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[derive(Deserialize)]
struct Reference {
    model_dir: String,
    images: Vec<ImageRef>,
    images_exif_transposed: Vec<ImageRef>,
    texts: Vec<TextRef>,
    zero_shot: ZeroShotRef,
}

#[derive(Deserialize)]
struct ImageRef {
    file: String,
    pixel_values: String,
    #[serde(default)]
    image_embeds: Option<Vec<f32>>,
}

#[derive(Deserialize)]
struct TextRef {
    text: String,
    input_ids: Vec<i64>,
    attention_mask: Vec<i64>,
    text_embeds: Vec<f32>,
}

#[derive(Deserialize)]
struct ZeroShotRef {
    labels_file: String,
    class_embeds: Vec<Vec<f32>>,
    images: Vec<ScoresRef>,
}

#[derive(Deserialize)]
struct ScoresRef {
    file: String,
    scores: Vec<f32>,
}

fn reference() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(|| {
        let path = fixtures().join("reference.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run tests/fixtures/make_fixtures.py)",
                path.display()
            )
        });
        serde_json::from_str(&text).expect("reference.json parses")
    })
}

fn model_root() -> PathBuf {
    fixtures().join(&reference().model_dir)
}

/// One model for the whole test binary (sessions are not free to build).
fn model() -> std::sync::MutexGuard<'static, ClipModel> {
    static M: OnceLock<Mutex<ClipModel>> = OnceLock::new();
    M.get_or_init(|| {
        let m = ClipModel::load(model_root(), &Variant::Fp32, &RuntimeOptions::default())
            .unwrap_or_else(|e| panic!("loading the fixture model: {e}"));
        Mutex::new(m)
    })
    .lock()
    .unwrap_or_else(|e| e.into_inner())
}

fn read_npy_gz(rel: &str) -> (Vec<usize>, Vec<f32>) {
    let file = std::fs::File::open(fixtures().join(rel)).expect("reference npy.gz");
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut raw)
        .expect("gunzip");
    clipstream_model::npy::read_f32(raw.as_slice()).expect("npy")
}

fn preprocessor() -> ImagePreprocessor {
    let dir = ModelDir::open(model_root()).expect("model dir");
    ImagePreprocessor::new(PreprocessorConfig::from_file(&dir.preprocessor_config).expect("config"))
}

struct PixelStats {
    worst_steps: f64,
    exact_share: f64,
}

/// Compares pixel values; a "step" is one uint8 level after normalisation
/// (1 / 255 / std of the channel).
fn compare_pixels(pre: &ImagePreprocessor, ours: &[f32], theirs: &[f32]) -> PixelStats {
    assert_eq!(ours.len(), theirs.len());
    let plane = ours.len() / 3;
    let mut worst: f64 = 0.0;
    let mut exact = 0usize;
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let d = f64::from((a - b).abs());
        if d <= 1e-6 {
            exact += 1;
        }
        let step = pre.config.rescale_factor / pre.config.image_std[i / plane];
        worst = worst.max(d / step);
    }
    PixelStats {
        worst_steps: worst,
        exact_share: exact as f64 / ours.len() as f64,
    }
}

fn check_pixel_refs(pre: &ImagePreprocessor, refs: &[ImageRef]) {
    assert!(!refs.is_empty());
    let mut failures = Vec::new();
    let mut overall_worst: f64 = 0.0;
    let mut overall_exact: f64 = 1.0;
    for r in refs {
        let bytes = std::fs::read(fixtures().join(&r.file)).expect("fixture image");
        let ours = match pre.preprocess(&bytes) {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{}: {e}", r.file));
                continue;
            }
        };
        let (shape, theirs) = read_npy_gz(&r.pixel_values);
        assert_eq!(shape.iter().product::<usize>(), ours.len(), "{}", r.file);
        let s = compare_pixels(pre, &ours, &theirs);
        println!(
            "{:<44} worst {:.3} steps, exact {:.4}%",
            r.file,
            s.worst_steps,
            100.0 * s.exact_share
        );
        overall_worst = overall_worst.max(s.worst_steps);
        overall_exact = overall_exact.min(s.exact_share);
        if s.worst_steps > 1.0 + 1e-3 || s.exact_share < 0.99 {
            failures.push(format!(
                "{}: worst {:.3} uint8 steps, {:.4}% exact",
                r.file,
                s.worst_steps,
                100.0 * s.exact_share
            ));
        }
    }
    println!(
        "pixel parity over {} images: worst {overall_worst:.3} steps, lowest exact share {:.4}%",
        refs.len(),
        100.0 * overall_exact
    );
    assert!(
        failures.is_empty(),
        "pixel parity failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn pixel_values_match_transformers() {
    check_pixel_refs(&preprocessor(), &reference().images);
}

#[test]
fn exif_transposed_pixel_values_match_transformers() {
    let mut pre = preprocessor();
    pre.apply_exif_orientation = true;
    check_pixel_refs(&pre, &reference().images_exif_transposed);
    // And without the option, those files are not rotated (transformers' default).
    let r = &reference().images_exif_transposed[0];
    let plain = preprocessor()
        .preprocess(&std::fs::read(fixtures().join(&r.file)).expect("image"))
        .expect("decodes");
    let (_, rotated) = read_npy_gz(&r.pixel_values);
    assert_ne!(plain, rotated, "orientation must not be applied by default");
}

#[test]
fn token_ids_match_transformers() {
    let dir = ModelDir::open(model_root()).expect("model dir");
    let tok = ClipTokenizer::from_model_dir(&dir).expect("tokenizer");
    let texts: Vec<&str> = reference().texts.iter().map(|t| t.text.as_str()).collect();
    assert!(texts.len() >= 60, "corpus has {} strings", texts.len());
    let batch = tok.encode_batch(&texts).expect("encode");
    let mut mismatches = Vec::new();
    for (i, r) in reference().texts.iter().enumerate() {
        if batch.ids(i) != r.input_ids.as_slice() || batch.mask(i) != r.attention_mask.as_slice() {
            mismatches.push(format!(
                "{:?}\n  ours   {:?}\n  theirs {:?}",
                r.text,
                batch.ids(i),
                r.input_ids
            ));
        }
    }
    println!(
        "tokenizer parity: {} of {} identical",
        texts.len() - mismatches.len(),
        texts.len()
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn image_embeddings_match_transformers() {
    let mut m = model();
    let mut worst_cos: f32 = 1.0;
    let mut worst_diff: f32 = 0.0;
    let mut n = 0;
    for r in &reference().images {
        let Some(expected) = &r.image_embeds else {
            continue;
        };
        let bytes = std::fs::read(fixtures().join(&r.file)).expect("image");
        let ours = m
            .embed_image_bytes(&bytes)
            .expect("model")
            .expect("image decodes");
        assert_eq!(ours.len(), expected.len(), "{}", r.file);
        let cos = dot(&ours, expected);
        let diff = max_abs_diff(&ours, expected);
        worst_cos = worst_cos.min(cos);
        worst_diff = worst_diff.max(diff);
        n += 1;
        assert!(
            cos >= 0.99999 && diff <= 1e-4,
            "{}: cosine {cos}, max diff {diff}",
            r.file
        );
    }
    assert!(n > 0);
    println!(
        "image embeddings: {n} images, worst cosine {worst_cos:.7}, worst max|diff| {worst_diff:.2e}"
    );
}

#[test]
fn text_embeddings_match_transformers() {
    let mut m = model();
    let texts: Vec<&str> = reference().texts.iter().map(|t| t.text.as_str()).collect();
    let mut worst_cos: f32 = 1.0;
    let mut worst_diff: f32 = 0.0;
    for (chunk_i, chunk) in texts.chunks(32).enumerate() {
        let e = m.embed_texts(chunk).expect("embed");
        for (j, row) in e.rows().enumerate() {
            let r = &reference().texts[chunk_i * 32 + j];
            let cos = dot(row, &r.text_embeds);
            let diff = max_abs_diff(row, &r.text_embeds);
            worst_cos = worst_cos.min(cos);
            worst_diff = worst_diff.max(diff);
            assert!(
                cos >= 0.99999 && diff <= 1e-4,
                "{:?}: cosine {cos}, max diff {diff}",
                r.text
            );
        }
    }
    println!(
        "text embeddings: {} texts, worst cosine {worst_cos:.7}, worst max|diff| {worst_diff:.2e}",
        texts.len()
    );
}

#[test]
fn zero_shot_scores_match_transformers() {
    let zs = &reference().zero_shot;
    let set = LabelSet::from_file(&fixtures().join(&zs.labels_file)).expect("label set");
    let mut m = model();
    let head = ZeroShotHead::build(&set, &mut m).expect("head");
    for (ours, theirs) in head.class_embeddings().rows().zip(&zs.class_embeds) {
        assert!(
            dot(ours, theirs) >= 0.99999,
            "class embedding cosine {}",
            dot(ours, theirs)
        );
    }
    let mut worst: f32 = 0.0;
    for r in &zs.images {
        let bytes = std::fs::read(fixtures().join(&r.file)).expect("image");
        let e = m
            .embed_image_bytes(&bytes)
            .expect("model")
            .expect("decodes");
        let scores = head.scores(&e);
        let d = max_abs_diff(&scores, &r.scores);
        worst = worst.max(d);
        let argmax = |s: &[f32]| (0..s.len()).max_by(|&a, &b| s[a].total_cmp(&s[b]));
        assert_eq!(
            argmax(&scores),
            argmax(&r.scores),
            "{}: top-1 differs",
            r.file
        );
        assert!(d <= 1e-3, "{}: scores differ by {d}", r.file);
    }
    println!(
        "zero-shot: {} images, worst score diff {worst:.2e}",
        zs.images.len()
    );
}

#[test]
fn fp16_and_quantized_variants_load_and_agree() {
    let r = &reference().images[0];
    let expected = r
        .image_embeds
        .as_ref()
        .expect("first image has an embedding");
    let bytes = std::fs::read(fixtures().join(&r.file)).expect("image");
    // fp16 (float16 inputs and outputs): both towers, through the whole model.
    let mut m =
        ClipModel::load(model_root(), &Variant::Fp16, &RuntimeOptions::default()).expect("fp16");
    assert!(m.model_id().ends_with(":fp16"));
    let e = m
        .embed_image_bytes(&bytes)
        .expect("model")
        .expect("decodes");
    let cos = dot(&e, expected);
    println!("variant fp16: image cosine to fp32 reference {cos:.5}");
    assert!(cos >= 0.99, "fp16 image cosine {cos}");
    let t = &reference().texts[0];
    let e = m.embed_texts(&[t.text.as_str()]).expect("embed");
    let cos = dot(e.row(0), &t.text_embeds);
    println!("variant fp16: text cosine to fp32 reference {cos:.5}");
    assert!(cos >= 0.99, "fp16 text cosine {cos}");
    // Quantized (dynamic uint8): the fixture has the vision tower only.
    let dir = ModelDir::open(model_root()).expect("model dir");
    let path = dir
        .tower(Tower::Vision, &Variant::Quantized)
        .expect("quantized vision tower");
    assert!(path.ends_with("onnx/vision_model_quantized.onnx"));
    let mut vision = VisionEncoder::load(&path, &RuntimeOptions::default()).expect("quantized");
    let pre = preprocessor();
    let pixels = pre.preprocess(&bytes).expect("decodes");
    let e = vision
        .embed(&pixels, 1, pre.config.output_size())
        .expect("embed");
    let cos = dot(e.row(0), expected);
    println!("variant quantized: image cosine to fp32 reference {cos:.5}");
    assert!(cos >= 0.9, "quantized cosine {cos}");
}

/// A vision tower given a uint8 input at load time (rescale and normalise
/// inside the graph, from the preprocessor's own table) embeds every
/// fixture image bit for bit as the float path does, in fp32 and in fp16,
/// in one batch and one by one; the host writes a quarter of the bytes.
#[test]
fn uint8_input_embeds_bit_for_bit_as_the_float_path() {
    use clipstream_model::encoder::PixelInput;
    let m = model();
    let size = m.preprocessor.config.output_size();
    let per = m.preprocessor.pixels_len();
    let lut = m.preprocessor.lut();
    let images: Vec<Vec<u8>> = reference()
        .images
        .iter()
        .map(|r| std::fs::read(fixtures().join(&r.file)).expect("image"))
        .collect();
    let n = images.len();
    let mut floats = vec![0f32; n * per];
    let mut bytes = vec![0u8; n * per];
    for (k, img) in images.iter().enumerate() {
        m.preprocessor
            .preprocess_into(img, &mut floats[k * per..(k + 1) * per])
            .expect("float path");
        m.preprocessor
            .preprocess_bytes_into(img, &mut bytes[k * per..(k + 1) * per])
            .expect("byte path");
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let dir = ModelDir::open(model_root()).expect("model dir");
    for variant in [Variant::Fp32, Variant::Fp16] {
        let path = dir.tower(Tower::Vision, &variant).expect("vision");
        let mut float = VisionEncoder::load(&path, &RuntimeOptions::default()).expect("float");
        let mut uint8 =
            VisionEncoder::load_uint8(&path, &RuntimeOptions::default(), &lut).expect("uint8");
        assert_eq!(float.pixel_input(), PixelInput::Float);
        assert_eq!(uint8.pixel_input(), PixelInput::Uint8);
        let want = float.embed(&floats, n, size).expect("float embed");
        let got = uint8.embed_bytes(&bytes, n, size).expect("uint8 embed");
        assert_eq!(
            bits(&got.data),
            bits(&want.data),
            "{variant:?}: a batch of {n}"
        );
        for k in 0..n {
            let one = uint8
                .embed_bytes(&bytes[k * per..(k + 1) * per], 1, size)
                .expect("one");
            let dim = want.dim;
            assert_eq!(
                bits(&one.data),
                bits(&want.data[k * dim..(k + 1) * dim]),
                "{variant:?}: image {k} alone"
            );
        }
        // Each tower refuses the other's input.
        assert!(uint8.embed(&floats, n, size).is_err());
        assert!(float.embed_bytes(&bytes, n, size).is_err());
    }
}

/// `embed_filled` of `n` images copied from `floats` or `bytes`, as the
/// tower's buffer takes them; it must ask for the `form` it was loaded for.
fn fill_from(
    enc: &mut VisionEncoder,
    form: clipstream_model::encoder::PixelInput,
    n: usize,
    size: (usize, usize),
    floats: &[f32],
    bytes: &[u8],
) -> Result<clipstream_model::EmbeddingBatch, clipstream_model::ModelError> {
    use clipstream_model::encoder::{PixelInput, PixelsMut};
    enc.embed_filled(n, size, |buf| {
        match buf {
            PixelsMut::Float(dst) => {
                assert_eq!(form, PixelInput::Float, "a uint8 tower asked for floats");
                dst.copy_from_slice(floats);
            }
            PixelsMut::Bytes(dst) => {
                assert_eq!(form, PixelInput::Uint8, "a float tower asked for bytes");
                dst.copy_from_slice(bytes);
            }
        }
        Ok(())
    })
}

/// `embed_filled` (the pipeline's path: pixels written straight into the
/// tower's own input buffer, run through I/O binding) embeds bit for bit as
/// `embed` / `embed_bytes` do, for fp32, fp16 and uint8 towers, across
/// batches of changing size (the buffer grows; a bound output of the last
/// batch's shape would not fit) and repeated runs (a stale binding would
/// return the previous batch), through I/O binding (the GPU path) and
/// `Session::run`; an error from the filler is returned, and the next
/// batch still works.
#[test]
fn embed_filled_embeds_bit_for_bit_as_embed() {
    use clipstream_model::ModelError;
    use clipstream_model::encoder::PixelInput::{Float, Uint8};
    let m = model();
    let size = m.preprocessor.config.output_size();
    let per = m.preprocessor.pixels_len();
    let lut = m.preprocessor.lut();
    let images: Vec<Vec<u8>> = reference()
        .images
        .iter()
        .map(|r| std::fs::read(fixtures().join(&r.file)).expect("image"))
        .collect();
    let n = images.len();
    assert!(n >= 3, "the fixtures hold {n} images");
    let mut floats = vec![0f32; n * per];
    let mut bytes = vec![0u8; n * per];
    for (k, img) in images.iter().enumerate() {
        m.preprocessor
            .preprocess_into(img, &mut floats[k * per..(k + 1) * per])
            .expect("float path");
        m.preprocessor
            .preprocess_bytes_into(img, &mut bytes[k * per..(k + 1) * per])
            .expect("byte path");
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let dir = ModelDir::open(model_root()).expect("model dir");
    for (variant, binding) in [
        (Variant::Fp32, false),
        (Variant::Fp16, false),
        (Variant::Fp32, true),
        (Variant::Fp16, true),
    ] {
        let path = dir.tower(Tower::Vision, &variant).expect("vision");
        let opts = RuntimeOptions::default();
        let mut float = VisionEncoder::load(&path, &opts).expect("float");
        let mut uint8 = VisionEncoder::load_uint8(&path, &opts, &lut).expect("uint8");
        // Through I/O binding (the GPU's way, here without a device copy or
        // pinned memory) and directly (the CPU's way).
        float.force_io_binding(Some(binding));
        uint8.force_io_binding(Some(binding));
        let want = float.embed(&floats, n, size).expect("embed");
        let dim = want.dim;
        // One image, another of the same size (a stale input would give
        // the first one's), more (the buffer grows), all, one from the
        // middle, all again: sizes change and come back.
        let ranges = [0..1, 1..2, 0..n - 1, 0..n, 2..3, 0..n];
        for r in ranges {
            let rows = r.len();
            let expect = bits(&want.data[r.start * dim..r.end * dim]);
            let (fs, bs) = (
                &floats[r.start * per..r.end * per],
                &bytes[r.start * per..r.end * per],
            );
            for (enc, form) in [(&mut float, Float), (&mut uint8, Uint8)] {
                let got = fill_from(enc, form, rows, size, fs, bs).expect("embed_filled");
                assert_eq!(
                    bits(&got.data),
                    expect,
                    "{variant:?} {form:?} rows {r:?}, binding {binding}"
                );
            }
        }
        let err = float
            .embed_filled(2, size, |_| Err(ModelError::Ort("no pixels".into())))
            .expect_err("the filler's error");
        assert!(err.to_string().contains("no pixels"), "{err}");
        let again = fill_from(&mut float, Float, 1, size, &floats[..per], &bytes[..per])
            .expect("after an error");
        assert_eq!(bits(&again.data), bits(&want.data[..dim]));
    }
}
