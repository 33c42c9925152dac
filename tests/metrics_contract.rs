//! The dashboards and the operations fake exporter may use only what the
//! worker really exports: every `clipstream_*` metric they name must be one
//! of the worker's families, and every value they give a label of a closed
//! set (dead-letter stage and kind, tower, queue, S3 operation, result,
//! output, direction) must be one the worker can emit. A panel that queries
//! a metric the worker renamed, or a kind it never emits, fails here rather
//! than showing "No data" in Grafana.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use clipstream_pipeline::dead_letter::{Kind, Stage};
use clipstream_pipeline::stats::{S3Op, Stats, label_values};

/// The worker's metric families and the names their samples carry.
fn worker_names() -> BTreeSet<String> {
    // Series of open sets appear once something is counted.
    let stats = Stats::default();
    stats.dead_letter(Stage::Fetch, Kind::ObjectNotFound);
    stats.kafka.lag("events", 0, 1);
    stats.encoder.info("model", "cpu");
    stats
        .night
        .mark(&clipstream_pipeline::catalog::progress::NightMark {
            night: "n".into(),
            planned: 1,
            published: 1,
        });
    stats
        .s3
        .request(S3Op::GetObject, true, std::time::Duration::from_millis(100));
    let text = stats.render();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().expect("name"), it.next().expect("type"));
            names.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    assert!(names.len() > 40, "too few metrics rendered: {names:?}");
    names
}

/// `metric -> label -> values` of the closed sets.
fn closed_sets() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut m: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (metric, label, values) in label_values() {
        for name in [
            metric.to_string(),
            format!("{metric}_bucket"),
            format!("{metric}_sum"),
            format!("{metric}_count"),
        ] {
            m.entry(name)
                .or_default()
                .entry(label.to_string())
                .or_default()
                .extend(values.iter().map(|v| v.to_string()));
        }
    }
    m
}

/// Every `clipstream_*` name in `text`, with the `label="value"` matchers
/// that follow it inside braces.
fn uses(text: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("clipstream_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = text[start..end].to_string();
        let mut labels = Vec::new();
        if bytes.get(end) == Some(&b'{')
            && let Some(close) = text[end..].find('}')
        {
            for m in text[end + 1..end + close].split(',') {
                if let Some((k, v)) = m.split_once('=')
                    && !v.starts_with('~')
                {
                    let v = v.trim().trim_matches(|c| c == '"' || c == '\\');
                    labels.push((k.trim().to_string(), v.to_string()));
                }
            }
        }
        out.push((name, labels));
        i = end;
    }
    out
}

fn check(source: &str, text: &str) {
    let names = worker_names();
    let sets = closed_sets();
    let mut problems = Vec::new();
    for (name, labels) in uses(text) {
        // Prefixes of names in prose, and the test's own helpers, aside.
        if name == "clipstream_" || name.ends_with('_') {
            continue;
        }
        if !names.contains(&name) {
            problems.push(format!(
                "{source}: `{name}` is not a metric the worker exports"
            ));
            continue;
        }
        for (label, value) in labels {
            if let Some(values) = sets.get(&name).and_then(|l| l.get(&label))
                && !values.contains(&value)
            {
                problems.push(format!(
                    "{source}: `{name}` with {label}=\"{value}\": the worker emits {values:?}"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn dashboards_query_only_what_the_worker_exports() {
    let dir = support::root().join("dashboards");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("dashboards") {
        let path = e.expect("entry").path();
        if path.extension().is_some_and(|x| x == "json") {
            let text = std::fs::read_to_string(&path).expect("dashboard");
            let json: serde_json::Value = serde_json::from_str(&text).expect("json");
            let mut exprs = String::new();
            collect_exprs(&json, &mut exprs);
            assert!(!exprs.is_empty(), "no queries in {}", path.display());
            check(&path.display().to_string(), &exprs);
            n += 1;
        }
    }
    assert!(n >= 2, "dashboards missing");
}

fn collect_exprs(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                if matches!(k.as_str(), "expr" | "query" | "definition")
                    && let Some(s) = v.as_str()
                {
                    out.push_str(s);
                    out.push('\n');
                }
                collect_exprs(v, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn the_fake_exporter_serves_only_what_the_worker_exports() {
    let out = support::run_ok(
        Command::new(support::python())
            .arg(support::root().join("tests/ops/fake_exporter.py"))
            .arg("--print"),
        "fake_exporter.py --print",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let samples: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(samples.contains("clipstream_records_read_total"));
    check("tests/ops/fake_exporter.py", &samples);
}
