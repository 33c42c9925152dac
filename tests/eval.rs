//! `clipstream eval` on the bundled shapes evaluation set and tiny CLIP:
//! its figures (printed, JSON) agree with an independent numpy computation
//! (`tests/eval_check.py`) to the last digit printed, its HTML report holds
//! well-formed SVG charts of the right shape, it reads a run's output
//! without re-encoding, and bad inputs are clear errors or counted skips.

#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use support::*;

fn manifest() -> PathBuf {
    root().join("pipelines/samples/shapes.jsonl")
}

fn labels(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// Runs tests/eval_check.py on a report; panics with its output on a
/// mismatch.
fn independent_check(json: &Path, stdout: &str, dir: &Path, html: Option<&Path>, extra: &[&str]) {
    let text = dir.join(format!(
        "{}.stdout.txt",
        json.file_stem().unwrap_or_default().to_string_lossy()
    ));
    std::fs::write(&text, stdout).expect("stdout");
    let mut cmd = Command::new(python());
    cmd.arg(root().join("tests/eval_check.py"))
        .arg(json)
        .arg(&text);
    if let Some(h) = html {
        cmd.arg(h);
    }
    cmd.args(extra);
    let out = cmd.output().expect("eval_check.py runs");
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the independent computation disagrees"
    );
    assert!(report.contains("eval_check: ok"), "{report}");
}

#[test]
fn figures_agree_with_an_independent_computation_and_the_report_has_its_charts() {
    let dir = scratch("eval");
    let (json, html) = (dir.join("report.json"), dir.join("report.html"));
    let out = clipstream(&[
        "eval",
        "--manifest",
        s(&manifest()),
        "--model",
        s(&model()),
        "--labels",
        s(&labels("shapes-labels.toml")),
        "--labels",
        s(&labels("shapes-labels-plain.toml")),
        "--json",
        s(&json),
        "--html",
        s(&html),
        "--svg",
        s(&dir.join("svg")),
    ]);
    let stdout = stdout_of(&out, "eval");
    // The README's pictures are these charts.
    for chart in ["confusion", "reliability", "precision-coverage"] {
        let name = format!("shapes-labels-plain-{chart}.svg");
        assert_eq!(
            std::fs::read_to_string(dir.join("svg").join(&name)).expect("written"),
            std::fs::read_to_string(root().join("docs/eval").join(&name)).expect("docs"),
            "docs/eval/{name} is not what eval draws today: regenerate it (README, Label quality)"
        );
    }
    independent_check(&json, &stdout, &dir, Some(&html), &[]);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("json");
    let sets = report["sets"].as_array().expect("sets");
    assert_eq!(sets.len(), 2);
    // The fixture's 200 labelled images; its 16 unlabelled events and 2
    // lines that are not events are counted, not evaluated.
    assert_eq!(sets[0]["metrics"]["records"], 200);
    assert_eq!(sets[0]["skipped"]["no_truth"], 16);
    assert_eq!(report["unreadable"], 2);
    // The tiny model knows its shapes; the bare prompts do worse, and
    // their thresholds are reachable (the curve has something to show).
    let top1 = |k: usize| sets[k]["metrics"]["top1"].as_f64().expect("top1");
    assert!(
        top1(0) >= 0.95 && top1(1) < top1(0),
        "{} {}",
        top1(0),
        top1(1)
    );
    assert!(
        sets[1]["metrics"]["operating"]
            .as_array()
            .expect("operating")
            .iter()
            .all(|o| o["threshold"].is_number()),
        "{}",
        sets[1]["metrics"]["operating"]
    );
    assert!(stdout.contains("label set"), "no side-by-side table");
}

#[test]
fn a_runs_output_is_evaluated_without_encoding() {
    let dir = scratch("eval-output");
    let out = dir.join("out");
    let mut cfg = local_config(&dir, &manifest(), &out, 1000);
    cfg.model.labels = Some(labels("shapes-labels.toml"));
    // Five labels per row: top-5 accuracy compares with model mode's.
    cfg.model.top_k = 5;
    let pipeline = write_pipeline(&dir, "pipeline", &cfg);
    clipstream(&["run", "--no-progress", s(&pipeline)]);
    assert!(!read_parquet(&out).is_empty(), "the run wrote nothing");
    let json = dir.join("output.json");
    // True labels from the rows' own attributes.
    let stdout = stdout_of(
        &clipstream(&[
            "eval",
            "--output",
            s(&out),
            "--labels",
            s(&labels("shapes-labels.toml")),
            "--json",
            s(&json),
        ]),
        "eval --output",
    );
    // The records it evaluated are read independently from the files.
    independent_check(
        &json,
        &stdout,
        &dir,
        None,
        &[
            "--output",
            s(&out),
            "--labels",
            s(&labels("shapes-labels.toml")),
        ],
    );
    let from_output: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("json");
    // The same figures as labelling the manifest here.
    let json2 = dir.join("model.json");
    stdout_of(
        &clipstream(&[
            "eval",
            "--manifest",
            s(&manifest()),
            "--model",
            s(&model()),
            "--labels",
            s(&labels("shapes-labels.toml")),
            "--json",
            s(&json2),
        ]),
        "eval --model",
    );
    let from_model: Value =
        serde_json::from_str(&std::fs::read_to_string(&json2).expect("json")).expect("json");
    let m = |v: &Value, k: &str| v["sets"][0]["metrics"][k].clone();
    for k in ["records", "k", "top1", "topk", "macro_f1", "matrix"] {
        assert_eq!(m(&from_output, k), m(&from_model, k), "{k}");
    }
    // With a label set that lacks most classes: records of other classes
    // are counted out, and predictions outside it are misses.
    // (Each of these four classes has a record predicted as a class
    // outside it.)
    let half = dir.join("half.toml");
    std::fs::write(
        &half,
        "templates = [\"a photo of a {}.\"]\nclasses = [\"red circle\", \"blue circle\", \"blue star\", \"yellow square\"]\n",
    )
    .expect("half");
    let json3 = dir.join("half.json");
    let stdout = stdout_of(
        &clipstream(&[
            "eval",
            "--output",
            s(&out),
            "--labels",
            s(&half),
            "--json",
            s(&json3),
        ]),
        "eval --output with a partial label set",
    );
    independent_check(
        &json3,
        &stdout,
        &dir,
        None,
        &["--output", s(&out), "--labels", s(&half)],
    );
    let partial: Value =
        serde_json::from_str(&std::fs::read_to_string(&json3).expect("json")).expect("json");
    let set = &partial["sets"][0];
    let outside = set["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .filter(|x| {
            !set["classes"]
                .as_array()
                .expect("classes")
                .contains(&x["ranked"][0][0])
        })
        .count();
    assert!(outside >= 4, "{outside} predictions outside the label set");
    // The true labels may come from the manifest instead (matched by id).
    let with_manifest = stdout_of(
        &clipstream(&["eval", "--output", s(&out), "--manifest", s(&manifest())]),
        "eval --output --manifest",
    );
    assert!(
        with_manifest.contains("records evaluated   200"),
        "{with_manifest}"
    );
}

#[test]
fn bad_inputs_are_clear_errors_or_counted_skips() {
    let dir = scratch("eval-bad");
    let (manifest, model, set) = (manifest(), model(), labels("shapes-labels.toml"));
    let base = |extra: &[&str]| -> Output {
        let mut args = vec![
            "eval",
            "--manifest",
            s(&manifest),
            "--model",
            s(&model),
            "--labels",
            s(&set),
        ];
        args.extend_from_slice(extra);
        clipstream(&args)
    };
    // A field no record has.
    let e = stderr_of(&base(&["--truth-field", "colour"]), "no truth field");
    assert!(
        e.contains("no record") && e.contains("attributes.colour") && e.contains("--truth-field"),
        "{e}"
    );
    // A precision that is not one.
    let e = stderr_of(&base(&["--precision", "1.5"]), "precision 1.5");
    assert!(e.contains("between 0 and 1"), "{e}");
    // A label set that lacks some of the true labels: those are counted.
    let half = dir.join("half.toml");
    std::fs::write(
        &half,
        "templates = [\"a photo of a {}.\"]\nclasses = [\"red circle\", \"red square\", \"blue circle\", \"blue square\"]\n",
    )
    .expect("half");
    let out = stdout_of(
        &clipstream(&[
            "eval",
            "--manifest",
            s(&manifest),
            "--model",
            s(&model),
            "--labels",
            s(&half),
        ]),
        "eval with a partial label set",
    );
    assert!(out.contains("with a label not in the label set"), "{out}");
    let evaluated: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("records evaluated"))
        .and_then(|v| v.trim().parse().ok())
        .expect("records evaluated");
    assert_eq!(evaluated, 5 + 5 + 5 + 9, "{out}");

    // Outputs: an empty folder, another schema, not Parquet, two models.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).expect("empty");
    let from = |d: &Path| clipstream(&["eval", "--output", s(d)]);
    let e = stderr_of(&from(&empty), "empty output");
    assert!(e.contains("no Parquet files"), "{e}");
    let e = stderr_of(&from(&dir.join("missing")), "missing output");
    assert!(e.contains("not a directory"), "{e}");
    let other = dir.join("other");
    std::fs::create_dir_all(&other).expect("other");
    let script = "import pyarrow as pa, pyarrow.parquet as pq, sys; \
                  pq.write_table(pa.table({'x': [1, 2]}), sys.argv[1])";
    let made = Command::new(python())
        .args(["-c", script])
        .arg(other.join("x.parquet"))
        .status()
        .expect("python");
    assert!(made.success());
    let e = stderr_of(&from(&other), "another schema");
    assert!(e.contains("x.parquet") && e.contains("no column"), "{e}");
    let garbage = dir.join("garbage");
    std::fs::create_dir_all(&garbage).expect("garbage");
    std::fs::write(garbage.join("g.parquet"), b"PAR1 not really").expect("garbage");
    let e = stderr_of(&from(&garbage), "not Parquet");
    assert!(
        e.contains("g.parquet") && e.contains("not a readable Parquet"),
        "{e}"
    );
    // A run's output, one file rewritten as if another model wrote it.
    let out = dir.join("out");
    let mut cfg = local_config(&dir, &manifest, &out, 50);
    cfg.model.labels = Some(labels("shapes-labels.toml"));
    let pipeline = write_pipeline(&dir, "pipeline", &cfg);
    clipstream(&["run", "--no-progress", s(&pipeline)]);
    let first = std::fs::read_dir(&out)
        .expect("out")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "parquet"))
        .expect("a Parquet file");
    let script = "import pyarrow as pa, pyarrow.parquet as pq, sys; \
                  t = pq.read_table(sys.argv[1]); \
                  i = t.schema.get_field_index('model_id'); \
                  t = t.set_column(i, t.schema.field(i), pa.array(['other-model'] * t.num_rows)); \
                  pq.write_table(t, sys.argv[1], compression='zstd')";
    let made = Command::new(python())
        .args(["-c", script])
        .arg(&first)
        .status()
        .expect("python");
    assert!(made.success());
    let e = stderr_of(&from(&out), "two models");
    assert!(
        e.contains("more than one model") && e.contains("other-model"),
        "{e}"
    );
}

/// Review routing: eval's threshold for 95% precision, pasted into the
/// pipeline, marks each labelled row (accepted, or routed with its
/// reason), lists the routed ones in `_review.jsonl` for a labeling tool,
/// and the rows it accepts are right at least about 95% of the time.
#[test]
fn eval_thresholds_route_the_uncertain_rows_to_review() {
    let dir = scratch("eval-review");
    let plain = labels("shapes-labels-plain.toml");
    let json = dir.join("eval.json");
    stdout_of(
        &clipstream(&[
            "eval",
            "--manifest",
            s(&manifest()),
            "--model",
            s(&model()),
            "--labels",
            s(&plain),
            "--json",
            s(&json),
        ]),
        "eval",
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("json");
    let op = &report["sets"][0]["metrics"]["operating"][1];
    assert_eq!(op["target"], 0.95);
    let threshold = op["threshold"].as_f64().expect("a reachable threshold") as f32;

    let out = dir.join("out");
    let mut cfg = local_config(&dir, &manifest(), &out, 1000);
    cfg.model.labels = Some(plain.clone());
    cfg.model.review_min_score = Some(threshold);
    let pipeline = write_pipeline(&dir, "pipeline", &cfg);
    let summary =
        String::from_utf8_lossy(&clipstream(&["run", "--no-progress", s(&pipeline)]).stdout)
            .into_owned();
    let rows = read_parquet(&out);
    let mut routed = std::collections::BTreeSet::new();
    let (mut accepted, mut accepted_right) = (0, 0);
    let truth: std::collections::HashMap<String, String> = std::fs::read_to_string(manifest())
        .expect("manifest")
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            Some((
                v["id"].as_str()?.to_string(),
                v["attributes"]["true_label"].as_str()?.to_string(),
            ))
        })
        .collect();
    for r in &rows {
        let id = r["id"].as_str().expect("id").to_string();
        let Some(labels) = r["labels"].as_array().filter(|l| !l.is_empty()) else {
            assert!(r["needs_review"].is_null(), "{id}: no labels, no decision");
            continue;
        };
        let top = labels[0]["score"].as_f64().expect("score") as f32;
        let needs = r["needs_review"].as_bool().expect("a decision");
        assert_eq!(
            needs,
            top < threshold,
            "{id}: score {top} against {threshold}"
        );
        assert_eq!(r["review_reason"].is_string(), needs, "{id}");
        if needs {
            routed.insert(id);
        } else if let Some(t) = truth.get(&id) {
            accepted += 1;
            accepted_right += usize::from(labels[0]["label"] == t.as_str());
        }
    }
    assert!(!routed.is_empty() && accepted > 0, "{routed:?} {accepted}");
    let precision = accepted_right as f64 / accepted as f64;
    assert!(precision >= 0.94, "accepted rows right {precision}");
    // The review list: the routed records, each with what a person needs.
    let listed: std::collections::BTreeSet<String> =
        std::fs::read_to_string(out.join("_review.jsonl"))
            .expect("_review.jsonl")
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("a JSON line");
                assert!(
                    v["image_uri"].is_string() && v["labels"][0]["label"].is_string(),
                    "{v}"
                );
                assert!(
                    v["review_reason"]
                        .as_str()
                        .expect("reason")
                        .contains("review_min_score")
                );
                v["id"].as_str().expect("id").to_string()
            })
            .collect();
    assert_eq!(listed, routed);
    assert!(
        summary.contains(&format!("{:<22} {:>8}", "routed to review", routed.len())),
        "{summary}"
    );
}

/// The HTML report in a real browser: headless Chromium loads it (inside a
/// page that measures what it drew) and every chart is laid out with its
/// cells, bars and curve on screen. Needs Chromium (scripts/test.sh
/// installs it, scripts/install-chromium.sh; CLIPSTREAM_CHROMIUM names it);
/// without one the test fails under CI and says so elsewhere.
#[test]
fn the_html_report_renders_in_a_browser() {
    let browser = std::env::var("CLIPSTREAM_CHROMIUM")
        .ok()
        .filter(|b| !b.is_empty())
        .or_else(|| {
            ["chromium", "chromium-browser", "google-chrome"]
                .into_iter()
                .find(|b| {
                    Command::new(b)
                        .arg("--version")
                        .output()
                        .is_ok_and(|o| o.status.success())
                })
                .map(String::from)
        });
    let Some(browser) = browser else {
        assert!(
            std::env::var_os("CI").is_none(),
            "no Chromium: run scripts/install-chromium.sh (or set CLIPSTREAM_CHROMIUM)"
        );
        eprintln!("SKIPPED: no Chromium here (scripts/install-chromium.sh installs it)");
        return;
    };
    let dir = scratch("eval-browser");
    let (json, html) = (dir.join("report.json"), dir.join("report.html"));
    stdout_of(
        &clipstream(&[
            "eval",
            "--manifest",
            s(&manifest()),
            "--model",
            s(&model()),
            "--labels",
            s(&labels("shapes-labels-plain.toml")),
            "--json",
            s(&json),
            "--html",
            s(&html),
        ]),
        "eval",
    );
    // A page that loads the report and writes what the browser laid out
    // into an attribute, which --dump-dom prints.
    let probe = dir.join("probe.html");
    std::fs::write(
        &probe,
        r#"<!doctype html><meta charset="utf-8"><body>
<iframe id="r" src="report.html" style="width:1600px;height:6000px"></iframe>
<script>
document.getElementById('r').addEventListener('load', () => {
  const d = document.getElementById('r').contentDocument;
  const seen = (e) => { const b = e.getBoundingClientRect(); return b.width > 0 && b.height > 0; };
  const out = [...d.querySelectorAll('figure')].map((f) => {
    const svg = f.querySelector('svg');
    const box = svg ? svg.getBoundingClientRect() : { width: 0, height: 0 };
    return {
      chart: f.className,
      width: box.width,
      height: box.height,
      rects: svg ? [...svg.querySelectorAll('rect')].filter(seen).length : 0,
      lines: svg ? [...svg.querySelectorAll('polyline')].filter(seen).length : 0,
      circles: svg ? [...svg.querySelectorAll('circle')].filter(seen).length : 0,
    };
  });
  document.body.setAttribute('data-result', JSON.stringify(out));
});
</script>"#,
    )
    .expect("probe");
    let out = Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--allow-file-access-from-files",
            "--virtual-time-budget=15000",
            "--dump-dom",
        ])
        .arg(format!("file://{}", probe.display()))
        .output()
        .expect("chromium runs");
    let dom = String::from_utf8_lossy(&out.stdout);
    let start = dom.find("data-result=\"").unwrap_or_else(|| {
        panic!(
            "the probe wrote nothing:\n{dom}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    }) + "data-result=\"".len();
    let end = start + dom[start..].find('"').expect("end of the attribute");
    let text = dom[start..end]
        .replace("&quot;", "\"")
        .replace("&amp;", "&");
    let charts: Vec<Value> = serde_json::from_str(&text).expect("the probe's JSON");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("json");
    let m = &report["sets"][0]["metrics"];
    let classes = report["sets"][0]["classes"]
        .as_array()
        .expect("classes")
        .len();
    // Bars of non-empty bins with some accuracy have a height.
    let bars = m["bins"]
        .as_array()
        .expect("bins")
        .iter()
        .filter(|b| b["count"].as_u64() > Some(0) && b["accuracy"].as_f64() > Some(0.0))
        .count();
    assert!(bars > 3, "{}", m["bins"]);
    eprintln!("laid out by {browser}: {charts:?}");
    let chart = |name: &str| -> &Value {
        charts
            .iter()
            .find(|c| c["chart"] == name)
            .unwrap_or_else(|| panic!("no {name} chart on the page: {charts:?}"))
    };
    for c in &charts {
        assert!(
            c["width"].as_f64() >= Some(400.0) && c["height"].as_f64() >= Some(400.0),
            "{c}"
        );
    }
    // The matrix's cells, the reliability bars (and each chart's
    // background), the curve.
    assert!(
        chart("confusion")["rects"].as_u64() >= Some((classes * classes) as u64),
        "{charts:?}"
    );
    assert_eq!(
        chart("reliability")["rects"].as_u64(),
        Some(bars as u64 + 1),
        "{charts:?}"
    );
    assert!(
        chart("precision-coverage")["lines"].as_u64() >= Some(1),
        "{charts:?}"
    );
    assert_eq!(charts.len(), 3);
}
