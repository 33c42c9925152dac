//! Shared helpers of the end-to-end tests: paths, running the binary,
//! building inputs with bad records of every kind, reading the outputs back
//! with independent readers (pyarrow for Parquet).

#![allow(dead_code)]

pub mod stack;
pub mod streaming;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clipstream_pipeline::config::PipelineConfig;
use serde_json::{Value, json};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The committed fixtures (`CLIPSTREAM_FIXTURES` points elsewhere, to try
/// the tests on another model and image set).
pub fn fixtures() -> PathBuf {
    std::env::var_os("CLIPSTREAM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("tests/fixtures"))
}

pub fn model() -> PathBuf {
    fixtures().join("clip-tiny")
}

/// The binary under test: this build's, or `CLIPSTREAM_TEST_BIN` (another
/// build — an older commit's, to see a test fail before its fix).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("CLIPSTREAM_TEST_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_clipstream").into())
    })
}

pub fn clipstream(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("clipstream runs")
}

/// A fresh directory under the target dir (kept on failure for inspection).
pub fn scratch(name: &str) -> PathBuf {
    let dir = root()
        .join("target/e2e")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// The Python that has pyarrow (scripts/test.sh sets CLIPSTREAM_TEST_PYTHON).
pub fn python() -> String {
    std::env::var("CLIPSTREAM_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs `cmd` to completion and fails the test, with its stderr, unless it
/// exits 0; `what` names it in the failure.
pub fn run_ok(cmd: &mut Command, what: &str) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what} does not start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A path as the text of an argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// The stdout of a command that must have succeeded (else its outputs).
pub fn stdout_of(out: &std::process::Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The stderr of a command that must have failed.
pub fn stderr_of(out: &std::process::Output, what: &str) -> String {
    assert!(!out.status.success(), "{what} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every row of the Parquet files under `dir`, read by pyarrow.
pub fn read_parquet(dir: &Path) -> Vec<Value> {
    let out = run_ok(
        Command::new(python())
            .arg(root().join("tests/helpers/parquet_dump.py"))
            .arg(dir),
        "parquet_dump.py (CLIPSTREAM_TEST_PYTHON: a Python with pyarrow)",
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json row"))
        .collect()
}

/// The dead letters of a local run.
pub fn read_dead_letters(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("dead letter line"))
        .collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_f64().expect("number") as f32)
                .collect()
        })
        .unwrap_or_default()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// An input of `n` events, a tenth of them bad (every kind the files
/// pipeline can meet), written as a manifest in `dir`.
pub struct Input {
    pub manifest: PathBuf,
    /// id -> (has image, has text) of every good event.
    pub good: BTreeMap<String, (bool, bool)>,
    /// offset -> expected dead-letter kind of every bad event.
    pub bad: BTreeMap<i64, &'static str>,
    /// Image files used, by id.
    pub images: HashMap<String, PathBuf>,
    /// Texts used, by id.
    pub texts: HashMap<String, String>,
}

/// Image files of the fixtures that are good inputs.
fn good_images() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures().join("shapes-eval"))
        .expect("shapes-eval")
        .flatten()
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("png" | "jpg")))
        .collect();
    v.sort();
    v
}

const COLOURS: [&str; 6] = ["red", "green", "blue", "yellow", "purple", "orange"];
const SHAPES: [&str; 4] = ["circle", "square", "triangle", "star"];

/// PNG bytes that declare `w` x `h` pixels but hold almost no data.
pub fn bomb_png(w: u32, h: u32) -> Vec<u8> {
    png_of(w, h, &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01])
}

/// An RGB PNG of `w` x `h` from its filtered scanlines (a filter byte,
/// then the row's bytes), deflated fast.
pub fn png_with_pixels(w: u32, h: u32, raw: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(raw).expect("deflate");
    png_of(w, h, &z.finish().expect("deflate"))
}

/// An RGB PNG of `w` x `h` with `idat` as its (zlib) image data.
fn png_of(w: u32, h: u32, idat: &[u8]) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let chunk = |ty: &[u8], data: &[u8]| {
        let mut v = (data.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(ty);
        v.extend_from_slice(data);
        let mut c = ty.to_vec();
        c.extend_from_slice(data);
        v.extend_from_slice(&crc32(&c).to_be_bytes());
        v
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", idat));
    png.extend(chunk(b"IEND", &[]));
    png
}

/// A PNG of one colour.
pub fn solid_png(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
    let row: Vec<u8> = std::iter::once(0)
        .chain(rgb.iter().copied().cycle().take(3 * w as usize))
        .collect();
    let raw = row.repeat(h as usize);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw).expect("deflate");
    png_of(w, h, &z.finish().expect("deflate"))
}

/// The bundled tiny CLIP with its vision tower replaced by `vision` (an
/// ONNX file), in a new model directory under `dir`.
pub fn model_with_vision(dir: &Path, vision: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).expect("model dir");
    for f in [
        "config.json",
        "preprocessor_config.json",
        "text_model.onnx",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(model().join(f), m.join(f)).expect("copy model file");
    }
    std::fs::copy(vision, m.join("vision_model.onnx")).expect("copy vision tower");
    m
}

/// Writes the bad-input files every test can reference.
fn bad_files(dir: &Path) -> HashMap<&'static str, PathBuf> {
    let mut m = HashMap::new();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).expect("write");
        p
    };
    m.insert(
        "not_an_image",
        write("notes.jpg", b"this is a text file, not a JPEG"),
    );
    let jpeg =
        std::fs::read(fixtures().join("images/jpeg-baseline-420.jpg")).expect("jpeg fixture");
    m.insert(
        "corrupt_image",
        write("truncated.jpg", &jpeg[..jpeg.len() / 3]),
    );
    m.insert(
        "image_too_many_pixels",
        write("bomb.png", &bomb_png(100_000, 100_000)),
    );
    m.insert("object_too_large", write("huge.png", &vec![7u8; 400_000]));
    m
}

/// A xorshift64 generator started from `seed` (made odd, never zero).
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// A generator seeded from the clock; the seed is printed, named `what`, so
/// that a failing run can be told apart and replayed.
pub fn clock_seeded(what: &str) -> impl FnMut() -> u64 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("{what} seed {seed}");
    xorshift(seed)
}

pub fn build_input(dir: &Path, n: usize, seed: u64) -> Input {
    let images = good_images();
    assert!(!images.is_empty());
    let bad_paths = bad_files(dir);
    let mut next = xorshift(seed);
    let mut input = Input {
        manifest: dir.join("events.jsonl"),
        good: BTreeMap::new(),
        bad: BTreeMap::new(),
        images: HashMap::new(),
        texts: HashMap::new(),
    };
    let mut f = std::fs::File::create(&input.manifest).expect("manifest");
    const BAD_KINDS: [&str; 11] = [
        "invalid_json",
        "invalid_utf8",
        "invalid_event",
        "empty_event",
        "event_too_large",
        "scheme_not_allowed",
        "object_not_found",
        "object_too_large",
        "not_an_image",
        "corrupt_image",
        "image_too_many_pixels",
    ];
    for i in 0..n {
        let offset = i as i64;
        let id = format!("rec-{i:05}");
        if i % 10 == 7 {
            let kind = BAD_KINDS[(i / 10) % BAD_KINDS.len()];
            let line: Vec<u8> = match kind {
                "invalid_json" => format!("{{\"id\": \"{id}\", \"text\": ").into_bytes(),
                "invalid_utf8" => {
                    let mut v = format!("{{\"id\": \"{id}\", \"text\": \"").into_bytes();
                    v.extend_from_slice(b"\xff\xfe\"}");
                    v
                }
                "invalid_event" => json!({"id": id, "text": 42}).to_string().into_bytes(),
                "empty_event" => json!({"id": id, "attributes": {"k": 1}}).to_string().into_bytes(),
                "event_too_large" => json!({"id": id, "text": "x".repeat(5000)}).to_string().into_bytes(),
                "scheme_not_allowed" => json!({"id": id, "image": "http://example.com/a.jpg"}).to_string().into_bytes(),
                "object_not_found" => json!({"id": id, "image": "images/does-not-exist.png"}).to_string().into_bytes(),
                k => json!({"id": id, "image": bad_paths[k].display().to_string(), "text": "bad image"})
                    .to_string()
                    .into_bytes(),
            };
            f.write_all(&line).expect("write");
            f.write_all(b"\n").expect("write");
            input.bad.insert(offset, kind);
            continue;
        }
        let r = next();
        let (has_image, has_text) = match r % 3 {
            0 => (true, false),
            1 => (false, true),
            _ => (true, true),
        };
        let mut ev = json!({"id": id, "attributes": {"n": i}});
        if has_image {
            let p = &images[(next() as usize) % images.len()];
            ev["image"] = json!(p.display().to_string());
            input.images.insert(id.clone(), p.clone());
        }
        if has_text {
            let t = format!(
                "a photo of a {} {} number {}",
                COLOURS[(next() % 6) as usize],
                SHAPES[(next() % 4) as usize],
                next() % 1000
            );
            ev["text"] = json!(t);
            input.texts.insert(id.clone(), t);
        }
        writeln!(f, "{ev}").expect("write");
        input.good.insert(id, (has_image, has_text));
    }
    input
}

/// The `[model]` section of the test pipelines: the bundled tiny CLIP and
/// the shapes label set, top 3.
pub fn model_section() -> String {
    format!(
        "[model]\ndir = \"{}\"\nlabels = \"{}\"\ntop_k = 3\n",
        model().display(),
        fixtures().join("shapes-labels.toml").display()
    )
}

/// The pipeline of a local run of `manifest` into `out`, as config values
/// (a test changes what it needs through the types, then
/// [`write_pipeline`] writes it).
pub fn local_config(
    dir: &Path,
    manifest: &Path,
    out: &Path,
    rows_per_file: usize,
) -> PipelineConfig {
    let text = format!(
        r#"
{model}
[source]
kind = "files"
manifest = "{manifest}"
max_event_bytes = 4096

[fetch]
max_object_bytes = 300000
# The scratch inputs and the fixtures: the repository.
root = "{root}"

[engine]
max_in_flight = 128
vision_batch = {{ max_size = 16, max_wait_ms = 10 }}
text_batch = {{ max_size = 32, max_wait_ms = 10 }}

[sink.parquet]
dir = "{out}"
max_rows_per_file = {rows_per_file}
row_group_rows = 64

[shutdown]
drain_deadline_secs = 30
"#,
        model = model_section(),
        manifest = manifest.display(),
        out = out.display(),
        root = root().display(),
    );
    parse_pipeline(&text, dir)
}

/// Parses a test pipeline with the parser the worker uses; a problem fails
/// the test with every reason and the text.
pub fn parse_pipeline(text: &str, dir: &Path) -> PipelineConfig {
    PipelineConfig::from_toml(text, dir, |_| None).unwrap_or_else(|p| {
        panic!(
            "the test pipeline is invalid: {}\n{text}",
            p.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )
    })
}

/// Writes `cfg` as `<name>.toml` in `dir`, checked by the same parser the
/// worker uses.
pub fn write_pipeline(dir: &Path, name: &str, cfg: &PipelineConfig) -> PathBuf {
    let text = toml::to_string(cfg).expect("the pipeline serialises");
    let back = parse_pipeline(&text, dir);
    assert_eq!(&back, cfg, "the pipeline does not survive its TOML");
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).expect("pipeline");
    p
}

/// A pipeline file for a local run of `manifest` into `out`.
pub fn local_pipeline(dir: &Path, manifest: &Path, out: &Path, rows_per_file: usize) -> PathBuf {
    write_pipeline(
        dir,
        "pipeline",
        &local_config(dir, manifest, out, rows_per_file),
    )
}

/// Checks the outputs of a completed input: every good id exactly once in
/// Parquet, every bad record exactly once among the dead letters with the
/// right kind, nothing else.
pub fn check_exactly_once(input: &Input, out: &Path) -> Vec<Value> {
    let rows = read_parquet(out);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &rows {
        *seen
            .entry(r["id"].as_str().expect("id").to_string())
            .or_default() += 1;
    }
    let dup: Vec<_> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k.clone())
        .collect();
    assert!(dup.is_empty(), "ids written more than once: {dup:?}");
    let missing: Vec<_> = input
        .good
        .keys()
        .filter(|k| !seen.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "{} good ids missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let extra: Vec<_> = seen
        .keys()
        .filter(|k| !input.good.contains_key(*k))
        .collect();
    assert!(extra.is_empty(), "unexpected ids in Parquet: {extra:?}");
    for r in &rows {
        let (has_image, has_text) = input.good[r["id"].as_str().expect("id")];
        assert_eq!(!r["image_embedding"].is_null(), has_image, "{r}");
        assert_eq!(!r["text_embedding"].is_null(), has_text, "{r}");
        assert_eq!(!r["labels"].is_null(), has_image, "labels for images only");
        assert_eq!(!r["clip_score"].is_null(), has_image && has_text);
    }

    let dead = read_dead_letters(&out.join("_dead_letters.jsonl"));
    let mut by_offset: HashMap<i64, Vec<&Value>> = HashMap::new();
    for d in &dead {
        by_offset
            .entry(d["offset"].as_i64().expect("offset"))
            .or_default()
            .push(d);
    }
    for (offset, kind) in &input.bad {
        let got = by_offset.get(offset).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(
            got.len(),
            1,
            "offset {offset} ({kind}) has {} dead letters",
            got.len()
        );
        assert_eq!(got[0]["kind"], *kind, "offset {offset}: {}", got[0]);
        assert!(!got[0]["reason"].as_str().unwrap_or_default().is_empty());
    }
    assert_eq!(
        dead.len(),
        input.bad.len(),
        "dead letters for good records?"
    );
    rows
}

/// One HTTP/1.1 GET over loopback: (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("response");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The sum of a metric's samples in an exposition text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Fails unless every metric of `names` has a sample line in `text`.
pub fn assert_metrics(text: &str, names: &[&str]) {
    for name in names {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing:\n{text}"
        );
    }
}

/// `promtool check metrics` on an exposition text (lint: names, units,
/// HELP/TYPE); promtool comes with Prometheus (scripts/install-prometheus.sh).
pub fn promtool_check(text: &str) {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs (scripts/install-prometheus.sh installs it)");
    p.stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let o = p.wait_with_output().expect("promtool");
    assert!(
        o.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
