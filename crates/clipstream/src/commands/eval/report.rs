//! The eval report: its figures, a terminal summary, and a self-contained
//! HTML page with the charts of `charts`.

use std::fmt::Write as _;

use clipstream_pipeline::eval::{ECE_BINS, Metrics, Sample, Skipped};
use serde::Serialize;

use super::charts::{charts, f4};

/// The figures of one label set.
#[derive(Debug, Serialize)]
pub struct SetReport {
    /// The label set's file, or the output folder.
    pub name: String,
    /// Its classes, in order.
    pub classes: Vec<String>,
    /// Records left out, and why.
    pub skipped: Skipped,
    /// The figures.
    pub metrics: Metrics,
    /// Each record evaluated.
    pub samples: Vec<Sample>,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Where the labels came from (`model DIR` or `output DIR`).
    pub source: String,
    /// The attribute of the true label.
    pub truth_field: String,
    /// Records read.
    pub records: usize,
    /// Records whose image could not be read (model mode), or manifest
    /// lines that are not an event.
    pub unreadable: usize,
    /// One per label set.
    pub sets: Vec<SetReport>,
}

/// `writeln!` into a String (which cannot fail).
macro_rules! outln {
    ($out:expr) => {
        $out.push('\n')
    };
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

/// A threshold as printed: the score itself (f32, shortest form), so that
/// pasting it accepts exactly the records counted here.
fn threshold(t: f64) -> String {
    format!("{}", t as f32)
}

fn skipped_line(s: &SetReport, field: &str) -> String {
    let mut parts = Vec::new();
    if s.skipped.no_truth > 0 {
        parts.push(format!("{} without attributes.{field}", s.skipped.no_truth));
    }
    let unknown: usize = s.skipped.unknown_truth.values().sum();
    if unknown > 0 {
        let names: Vec<String> = s
            .skipped
            .unknown_truth
            .iter()
            .take(5)
            .map(|(k, v)| format!("{k:?} ×{v}"))
            .collect();
        parts.push(format!(
            "{unknown} with a label not in the label set ({})",
            names.join(", ")
        ));
    }
    if s.skipped.no_labels > 0 {
        parts.push(format!("{} without labels", s.skipped.no_labels));
    }
    if s.skipped.bad_scores > 0 {
        parts.push(format!(
            "{} with scores that are not numbers (NaN, infinite)",
            s.skipped.bad_scores
        ));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join("; ")
    }
}

/// The terminal summary.
pub fn text(r: &Report) -> String {
    let mut out = String::new();
    outln!(
        out,
        "eval: {} ({} records read, {} unreadable), true labels from attributes.{}",
        r.source,
        r.records,
        r.unreadable,
        r.truth_field
    );
    if r.sets.len() > 1 {
        outln!(out);
        let w = r
            .sets
            .iter()
            .map(|s| s.name.len())
            .max()
            .unwrap_or(0)
            .max(9);
        outln!(
            out,
            "{:<w$} {:>8} {:>8} {:>9} {:>8}",
            "label set",
            "top-1",
            "top-k",
            "macro F1",
            "ECE"
        );
        for s in &r.sets {
            let m = &s.metrics;
            outln!(
                out,
                "{:<w$} {:>8} {:>8} {:>9} {:>8}",
                s.name,
                f4(m.top1),
                f4(m.topk),
                f4(m.macro_f1),
                f4(m.ece)
            );
        }
    }
    for s in &r.sets {
        let m = &s.metrics;
        outln!(out);
        outln!(out, "== {}", s.name);
        outln!(out, "records evaluated   {}", m.records);
        outln!(
            out,
            "skipped             {}",
            skipped_line(s, &r.truth_field)
        );
        outln!(out, "top-1 accuracy      {}", f4(m.top1));
        outln!(out, "top-{} accuracy      {}", m.k, f4(m.topk));
        outln!(
            out,
            "macro precision     {}   recall {}   F1 {}",
            f4(m.macro_precision),
            f4(m.macro_recall),
            f4(m.macro_f1)
        );
        outln!(out, "ECE ({ECE_BINS} bins)       {}", f4(m.ece));
        if !m.confused.is_empty() {
            outln!(out, "most confused (true -> predicted):");
            for (t, p, n) in &m.confused {
                outln!(out, "  {n:>5}  {t} -> {p}");
            }
        }
        outln!(out, "auto-accept on the top-1 score:");
        for o in &m.operating {
            match o.threshold {
                Some(t) => outln!(
                    out,
                    "  precision >= {}: score >= {} accepts {} of records (precision {})",
                    o.target,
                    threshold(t),
                    f4(o.coverage),
                    f4(o.precision)
                ),
                None => outln!(out, "  precision >= {}: no threshold reaches it", o.target),
            }
        }
        if m.operating.iter().any(|o| o.threshold.is_some()) {
            outln!(
                out,
                "route the rest to review: one of these in the pipeline's [model] (with its labels = this set):"
            );
            for o in &m.operating {
                if let Some(t) = o.threshold {
                    outln!(
                        out,
                        "  review_min_score = {}   # precision >= {}, {} auto-accepted",
                        threshold(t),
                        o.target,
                        f4(o.coverage)
                    );
                }
            }
        }
        outln!(out, "per class:");
        outln!(
            out,
            "  {:<28} {:>7} {:>9} {:>7} {:>7}",
            "class",
            "support",
            "precision",
            "recall",
            "F1"
        );
        for c in &m.classes {
            outln!(
                out,
                "  {:<28} {:>7} {:>9} {:>7} {:>7}",
                c.class,
                c.support,
                f4(c.precision),
                f4(c.recall),
                f4(c.f1)
            );
        }
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The HTML report: one section per label set.
pub fn html(r: &Report) -> anyhow::Result<String> {
    let mut h = String::new();
    h.push_str(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>clipstream eval</title><style>\
         body{font-family:sans-serif;margin:2em;max-width:1400px}\
         table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}\
         td:first-child,th:first-child{text-align:left}.charts{display:flex;flex-wrap:wrap;gap:1em}\
         </style></head><body>\n",
    );
    let _ = writeln!(
        h,
        "<h1>clipstream eval</h1><p>{}; true labels from <code>attributes.{}</code>; {} records read, {} unreadable.</p>",
        esc(&r.source),
        esc(&r.truth_field),
        r.records,
        r.unreadable
    );
    if r.sets.len() > 1 {
        h.push_str("<h2>Label sets side by side</h2><table><tr><th>label set</th><th>top-1</th><th>top-k</th><th>macro F1</th><th>ECE</th></tr>");
        for s in &r.sets {
            let m = &s.metrics;
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&s.name),
                f4(m.top1),
                f4(m.topk),
                f4(m.macro_f1),
                f4(m.ece)
            );
        }
        h.push_str("</table>\n");
    }
    for (k, s) in r.sets.iter().enumerate() {
        let m = &s.metrics;
        let _ = writeln!(h, "<section id=\"set-{k}\"><h2>{}</h2>", esc(&s.name));
        let _ = writeln!(
            h,
            "<table><tr><th>records evaluated</th><td>{}</td></tr><tr><th>skipped</th><td>{}</td></tr>\
             <tr><th>top-1 accuracy</th><td>{}</td></tr><tr><th>top-{} accuracy</th><td>{}</td></tr>\
             <tr><th>macro precision / recall / F1</th><td>{} / {} / {}</td></tr>\
             <tr><th>ECE ({ECE_BINS} bins)</th><td>{}</td></tr></table>",
            m.records,
            esc(&skipped_line(s, &r.truth_field)),
            f4(m.top1),
            m.k,
            f4(m.topk),
            f4(m.macro_precision),
            f4(m.macro_recall),
            f4(m.macro_f1),
            f4(m.ece)
        );
        h.push_str("<div class=\"charts\">\n");
        for (class, svg) in charts(&s.metrics, &s.classes)? {
            let _ = writeln!(h, "<figure class=\"{class}\">{svg}</figure>");
        }
        h.push_str("</div>\n<h3>Auto-accept thresholds (top-1 score)</h3><table><tr><th>target precision</th><th>score &ge;</th><th>coverage</th><th>precision</th></tr>");
        for o in &m.operating {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                o.target,
                o.threshold.map_or("unreachable".into(), threshold),
                f4(o.coverage),
                f4(o.precision)
            );
        }
        h.push_str("</table><h3>Most confused (true &rarr; predicted)</h3><table><tr><th>true</th><th>predicted</th><th>records</th></tr>");
        for (t, p, n) in &m.confused {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{n}</td></tr>",
                esc(t),
                esc(p)
            );
        }
        h.push_str("</table><h3>Per class</h3><table class=\"classes\"><tr><th>class</th><th>support</th><th>precision</th><th>recall</th><th>F1</th></tr>");
        for c in &m.classes {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&c.class),
                c.support,
                f4(c.precision),
                f4(c.recall),
                f4(c.f1)
            );
        }
        h.push_str("</table></section>\n");
    }
    h.push_str("</body></html>\n");
    Ok(h)
}
