//! The eval report: a terminal summary, and a self-contained HTML page whose
//! charts are SVG drawn with plotters.

use std::fmt::Write as _;

use clipstream_pipeline::eval::{ECE_BINS, Metrics};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{Report, SetReport};

/// `writeln!` into a String (which cannot fail).
macro_rules! outln {
    ($out:expr) => {
        $out.push('\n')
    };
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

/// A figure as printed: four decimals (the independent check compares
/// these digits).
fn f4(x: f64) -> String {
    format!("{x:.4}")
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
        for (class, svg) in charts(s)? {
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

/// The three charts of a label set: (name, SVG).
pub fn charts(s: &SetReport) -> anyhow::Result<Vec<(&'static str, String)>> {
    let m = &s.metrics;
    [
        ("confusion", confusion(m, &s.classes)),
        ("reliability", reliability(m)),
        ("precision-coverage", precision_coverage(m)),
    ]
    .into_iter()
    .map(|(name, svg)| {
        svg.map(|svg| (name, svg))
            .map_err(|e| anyhow::anyhow!("drawing the {name} chart: {e}"))
    })
    .collect()
}

/// The most classes the confusion matrix shows (those with the most
/// records); the tables list them all.
const MATRIX_MAX: usize = 40;

fn confusion(m: &Metrics, classes: &[String]) -> Result<String, Box<dyn std::error::Error>> {
    let mut shown: Vec<usize> = (0..classes.len()).collect();
    shown.sort_by_key(|&c| std::cmp::Reverse(m.classes[c].support));
    shown.truncate(MATRIX_MAX);
    shown.sort_unstable();
    let n = shown.len();
    let names: Vec<String> = shown.iter().map(|&c| classes[c].clone()).collect();
    // Right and wrong on their own scales: one confusion among hundreds of
    // right answers must still show.
    // (x, y, right, count) of each cell; true class 0 at the top.
    let cells: Vec<(usize, usize, bool, usize)> = shown
        .iter()
        .enumerate()
        .flat_map(|(ti, &t)| {
            shown
                .iter()
                .enumerate()
                .map(move |(pi, &p)| (pi, n - 1 - ti, t == p, m.matrix[t][p]))
        })
        .collect();
    let max_of = |diag: bool| {
        cells
            .iter()
            .filter(|c| c.2 == diag)
            .map(|c| c.3)
            .max()
            .unwrap_or(0)
            .max(1) as f64
    };
    let (max_right, max_wrong) = (max_of(true), max_of(false));
    let side = (240 + 22 * n as u32).clamp(420, 1200);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (side, side)).into_drawing_area();
        root.fill(&WHITE)?;
        let title = if n < classes.len() {
            format!("Confusion matrix ({n} of {} classes)", classes.len())
        } else {
            "Confusion matrix".to_string()
        };
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(150)
            .y_label_area_size(150)
            .build_cartesian_2d((0..n).into_segmented(), (0..n).into_segmented())?;
        let label = |v: &SegmentValue<usize>, flip: bool| match v {
            SegmentValue::CenterOf(i) if *i < n => names[if flip { n - 1 - i } else { *i }].clone(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(n)
            .y_labels(n)
            .x_desc("predicted")
            .y_desc("true")
            // Rotated labels are centred on their tick: as many no-break
            // spaces before the name hang it below the axis instead.
            .x_label_formatter(&|v| {
                let name = label(v, false);
                format!("{}{name}", "\u{a0}".repeat(name.chars().count()))
            })
            .y_label_formatter(&|v| label(v, true))
            .x_label_style(
                ("sans-serif", 11)
                    .into_font()
                    .transform(FontTransform::Rotate90),
            )
            .y_label_style(("sans-serif", 11))
            .axis_desc_style(("sans-serif", 14))
            .draw()?;
        chart.draw_series(cells.iter().map(|&(x, y, right, count)| {
            let v = if count == 0 {
                0.0
            } else if right {
                0.25 + 0.75 * count as f64 / max_right
            } else {
                0.35 + 0.65 * count as f64 / max_wrong
            };
            let shade = |full: u8| (255.0 - v * (255.0 - f64::from(full))) as u8;
            let colour = if right {
                RGBColor(shade(20), shade(110), shade(60))
            } else {
                RGBColor(shade(200), shade(40), shade(40))
            };
            Rectangle::new(
                [
                    (SegmentValue::Exact(x), SegmentValue::Exact(y)),
                    (SegmentValue::Exact(x + 1), SegmentValue::Exact(y + 1)),
                ],
                colour.filled(),
            )
        }))?;
        if n <= 30 {
            chart.draw_series(cells.iter().filter(|c| c.3 > 0).map(|&(x, y, _, count)| {
                Text::new(
                    count.to_string(),
                    (SegmentValue::CenterOf(x), SegmentValue::CenterOf(y)),
                    ("sans-serif", 10)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Center, VPos::Center)),
                )
            }))?;
        }
        root.present()?;
    }
    Ok(svg)
}

fn reliability(m: &Metrics) -> Result<String, Box<dyn std::error::Error>> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (480, 440)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("Reliability (ECE {})", f4(m.ece)),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
        chart
            .configure_mesh()
            .x_desc("confidence (top-1 score)")
            .y_desc("accuracy")
            .draw()?;
        chart.draw_series(m.bins.iter().filter(|b| b.count > 0).map(|b| {
            Rectangle::new(
                [(b.lo, 0.0), (b.hi, b.accuracy)],
                RGBColor(60, 110, 190).mix(0.75).filled(),
            )
        }))?;
        chart.draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], &BLACK))?;
        chart.draw_series(
            m.bins
                .iter()
                .filter(|b| b.count > 0)
                .map(|b| Circle::new((b.confidence, b.accuracy), 3, RED.filled())),
        )?;
        root.present()?;
    }
    Ok(svg)
}

fn precision_coverage(m: &Metrics) -> Result<String, Box<dyn std::error::Error>> {
    let low = m
        .curve
        .iter()
        .map(|p| p.precision)
        .fold(1.0f64, f64::min)
        .min(m.operating.iter().map(|o| o.target).fold(1.0, f64::min));
    let y0 = ((low - 0.05).max(0.0) * 20.0).floor() / 20.0;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (480, 440)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Precision vs coverage", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1f64, y0..1.0f64)?;
        chart
            .configure_mesh()
            .x_desc("coverage (share auto-accepted)")
            .y_desc("precision of the accepted")
            .draw()?;
        chart.draw_series(LineSeries::new(
            m.curve.iter().map(|p| (p.coverage, p.precision)),
            RGBColor(60, 110, 190).stroke_width(2),
        ))?;
        chart.draw_series(
            m.operating
                .iter()
                .filter(|o| o.threshold.is_some())
                .map(|o| Circle::new((o.coverage, o.precision), 4, RED.filled())),
        )?;
        root.present()?;
    }
    Ok(svg)
}
