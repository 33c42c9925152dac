//! The `clipstream` binary on the committed fixtures: outputs, the zero-shot
//! bar on fresh shape images, and how bad inputs are reported.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model() -> PathBuf {
    fixtures().join("clip-tiny")
}

fn clipstream(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clipstream"))
        .args(args)
        .output()
        .expect("clipstream runs")
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn reference() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference.json")).expect("reference"),
    )
    .expect("json")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn embed_prints_reference_embeddings_for_images_and_texts() {
    let r = reference();
    let img = &r["images"][0];
    let txt = &r["texts"][3];
    let path = fixtures().join(img["file"].as_str().expect("file"));
    let out = clipstream(&[
        "embed",
        "--model",
        model().to_str().expect("utf8"),
        "--image",
        path.to_str().expect("utf8"),
        "--text",
        txt["text"].as_str().expect("text"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["kind"], "image");
    assert_eq!(lines[1]["kind"], "text");
    assert_eq!(lines[1]["input"], txt["text"]);
    let c = cosine(
        &floats(&lines[0]["embedding"]),
        &floats(&img["image_embeds"]),
    );
    assert!(c >= 0.99999, "image cosine {c}");
    let c = cosine(
        &floats(&lines[1]["embedding"]),
        &floats(&txt["text_embeds"]),
    );
    assert!(c >= 0.99999, "text cosine {c}");
}

#[test]
fn classify_gets_fresh_shapes_right() {
    let dir = fixtures().join("shapes-eval");
    let truth: serde_json::Map<String, Value> = serde_json::from_str(
        &std::fs::read_to_string(dir.join("labels.json")).expect("labels.json"),
    )
    .expect("json");
    let mut args: Vec<String> = vec![
        "classify".into(),
        "--model".into(),
        model().display().to_string(),
        "--labels".into(),
        fixtures().join("shapes-labels.toml").display().to_string(),
        "--top-k".into(),
        "3".into(),
    ];
    for name in truth.keys() {
        args.push("--image".into());
        args.push(dir.join(name).display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = clipstream(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&out);
    assert_eq!(lines.len(), truth.len());
    assert!(truth.len() >= 200);
    let mut correct = 0;
    for line in &lines {
        let input = PathBuf::from(line["input"].as_str().expect("input"));
        let name = input
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let labels = line["labels"].as_array().expect("labels");
        assert_eq!(labels.len(), 3);
        let s0 = labels[0]["score"].as_f64().expect("score");
        let s1 = labels[1]["score"].as_f64().expect("score");
        assert!(s0 >= s1, "best first");
        if labels[0]["label"] == truth[&name] {
            correct += 1;
        }
    }
    let acc = correct as f64 / lines.len() as f64;
    println!(
        "zero-shot top-1 on {} fresh shape images: {:.1}%",
        lines.len(),
        100.0 * acc
    );
    assert!(acc >= 0.90, "top-1 accuracy {acc}");
}

#[test]
fn bad_inputs_are_reported_and_the_rest_still_print() {
    let tmp = std::env::temp_dir().join(format!("clipstream-cli-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp");
    let not_image = tmp.join("notes.jpg");
    std::fs::write(&not_image, b"this is not a jpeg").expect("write");
    let truncated = tmp.join("truncated.jpg");
    let good = fixtures().join(reference()["images"][0]["file"].as_str().expect("file"));
    let jpeg =
        std::fs::read(fixtures().join("images/jpeg-baseline-420.jpg")).expect("jpeg fixture");
    std::fs::write(&truncated, &jpeg[..jpeg.len() / 2]).expect("write");
    let missing = tmp.join("missing.png");
    let out = clipstream(&[
        "embed",
        "--model",
        model().to_str().expect("utf8"),
        "--image",
        missing.to_str().expect("utf8"),
        "--image",
        not_image.to_str().expect("utf8"),
        "--image",
        truncated.to_str().expect("utf8"),
        "--image",
        good.to_str().expect("utf8"),
        "--text",
        "still here",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 2, "the good image and the text print");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 3, "{stderr}");
    assert!(
        errors[0].contains("missing.png") && errors[0].contains("No such file"),
        "{stderr}"
    );
    assert!(
        errors[1].contains("notes.jpg") && errors[1].contains("not a supported image"),
        "{stderr}"
    );
    assert!(
        errors[2].contains("truncated.jpg") && errors[2].contains("truncated"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn broken_model_dir_is_one_clear_line_and_exit_2() {
    let tmp = std::env::temp_dir().join(format!("clipstream-broken-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp");
    for f in ["config.json", "preprocessor_config.json", "tokenizer.json"] {
        std::fs::copy(model().join(f), tmp.join(f)).expect("copy");
    }
    let out = clipstream(&[
        "embed",
        "--model",
        tmp.to_str().expect("utf8"),
        "--text",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("vision_model.onnx not found"), "{stderr}");
    std::fs::remove_dir_all(&tmp).ok();

    let out = clipstream(&[
        "embed",
        "--model",
        model().to_str().expect("utf8"),
        "--ort-lib",
        "/nonexistent/libonnxruntime.so",
        "--text",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("scripts/fetch-onnxruntime.sh"), "{stderr}");

    let out = clipstream(&[
        "embed",
        "--model",
        model().to_str().expect("utf8"),
        "--provider",
        "cuda",
        "--text",
        "x",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "the CPU library has no CUDA provider"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cuda") && stderr.contains("onnxruntime-gpu"),
        "{stderr}"
    );
}

#[test]
fn cpu_fallback_is_explicit() {
    let out = clipstream(&[
        "embed",
        "--model",
        model().to_str().expect("utf8"),
        "--provider",
        "cuda",
        "--allow-cpu-fallback",
        "--text",
        "x",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("falling back to the CPU"));
}

#[test]
fn preprocess_and_tokenize_write_what_transformers_wrote() {
    let r = reference();
    let img = &r["images"][0];
    let tmp = std::env::temp_dir().join(format!("clipstream-pre-{}.npy", std::process::id()));
    let path = fixtures().join(img["file"].as_str().expect("file"));
    let out = clipstream(&[
        "preprocess",
        "--model",
        model().to_str().expect("utf8"),
        "--npy",
        tmp.to_str().expect("utf8"),
        path.to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (shape, ours) = read_npy(&std::fs::read(&tmp).expect("npy"));
    assert_eq!(shape, vec![1, 3, 224, 224]);
    let gz =
        std::fs::read(fixtures().join(img["pixel_values"].as_str().expect("path"))).expect("ref");
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut raw)
        .expect("gunzip");
    let (_, theirs) = read_npy(&raw);
    let exact = ours
        .iter()
        .zip(&theirs)
        .filter(|(a, b)| (*a - *b).abs() <= 1e-6)
        .count();
    assert!(exact as f64 >= 0.99 * ours.len() as f64);
    std::fs::remove_file(&tmp).ok();

    let t = &r["texts"][5];
    let out = clipstream(&[
        "tokenize",
        "--model",
        model().to_str().expect("utf8"),
        "--text",
        t["text"].as_str().expect("text"),
    ]);
    assert!(out.status.success());
    let lines = json_lines(&out);
    assert_eq!(lines[0]["input_ids"], t["input_ids"]);
    assert_eq!(lines[0]["attention_mask"], t["attention_mask"]);
}

/// Captions are data, whatever they look like: one that starts with a dash
/// (or is a lone `--`, or looks like an option) is a caption, not an
/// argument.
#[test]
fn captions_that_start_with_a_dash_are_accepted() {
    let texts = ["-- sale --", "-v", "--help", "-", "--", "- 50% off -"];
    let model = model();
    let mut args = vec!["tokenize", "--model", model.to_str().expect("utf8")];
    for t in &texts {
        args.extend(["--text", t]);
    }
    let out = clipstream(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&out);
    let got: Vec<&str> = lines
        .iter()
        .map(|l| l["text"].as_str().expect("text"))
        .collect();
    assert_eq!(got, texts);

    let mut args = vec!["embed", "--model", model.to_str().expect("utf8")];
    for t in &texts {
        args.extend(["--text", t]);
    }
    let out = clipstream(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&out);
    assert_eq!(lines.len(), texts.len());
    assert!(lines.iter().zip(&texts).all(|(l, t)| l["input"] == *t));
}

/// Minimal reader for the float32 .npy files the CLI writes.
fn read_npy(bytes: &[u8]) -> (Vec<usize>, Vec<f32>) {
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = String::from_utf8_lossy(&bytes[10..10 + hlen]);
    let shape: Vec<usize> = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("shape")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let data = bytes[10 + hlen..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (shape, data)
}

#[test]
fn validate_accepts_the_shipped_pipelines_and_lists_every_problem() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut shipped: Vec<String> = std::fs::read_dir(root.join("pipelines"))
        .expect("pipelines/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| p.display().to_string())
        .collect();
    shipped.sort();
    assert!(!shipped.is_empty());
    let mut args = vec!["validate"];
    args.extend(shipped.iter().map(String::as_str));
    let out = clipstream(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = std::env::temp_dir().join(format!("clipstream-bad-{}.toml", std::process::id()));
    std::fs::write(
        &bad,
        "[model]\ndir = \"m\"\ntop_k = 0\n[source]\nkind = \"files\"\n[sink.parquet]\ndir = \"o\"\nzstd_level = 99\n",
    )
    .expect("write");
    let out = clipstream(&["validate", bad.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "3 problem(s)",
        "model.top_k",
        "source: set `manifest`",
        "sink.parquet.zstd_level",
    ] {
        assert!(stderr.contains(needle), "{needle} missing from:\n{stderr}");
    }
    std::fs::write(&bad, "[model]\ndir = \"m\"\nbogus = 1\n").expect("write");
    let out = clipstream(&["validate", bad.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));
    std::fs::remove_file(&bad).ok();
}

/// The README's main job: `pipelines/local.toml` as shipped, run in a copy
/// of the repository's layout (so that the test writes nothing into the
/// checkout). Its good samples become rows and its bad ones dead letters.
#[test]
fn the_shipped_local_pipeline_runs_as_the_readme_says() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let copy = std::env::temp_dir().join(format!("clipstream-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&copy);
    let copy_file = |rel: &str| {
        let to = copy.join(rel);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(root.join(rel), &to).unwrap_or_else(|e| panic!("copy {rel}: {e}"));
    };
    copy_file("pipelines/local.toml");
    copy_file("pipelines/samples/shapes.jsonl");
    copy_file("tests/fixtures/shapes-labels.toml");
    for dir in ["tests/fixtures/shapes-eval", "tests/fixtures/clip-tiny"] {
        for entry in std::fs::read_dir(root.join(dir)).expect(dir).flatten() {
            if entry.file_type().expect("type").is_file() {
                let name = entry.file_name();
                copy_file(&format!("{dir}/{}", name.to_str().expect("utf8")));
            }
        }
    }
    // From the repository's root, with the relative path the README gives.
    let out = Command::new(env!("CARGO_BIN_EXE_clipstream"))
        .args(["run", "--no-progress", "pipelines/local.toml"])
        .current_dir(&copy)
        .output()
        .expect("clipstream runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = copy.join("out/local");
    let parquet = std::fs::read_dir(&written)
        .expect("out/local")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "parquet"))
        .count();
    assert!(parquet > 0, "no Parquet file in {}", written.display());
    let dead = std::fs::read_to_string(written.join("_dead_letters.jsonl")).expect("dead letters");
    assert!(
        dead.contains("scheme_not_allowed"),
        "the sample's https image is not a dead letter:\n{dead}"
    );
    assert!(
        !dead.contains("path_not_allowed"),
        "sample images were refused by fetch.root:\n{dead}"
    );
    std::fs::remove_dir_all(&copy).ok();
}

/// Numbers on the command line are hostile too: one out of range is a
/// usage error naming the argument (exit 2), never a panic.
#[test]
fn out_of_range_numbers_are_usage_errors() {
    let m = model();
    let m = m.to_str().expect("utf8");
    for (args, flag) in [
        (
            vec![
                "bench",
                "--model",
                m,
                "--seconds",
                "1e300",
                "--only",
                "text",
            ],
            "--seconds",
        ),
        (
            vec!["bench", "--model", m, "--seconds", "NaN", "--only", "text"],
            "--seconds",
        ),
        (
            vec!["bench", "--model", m, "--seconds=-1", "--only", "text"],
            "--seconds",
        ),
        (
            vec![
                "plan",
                "--catalog",
                "x.csv",
                "--night",
                "o",
                "--max-deleted-percent",
                "nan",
            ],
            "--max-deleted-percent",
        ),
        (
            vec!["plan", "--catalog", "x.csv", "--night", "o", "--rate=-5"],
            "--rate",
        ),
        (
            vec![
                "night",
                "--catalog",
                "x.csv",
                "--pipeline",
                "p.toml",
                "--snapshots",
                "s",
                "--work",
                "w",
                "--max-deleted-percent",
                "101",
            ],
            "--max-deleted-percent",
        ),
    ] {
        let out = clipstream(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
