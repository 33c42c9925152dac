//! The main job under faults, through the binary: inputs that would stop a
//! worker (extreme aspect ratios, an input the model fails on), a tower
//! that breaks, a disk that fills up, a client that holds the metrics
//! server's connections. Each run either goes on (bad input becomes a dead
//! letter) or ends at once with its reason and a non-zero status (the stage
//! cannot go on); either way a rerun completes the job exactly once.

#[path = "support/mod.rs"]
mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clipstream_pipeline::config::{FilesSourceConfig, SourceConfig};
use serde_json::json;
use support::*;

/// Appends events to the manifest of `input`, each a bad record of `kind`.
fn append_bad(input: &mut Input, events: &[(serde_json::Value, &'static str)]) {
    let bytes = std::fs::read(&input.manifest).expect("manifest");
    let first = bytes.iter().filter(|&&b| b == b'\n').count() as i64;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&input.manifest)
        .expect("manifest");
    for (offset, (ev, kind)) in (first..).zip(events) {
        writeln!(f, "{ev}").expect("write");
        input.bad.insert(offset, kind);
    }
}

/// Runs `clipstream run` with a time limit; returns (status code, stderr).
fn run_limited(pipeline: &Path, limit: Duration) -> (Option<i32>, String, String) {
    let mut child = Command::new(bin())
        .args(["run", "--no-progress", pipeline.to_str().expect("utf8")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            let _ = status;
            return (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "the run hung for {limit:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A pipeline for `input` into `out` with another model directory.
fn pipeline_with_model(
    dir: &Path,
    input: &Input,
    out: &Path,
    model_dir: &Path,
) -> std::path::PathBuf {
    let mut c = local_config(dir, &input.manifest, out, 300);
    c.model.dir = model_dir.to_path_buf();
    write_pipeline(dir, "pipeline", &c)
}

/// Images whose aspect ratio makes a whole resize enormous (224 x
/// 22,400,000 pixels before the crop) are processed like any other: only
/// the crop is computed. The job over a directory with them among ordinary
/// images completes; a worker that resized them whole was OOM-killed.
#[test]
fn extreme_aspect_ratios_are_processed_within_bounded_memory() {
    let dir = scratch("local-aspect");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).expect("dir");
    let corpus = fixtures().join("fuzz");
    for name in ["png-aspect-1x100000.png", "png-aspect-100000x1.png"] {
        std::fs::copy(corpus.join(name), images.join(name)).expect("copy");
    }
    let mut n = 2;
    for e in std::fs::read_dir(fixtures().join("shapes-eval")).expect("shapes") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "png") && n < 60 {
            std::fs::copy(&p, images.join(p.file_name().expect("name"))).expect("copy");
            n += 1;
        }
    }
    let out = dir.join("out");
    let mut c = local_config(&dir, &dir.join("unused.jsonl"), &out, 100);
    c.source = SourceConfig::Files(FilesSourceConfig {
        manifest: None,
        dir: Some(images.clone()),
        max_event_bytes: 4096,
    });
    let p = write_pipeline(&dir, "pipeline", &c);
    let (code, stdout, stderr) = run_limited(&p, Duration::from_secs(120));
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let rows = read_parquet(&out);
    assert_eq!(rows.len(), n, "{stdout}");
    for name in ["png-aspect-1x100000.png", "png-aspect-100000x1.png"] {
        let r = rows.iter().find(|r| r["id"] == name).expect("row");
        assert!(!r["image_embedding"].is_null());
    }
    let peak: f64 = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("peak memory (RSS)"))
        .and_then(|v| v.trim().trim_end_matches("MiB").trim().parse().ok())
        .expect("peak memory in the summary");
    assert!(peak < 1024.0, "peak RSS {peak} MiB");
}

/// The model fails on one kind of input (a real ONNX Runtime error on a
/// white image; tests/fixtures/make_tripwire.py) and works on the others:
/// those records are dead letters (`encode_failed`), the rest are written,
/// and the run goes on to the end.
#[test]
fn an_input_the_model_fails_on_is_a_dead_letter_and_the_run_goes_on() {
    let dir = scratch("local-tripwire");
    let mut input = build_input(&dir, 400, 11);
    let white = dir.join("white.png");
    std::fs::write(&white, solid_png(320, 240, [255, 255, 255])).expect("png");
    let w = white.display().to_string();
    append_bad(
        &mut input,
        &[
            (json!({"id": "white-1", "image": w}), "encode_failed"),
            (
                json!({"id": "white-2", "image": w, "text": "a white card"}),
                "encode_failed",
            ),
        ],
    );
    // One more good record after them.
    let model = model_with_vision(&dir, &fixtures().join("tripwire/vision_model.onnx"));
    let out = dir.join("out");
    let p = pipeline_with_model(&dir, &input, &out, &model);
    let (code, stdout, stderr) = run_limited(&p, Duration::from_secs(120));
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    check_exactly_once(&input, &out);
    let dead = read_dead_letters(&out.join("_dead_letters.jsonl"));
    let white: Vec<_> = dead
        .iter()
        .filter(|d| d["kind"] == "encode_failed")
        .collect();
    assert_eq!(white.len(), 2);
    for d in white {
        assert_eq!(d["stage"], "encode");
        let reason = d["reason"].as_str().expect("reason");
        assert!(
            reason.contains("vision tower fails on this input"),
            "{reason}"
        );
    }
}

/// A tower that fails on every input (tests/fixtures/make_tripwire.py)
/// ends the run at once: status 2, the reason on stderr, no hang. What was
/// written is complete, and a rerun with a working model completes the job
/// exactly once.
#[test]
fn a_broken_tower_ends_the_run_with_its_reason_and_a_rerun_completes() {
    let dir = scratch("local-broken-tower");
    let input = build_input(&dir, 600, 13);
    let model = model_with_vision(&dir, &fixtures().join("tripwire/broken_vision_model.onnx"));
    let out = dir.join("out");
    let p = pipeline_with_model(&dir, &input, &out, &model);
    let started = Instant::now();
    let (code, stdout, stderr) = run_limited(&p, Duration::from_secs(90));
    assert_eq!(code, Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("the vision tower failed"),
        "the reason is on stderr: {stderr}"
    );
    eprintln!(
        "broken tower: exit 2 after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let good = local_pipeline(&dir, &input.manifest, &out, 300);
    let (code, stdout, stderr) = run_limited(&good, Duration::from_secs(120));
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    check_exactly_once(&input, &out);
}

/// A tmpfs of `bytes`, mounted on `dir` (root only); false if that is not
/// possible here.
fn tmpfs(dir: &Path, bytes: u64) -> bool {
    std::fs::create_dir_all(dir).expect("dir");
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
        .arg(dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The output directory fills up mid-run (a tiny tmpfs; where mounting is
/// not allowed, a file size limit, which fails writes the same way): the
/// run ends at once with the reason and status 2, commits nothing it did
/// not write, and a rerun into a directory with room completes the job
/// exactly once.
#[test]
fn a_full_disk_ends_the_run_with_its_reason_and_a_rerun_completes() {
    let dir = scratch("local-full-disk");
    let input = build_input(&dir, 1500, 17);
    let out = dir.join("out");
    let mounted = tmpfs(&out, 1 << 20);
    struct Unmount<'a>(&'a Path, bool);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            if self.1 {
                let _ = Command::new("umount").arg(self.0).status();
            }
        }
    }
    let _unmount = Unmount(&out, mounted);
    let p = local_pipeline(&dir, &input.manifest, &out, 200);
    let (code, stdout, stderr) = if mounted {
        // Leave about 48 KiB free.
        std::fs::write(out.join("filler"), vec![0u8; (1 << 20) - (48 << 10)]).expect("filler");
        run_limited(&p, Duration::from_secs(90))
    } else {
        eprintln!("cannot mount a tmpfs here: limiting the file size instead");
        let limited = dir.join("limited.sh");
        std::fs::write(
            &limited,
            format!(
                "trap '' XFSZ\nulimit -f 48\nexec {} run --no-progress {}\n",
                bin(),
                p.display()
            ),
        )
        .expect("script");
        let o = Command::new("bash").arg(&limited).output().expect("bash");
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("No space left on device") || stderr.contains("File too large"),
        "the reason is on stderr: {stderr}"
    );
    // Move what was written to a disk with room, and finish there.
    let roomy = dir.join("roomy");
    std::fs::create_dir_all(&roomy).expect("dir");
    for e in std::fs::read_dir(&out).expect("out") {
        let path = e.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if name != "filler" {
            std::fs::copy(&path, roomy.join(&name)).expect("copy");
        }
    }
    let good = local_pipeline(&dir, &input.manifest, &roomy, 200);
    let (code, stdout, stderr) = run_limited(&good, Duration::from_secs(120));
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    check_exactly_once(&input, &roomy);
}

/// Clients that open connections and send nothing cannot take the metrics
/// server down: it closes them after its head timeout, serves a bounded
/// number at once, and a scrape still gets its answer.
#[test]
fn idle_connections_cannot_starve_the_metrics_server() {
    let dir = scratch("local-slowloris");
    // Enough records that the run outlives the test (it is stopped at the
    // end): a run that ended would reset the scrape waiting in its backlog.
    let input = build_input(&dir, 60000, 19);
    let out = dir.join("out");
    let pipeline = local_pipeline(&dir, &input.manifest, &out, 200);
    let addr = format!("127.0.0.1:{}", support::stack::free_port());
    let mut child = Command::new(bin())
        .args(["run", "--no-progress", "--metrics-listen", &addr])
        .arg(&pipeline)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(started.elapsed() < Duration::from_secs(60), "no server");
        std::thread::sleep(Duration::from_millis(50));
    }
    let idle: Vec<std::net::TcpStream> = (0..40)
        .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
        .collect();
    let opened = Instant::now();
    let (status, body) = http_get(&addr, "/metrics");
    let waited = opened.elapsed();
    assert!(
        child.try_wait().expect("status").is_none(),
        "the run ended during the test: give it more records"
    );
    assert_eq!(status, 200);
    assert!(body.contains("clipstream_records_read_total"));
    assert!(
        waited < Duration::from_secs(20),
        "a scrape waited {waited:?}"
    );
    // The server closed (some of) the idle connections: a read sees the end.
    let mut closed = 0;
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        if matches!(std::io::Read::read(&mut s, &mut buf), Ok(0)) {
            closed += 1;
        }
    }
    assert!(
        closed >= 32,
        "only {closed} of 40 idle connections were closed"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().expect("reap");
}

/// Writes a PNG of `w` x `h` pseudo-random pixels (it compresses badly: the
/// file is about as large as its pixels).
fn noise_png(path: &Path, w: u32, h: u32, seed: u64) {
    let mut next = xorshift(seed);
    let mut raw = Vec::with_capacity((h * (1 + 3 * w)) as usize);
    for _ in 0..h {
        let row = std::iter::once(0u8).chain((0..3 * w).map(|_| (next() >> 24) as u8));
        raw.extend(row);
    }
    std::fs::write(path, png_with_pixels(w, h, &raw)).expect("png");
}

/// The peak RSS and the budget's peak a run's summary reports.
fn peaks(stdout: &str) -> (f64, f64) {
    let field = |name: &str| -> f64 {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name:?} in the summary:\n{stdout}"))
    };
    (field("peak memory (RSS)"), field("records in flight"))
}

/// Large images (2000 x 1500 noise: 9 MB files, 12 MB decoded) and long
/// captions (200 kB), 256 records in flight: with a 64 MiB budget, the
/// records' bytes charged never pass it by more than what decoding adds, and
/// the peak RSS stays under the budget plus the process with its model at
/// work (the peak of a run of small images in full batches), give or take
/// 10% for the allocator. Printed beside the same run with a budget of
/// 4 GiB, which lets up to 256 objects in at once.
#[test]
fn memory_stays_within_the_budget_with_large_images_and_long_texts() {
    let dir = scratch("local-memory");
    let images: Vec<std::path::PathBuf> = (0..6)
        .map(|i| {
            let p = dir.join(format!("noise-{i}.png"));
            noise_png(&p, 2000, 1500, 1000 + i);
            p
        })
        .collect();
    let manifest = dir.join("events.jsonl");
    let mut f = std::fs::File::create(&manifest).expect("manifest");
    let caption = "a long caption of a noisy picture ".repeat(6000);
    for i in 0..120 {
        let mut ev = json!({"id": format!("big-{i:03}"), "image": images[i % images.len()].display().to_string()});
        if i % 2 == 0 {
            ev["text"] = json!(caption);
        }
        writeln!(f, "{ev}").expect("write");
    }
    drop(f);
    // The model at work: small images in full batches.
    let small = dir.join("small.jsonl");
    let mut f = std::fs::File::create(&small).expect("manifest");
    let mut shapes: Vec<std::path::PathBuf> = std::fs::read_dir(fixtures().join("shapes-eval"))
        .expect("shapes")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    shapes.sort();
    for (i, p) in shapes.iter().take(48).enumerate() {
        let ev = json!({"id": format!("small-{i}"), "image": p.display().to_string(), "text": "a red circle"});
        writeln!(f, "{ev}").expect("write");
    }
    drop(f);
    let run = |name: &str, manifest: &Path, budget: u64, rows: usize| {
        let out = dir.join(format!("out-{name}"));
        let mut c = local_config(&dir, manifest, &out, 500);
        c.engine.max_bytes_in_flight = budget;
        c.engine.max_in_flight = 256;
        if let SourceConfig::Files(f) = &mut c.source {
            f.max_event_bytes = 1 << 20;
        }
        c.fetch.max_object_bytes = 20 << 20;
        let p = write_pipeline(&dir, name, &c);
        let (code, stdout, stderr) = run_limited(&p, Duration::from_secs(600));
        assert_eq!(code, Some(0), "{stdout}\n{stderr}");
        assert_eq!(read_parquet(&out).len(), rows);
        peaks(&stdout)
    };
    let budget_mib = 64.0;
    let (base, _) = run("model", &small, 64 << 20, 48);
    let (bounded, charged) = run("bounded", &manifest, 64 << 20, 120);
    let (unbounded, unbounded_charged) = run("unbounded", &manifest, 4 << 30, 120);
    eprintln!(
        "memory: the model at work (small images, full batches) {base:.0} MiB RSS; 120 records of 9 MB images and 200 kB captions: \
         {bounded:.0} MiB RSS with a {budget_mib:.0} MiB budget ({charged:.0} MiB charged at most), \
         {unbounded:.0} MiB RSS with 4 GiB ({unbounded_charged:.0} MiB charged at most)"
    );
    assert!(
        charged <= budget_mib * 1.25,
        "{charged:.0} MiB charged at once, over the {budget_mib:.0} MiB budget by more than decoding adds"
    );
    assert!(
        bounded <= base + budget_mib * 1.1,
        "peak RSS {bounded:.0} MiB is over the budget ({budget_mib:.0} MiB) plus the model at work ({base:.0} MiB)"
    );
    assert!(
        unbounded > bounded + budget_mib,
        "the budget changed nothing"
    );
}
