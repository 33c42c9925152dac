//! The charts of a label set, as SVG drawn with plotters: the confusion
//! matrix, the reliability diagram, and precision against coverage.

use clipstream_pipeline::eval::Metrics;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// A figure as printed: four decimals (the independent check compares
/// these digits; the report prints figures the same way).
pub(super) fn f4(x: f64) -> String {
    format!("{x:.4}")
}

/// The three charts of a label set: (name, SVG).
pub fn charts(m: &Metrics, classes: &[String]) -> anyhow::Result<Vec<(&'static str, String)>> {
    [
        ("confusion", confusion(m, classes)),
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
