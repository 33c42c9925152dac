//! The main job end to end, through the binary: `clipstream run` on a local
//! manifest of 2,000 mixed events (a tenth of them bad, of every kind),
//! crashes with SIGKILL and reruns, and a graceful SIGTERM.

#[path = "support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

#[test]
fn two_thousand_mixed_records_exactly_once() {
    let dir = scratch("local-2000");
    let input = build_input(&dir, 2000, 42);
    let out = dir.join("out");
    let pipeline = local_pipeline(&dir, &input.manifest, &out, 500);
    let run = clipstream(&["run", "--no-progress", pipeline.to_str().expect("utf8")]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("dead letters"), "{stdout}");
    let rows = check_exactly_once(&input, &out);

    // Files hold contiguous ranges and are named by their first offset.
    let mut files: Vec<(String, i64)> = Vec::new();
    for r in &rows {
        let f = r["file"].as_str().expect("file").to_string();
        let o = r["offset"].as_i64().expect("offset");
        match files.iter_mut().find(|(n, _)| *n == f) {
            Some((_, first)) => *first = (*first).min(o),
            None => files.push((f, o)),
        }
    }
    for (name, first) in &files {
        assert_eq!(name, &format!("events-0-{first:010}.parquet"));
    }
    assert_eq!(files.len(), input.good.len().div_ceil(500));

    // The same embeddings as `clipstream embed` gives, for a sample.
    let mut args: Vec<String> = vec![
        "embed".into(),
        "--model".into(),
        model().display().to_string(),
    ];
    let sample_images: Vec<(&String, &std::path::PathBuf)> = input.images.iter().take(12).collect();
    let sample_texts: Vec<(&String, &String)> = input.texts.iter().take(12).collect();
    for (_, p) in &sample_images {
        args.push("--image".into());
        args.push(p.display().to_string());
    }
    for (_, t) in &sample_texts {
        args.push("--text".into());
        args.push((*t).clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let embed = clipstream(&args);
    assert!(embed.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&embed.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let row_of = |id: &str| rows.iter().find(|r| r["id"] == id).expect("row");
    for (i, (id, _)) in sample_images.iter().enumerate() {
        let c = cosine(
            &floats(&lines[i]["embedding"]),
            &floats(&row_of(id)["image_embedding"]),
        );
        assert!(c >= 0.99999, "{id}: image cosine {c}");
    }
    for (i, (id, _)) in sample_texts.iter().enumerate() {
        let l = &lines[sample_images.len() + i];
        let c = cosine(
            &floats(&l["embedding"]),
            &floats(&row_of(id)["text_embedding"]),
        );
        assert!(c >= 0.99999, "{id}: text cosine {c}");
    }

    // A rerun finds everything done.
    let again = clipstream(&["run", "--no-progress", pipeline.to_str().expect("utf8")]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("skipped: already written"));
    check_exactly_once(&input, &out);
}

#[test]
fn sigkill_at_random_moments_then_rerun_loses_and_duplicates_nothing() {
    let dir = scratch("local-kill");
    let input = build_input(&dir, 3000, 7);
    let out = dir.join("out");
    let pipeline = local_pipeline(&dir, &input.manifest, &out, 40);
    let mut next = xorshift(0x2545_F491_4F6C_DD1D);
    let mut kills = 0;
    let mut finished = false;
    for round in 0..12 {
        let started = Instant::now();
        let mut child = Command::new(bin())
            .args(["run", "--no-progress", pipeline.to_str().expect("utf8")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let wait = Duration::from_millis(300 + next() % 2200);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                assert!(status.success(), "round {round}: run failed");
                finished = true;
                break;
            }
            if started.elapsed() >= wait {
                child.kill().expect("SIGKILL");
                child.wait().expect("reap");
                kills += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if finished && kills >= 5 {
            break;
        }
        if finished {
            // Finished before enough kills: start over on a fresh output.
            std::fs::remove_dir_all(&out).expect("reset");
            finished = false;
        }
    }
    assert!(kills >= 5, "only {kills} kills happened");
    if !finished {
        let last = clipstream(&["run", "--no-progress", pipeline.to_str().expect("utf8")]);
        assert!(
            last.status.success(),
            "{}",
            String::from_utf8_lossy(&last.stdout)
        );
    }
    println!("killed {kills} times");
    check_exactly_once(&input, &out);
}

#[test]
fn sigterm_drains_closes_files_and_a_rerun_completes_without_duplicates() {
    let dir = scratch("local-term");
    let input = build_input(&dir, 6000, 99);
    let out = dir.join("out");
    let pipeline = local_pipeline(&dir, &input.manifest, &out, 100);
    let child = Command::new(bin())
        .args(["run", "--no-progress", pipeline.to_str().expect("utf8")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Stop once the first file is complete: well inside the run on any machine.
    let started = Instant::now();
    while !std::fs::read_dir(&out)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
        })
        .unwrap_or(false)
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no file was completed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(kill.success());
    let t = Instant::now();
    let output = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "drained within the deadline"
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "stopped early is not a clean finish\n{stdout}\n{stderr}"
    );
    assert!(stderr.contains("stopping"), "{stderr}");
    assert!(
        stdout.contains("stopped before the end of the input"),
        "{stdout}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .expect("out")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "open files were closed");
    let partial = read_parquet(&out).len();
    assert!(
        partial > 0 && partial < input.good.len(),
        "{partial} rows after SIGTERM"
    );

    let rerun = clipstream(&["run", "--no-progress", pipeline.to_str().expect("utf8")]);
    assert!(
        rerun.status.success(),
        "{}",
        String::from_utf8_lossy(&rerun.stdout)
    );
    check_exactly_once(&input, &out);
}

#[test]
fn a_directory_of_images_with_caption_sidecars() {
    let dir = scratch("local-dir");
    let images = dir.join("photos");
    std::fs::create_dir_all(images.join("nested")).expect("mkdir");
    let eval = fixtures().join("shapes-eval");
    let mut sources: Vec<_> = std::fs::read_dir(&eval)
        .expect("shapes-eval")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "png" || e == "jpg"))
        .collect();
    sources.sort();
    for (i, src) in sources.iter().take(5).enumerate() {
        let ext = src.extension().and_then(|e| e.to_str()).expect("ext");
        let sub = if i % 2 == 0 {
            images.clone()
        } else {
            images.join("nested")
        };
        std::fs::copy(src, sub.join(format!("img{i}.{ext}"))).expect("copy");
    }
    std::fs::write(images.join("img0.txt"), "a caption for the first image\n").expect("caption");
    std::fs::write(images.join("broken.jpg"), b"not really a jpeg").expect("bad");
    std::fs::write(images.join("README.md"), b"ignored: not an image extension").expect("other");
    let out = dir.join("out");
    let pipeline = dir.join("dir.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[model]\ndir = {:?}\n[source]\nkind = \"files\"\ndir = {:?}\n[sink.parquet]\ndir = {:?}\n",
            model().display().to_string(),
            images.display().to_string(),
            out.display().to_string()
        ),
    )
    .expect("pipeline");
    let run = clipstream(&["run", "--no-progress", pipeline.to_str().expect("utf8")]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stdout)
    );
    let rows = read_parquet(&out);
    let mut ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().expect("id")).collect();
    ids.sort();
    assert_eq!(ids.len(), 5, "{ids:?}");
    assert!(
        ids.contains(&"img0.png") || ids.contains(&"img0.jpg"),
        "{ids:?}"
    );
    assert!(
        ids.iter().any(|i| i.starts_with("nested/")),
        "ids are paths relative to the directory"
    );
    let captioned: Vec<_> = rows.iter().filter(|r| !r["text"].is_null()).collect();
    assert_eq!(captioned.len(), 1);
    assert_eq!(captioned[0]["text"], "a caption for the first image");
    assert!(!captioned[0]["clip_score"].is_null());
    let dead = read_dead_letters(&out.join("_dead_letters.jsonl"));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["id"], "broken.jpg");
    assert_eq!(dead[0]["kind"], "not_an_image");
}

/// One HTTP GET on loopback; returns (status code, body).
#[test]
fn metrics_health_and_readiness_are_served_during_a_run() {
    let dir = scratch("local-metrics");
    let input = build_input(&dir, 6000, 5);
    let out = dir.join("out");
    let pipeline = local_pipeline(&dir, &input.manifest, &out, 200);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(bin())
        .args([
            "run",
            "--no-progress",
            "--metrics-listen",
            &addr,
            pipeline.to_str().expect("utf8"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    let text = loop {
        assert!(started.elapsed() < Duration::from_secs(60), "no metrics");
        if std::net::TcpStream::connect(&addr).is_ok() {
            let (status, body) = http_get(&addr, "/metrics");
            assert_eq!(status, 200);
            if metric(&body, "clipstream_images_encoded_total") > 0.0
                && metric(&body, "clipstream_dead_letters_total") > 0.0
            {
                break body;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    assert_eq!(http_get(&addr, "/readyz").0, 200);
    assert_eq!(http_get(&addr, "/nope").0, 404);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().expect("reap");

    assert_metrics(
        &text,
        &[
            "clipstream_build_info",
            "clipstream_encoder_info",
            "clipstream_records_read_total",
            "clipstream_images_encoded_total",
            "clipstream_texts_encoded_total",
            "clipstream_dead_letters_total",
            "clipstream_batch_size_bucket",
            "clipstream_inference_duration_seconds_bucket",
            "clipstream_fetch_duration_seconds_count",
            "clipstream_decode_duration_seconds_count",
            "clipstream_in_flight_records",
        ],
    );
    assert!(text.contains(r#"provider="cpu""#), "{text}");
    assert!(text.contains(r#"tower="vision""#) && text.contains(r#"tower="text""#));
    // Images were encoded, so the vision tower's runs took host CPU.
    let cpu = text
        .lines()
        .find(|l| l.starts_with(r#"clipstream_encoder_cpu_seconds_total{tower="vision"}"#))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no vision tower CPU seconds:\n{text}"));
    assert!(cpu > 0.0, "{cpu}");
    // Exposition format: every sample is NAME[{labels}] VALUE, every family has HELP and TYPE.
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let value = line.rsplit(' ').next().expect("value");
        assert!(
            value.parse::<f64>().is_ok() || value == "+Inf",
            "bad sample line {line:?}"
        );
        let name = line.split(['{', ' ']).next().expect("name");
        let family = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            text.contains(&format!("# TYPE {family} "))
                || text.contains(&format!("# TYPE {name} ")),
            "no TYPE for {name}"
        );
        assert!(!line.contains("rec-"), "no ids in labels: {line}");
    }
    if Command::new("promtool").arg("--version").output().is_ok() {
        promtool_check(&text);
    }
}

/// A smoke run of the benchmarks (figures are printed, never asserted):
/// `bench --host-cost` measures every part, on a corpus it writes, and
/// `bench` its usual parts, each printing a positive, finite rate.
#[test]
fn the_benchmarks_run_and_print_every_figure() {
    let dir = scratch("bench-smoke");
    let corpus = dir.join("corpus");
    let model = model();
    let out = clipstream(&[
        "bench",
        "--host-cost",
        "--model",
        model.to_str().expect("utf8"),
        "--seconds",
        "0.2",
        "--host-cost-records",
        "40",
        "--corpus",
        corpus.to_str().expect("utf8"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("bench host_cost."))
        .collect();
    for part in [
        "jpeg_decode_alone",
        "jpeg_decode_1600x1200_whole",
        "jpeg_decode_1600x1200_at_1_8_dct_scale",
        "exact_preprocess_640x480_jpeg_scalar",
        "exact_preprocess_640x480_jpeg_default",
        "exact_preprocess_1600x1200_jpeg_default",
        "fast_preprocess_640x480",
        "fast_preprocess_1600x1200",
        "local_job_exact ",
        "local_job_fast ",
        "local_job_exact_ort_threads_spinning",
        "local_job_exact_640x480_jpegs_only",
        "local_job_fast_640x480_jpegs_only",
    ] {
        let line = lines
            .iter()
            .find(|l| l.contains(part))
            .unwrap_or_else(|| panic!("no {part} figure in:\n{stdout}"));
        for field in ["per_s=", "cpu_ms="] {
            let v: f64 = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(field))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {field} in {line:?}"));
            assert!(v.is_finite() && v > 0.0, "{line}");
        }
        // A local job's CPU splits into the model's runs and the rest.
        if part.starts_with("local_job") {
            let field = |f: &str| -> f64 {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(f))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no {f} in {line:?}"))
            };
            let (all, model) = (field("cpu_ms="), field("model_cpu_ms="));
            assert!(model > 0.0 && model < all, "{line}");
        }
    }
    assert!(stdout.contains("cores/GPU@10k"), "{stdout}");
    // The ratios measured in turn, item by item.
    assert!(stdout.contains("x the decode floor"), "{stdout}");
    assert!(stdout.contains("x exact"), "{stdout}");
    assert!(stdout.contains("outside"), "{stdout}");
    // The corpus is what the README says: three folders.
    for (sub, n) in [
        ("jpeg-640x480", 48),
        ("jpeg-1600x1200", 12),
        ("png-640x480", 4),
    ] {
        assert_eq!(
            std::fs::read_dir(corpus.join(sub)).expect(sub).count(),
            n,
            "{sub}"
        );
    }

    let nightly = dir.join("nightly");
    let out = clipstream(&[
        "bench",
        "--model",
        model.to_str().expect("utf8"),
        "--nightly",
        "3000",
        "--nightly-dir",
        nightly.to_str().expect("utf8"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("150 planned of 3000 products (new 30, image 60, text 60), 30 deleted"),
        "{stdout}"
    );
    assert!(
        stdout.contains("3000 rows (150 from tonight, 2850 carried over)"),
        "{stdout}"
    );
    assert!(!nightly.exists(), "the benchmark's data is removed");

    let images = dir.join("images");
    let out = clipstream(&[
        "bench",
        "--model",
        model.to_str().expect("utf8"),
        "--seconds",
        "0.2",
        "--batch-size",
        "4",
        "--pipeline-records",
        "16",
        "--rounds",
        "2",
        "--image-dir",
        images.to_str().expect("utf8"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for part in ["preprocess", "vision", "text", "embed", "pipeline"] {
        assert!(
            stdout.contains(&format!("bench {part} ")),
            "no {part} figure in:\n{stdout}"
        );
    }
    // The raw session and the pipeline, in turn, twice.
    assert_eq!(stdout.matches("round ").count(), 2, "{stdout}");
    assert!(stdout.contains("rounds=2"), "{stdout}");
    assert!(stdout.contains("host CPU-ms per image"), "{stdout}");
}

/// `[image] model_input = "uint8"`: the same records through a tower that
/// takes bytes (rescale and normalise inside the graph) give the same rows,
/// embeddings and labels bit for bit, and the same dead letters.
#[test]
fn uint8_model_input_writes_the_float_runs_rows_bit_for_bit() {
    let dir = scratch("local-uint8");
    let input = build_input(&dir, 150, 23);
    let mut outputs = Vec::new();
    for (name, pixels) in [
        ("float", clipstream_model::encoder::PixelInput::Float),
        ("uint8", clipstream_model::encoder::PixelInput::Uint8),
    ] {
        let out = dir.join(name);
        let mut c = local_config(&dir, &input.manifest, &out, 1000);
        c.image.model_input = pixels;
        let p = write_pipeline(&dir, name, &c);
        let run = clipstream(&["run", "-v", "--no-progress", s(&p)]);
        let log = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{name}: {log}");
        // The tower really takes what the config asks for.
        assert!(log.contains(&format!("pixel_input={pixels:?}")), "{log}");
        let rows = check_exactly_once(&input, &out);
        let dead = read_dead_letters(&out.join("_dead_letters.jsonl"));
        outputs.push((rows, dead));
    }
    let by_id = |rows: &[serde_json::Value]| {
        rows.iter()
            .map(|r| {
                let bits = |v: &serde_json::Value| {
                    floats(v).iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                };
                (
                    r["id"].as_str().expect("id").to_string(),
                    (
                        bits(&r["image_embedding"]),
                        bits(&r["text_embedding"]),
                        r["labels"].clone(),
                    ),
                )
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (float, uint8) = (by_id(&outputs[0].0), by_id(&outputs[1].0));
    assert_eq!(float.len(), uint8.len());
    assert!(
        float.values().filter(|v| !v.0.is_empty()).count() > 50,
        "images embedded"
    );
    for (id, f) in &float {
        assert_eq!(Some(f), uint8.get(id), "{id}");
    }
    let kinds = |d: &[serde_json::Value]| {
        let mut k: Vec<String> = d
            .iter()
            .map(|l| format!("{}:{}", l["id"], l["kind"]))
            .collect();
        k.sort();
        k
    };
    assert_eq!(kinds(&outputs[0].1), kinds(&outputs[1].1), "dead letters");
}
