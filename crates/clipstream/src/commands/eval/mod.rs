//! `clipstream eval`: how good are the labels. Reads records with a known
//! true label (`attributes.<field>`) and either encodes their images with
//! a model and one or more label sets (prompt sets compared side by side),
//! or reads the labels a run already wrote (its Parquet output). Prints
//! the figures, and writes them as JSON and as an HTML report with charts.

mod charts;
mod report;

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use clipstream_model::{LabelSet, ZeroShotHead};
use clipstream_pipeline::eval::{self, Sample, Skipped};

use self::report::{Report, SetReport};
use crate::args::{ImageArgs, ModelArgs, RuntimeArgs};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A manifest (JSON Lines: {"id", "image", "attributes": {FIELD: true
    /// label}}), images local (paths relative to the manifest) or file://.
    /// With --model: encoded and labelled here. With --output: only its
    /// true labels are used (matched by id).
    #[arg(long, value_name = "FILE", required_unless_present = "output")]
    pub manifest: Option<PathBuf>,
    /// The model to label the manifest's images with.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "output",
        requires = "manifest"
    )]
    pub model: Option<PathBuf>,
    /// With --model: the export of the towers.
    #[arg(long, default_value = "fp32", value_name = "VARIANT")]
    pub variant: clipstream_model::Variant,
    /// A label set (TOML); repeat to compare prompt sets side by side. With
    /// --output: the classes (default: the labels seen).
    #[arg(
        long = "labels",
        value_name = "FILE",
        required_unless_present = "output"
    )]
    pub labels: Vec<PathBuf>,
    /// Instead of a model: a run's Parquet output (its labels column); the
    /// true labels come from its rows' attributes, or from --manifest.
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// The attribute holding the true label.
    #[arg(long, default_value = "true_label", value_name = "NAME")]
    pub truth_field: String,
    /// Target precisions for the auto-accept thresholds (comma-separated).
    #[arg(
        long,
        default_value = "0.9,0.95,0.99",
        value_delimiter = ',',
        value_name = "P"
    )]
    pub precision: Vec<f64>,
    /// Also write every figure, and each record's labels, as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also write a self-contained HTML report (confusion matrix,
    /// reliability diagram, precision–coverage curve).
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Also write the charts as SVG files into this folder:
    /// `<set>-confusion.svg`, `<set>-reliability.svg` and
    /// `<set>-precision-coverage.svg`, `<set>` the label set's file stem.
    #[arg(long, value_name = "DIR")]
    pub svg: Option<PathBuf>,
    /// Images per ONNX Runtime call.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub batch_size: usize,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub images: ImageArgs,
}

/// A manifest line: id, image and true label (if any).
struct Line {
    id: String,
    image: Option<String>,
    truth: Option<String>,
}

fn read_manifest(path: &Path, field: &str) -> anyhow::Result<(Vec<Line>, usize)> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    let mut bad = 0;
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}: line {}", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            bad += 1;
            continue;
        };
        let Some(id) = v.get("id").and_then(|i| i.as_str()) else {
            bad += 1;
            continue;
        };
        out.push(Line {
            id: id.to_string(),
            image: v.get("image").and_then(|i| i.as_str()).map(str::to_string),
            truth: v.get("attributes").and_then(|a| eval::truth_of(a, field)),
        });
    }
    Ok((out, bad))
}

fn no_truth_error(field: &str, from: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "no record of {from} has attributes.{field}: name the attribute that holds the true label with --truth-field"
    )
}

pub fn eval(args: EvalArgs) -> anyhow::Result<ExitCode> {
    for p in &args.precision {
        anyhow::ensure!(
            (0.0..=1.0).contains(p),
            "--precision {p}: a precision is between 0 and 1"
        );
    }
    let report = match (&args.output, &args.model) {
        (Some(output), _) => from_output(&args, output)?,
        (None, Some(model)) => from_model(&args, model)?,
        (None, None) => anyhow::bail!(
            "give --model DIR (label the manifest's images here) or --output DIR (a run's labels)"
        ),
    };
    let mut text = report::text(&report);
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        text.push_str(&format!("JSON: {}\n", path.display()));
    }
    if let Some(path) = &args.html {
        std::fs::write(path, report::html(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        text.push_str(&format!("HTML report: {}\n", path.display()));
    }
    if let Some(dir) = &args.svg {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (k, set) in report.sets.iter().enumerate() {
            let stem_of = |name: &str| {
                Path::new(name)
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .filter(|s| !s.is_empty())
            };
            let mut stem = stem_of(&set.name).unwrap_or_else(|| format!("set-{k}"));
            // Two label sets of the same file name keep their own charts.
            if report
                .sets
                .iter()
                .filter(|o| stem_of(&o.name).as_deref() == Some(stem.as_str()))
                .count()
                > 1
            {
                stem = format!("{k}-{stem}");
            }
            for (chart, svg) in charts::charts(&set.metrics, &set.classes)? {
                let path = dir.join(format!("{stem}-{chart}.svg"));
                std::fs::write(&path, svg)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        text.push_str(&format!("SVG charts: {}\n", dir.display()));
    }
    super::print_out(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// Labels the manifest's images with the model, for each label set.
fn from_model(args: &EvalArgs, model_dir: &Path) -> anyhow::Result<Report> {
    let manifest = args.manifest.as_ref().context("--model needs --manifest")?;
    let (lines, mut unreadable) = read_manifest(manifest, &args.truth_field)?;
    if !lines.iter().any(|l| l.truth.is_some()) {
        return Err(no_truth_error(
            &args.truth_field,
            &manifest.display().to_string(),
        ));
    }
    let sets = args
        .labels
        .iter()
        .map(|p| Ok((p, LabelSet::from_file(p)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let model_args = ModelArgs {
        model: model_dir.to_path_buf(),
        variant: args.variant.clone(),
        runtime: args.runtime.clone(),
    };
    let mut model = super::load_model(&model_args, &args.images)?;
    let heads = sets
        .iter()
        .map(|(_, set)| Ok(ZeroShotHead::build(set, &mut model)?))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Only records with a true label are encoded.
    let base = manifest.parent().unwrap_or(Path::new("."));
    let mut paths = Vec::new();
    let mut wanted = Vec::new();
    let mut no_truth = 0;
    let mut not_local = 0;
    for l in &lines {
        if l.truth.is_none() {
            no_truth += 1;
            continue;
        }
        match l.image.as_deref() {
            Some(img) if !img.contains("://") || img.starts_with("file://") => {
                let p = PathBuf::from(img.strip_prefix("file://").unwrap_or(img));
                paths.push(if p.is_absolute() { p } else { base.join(p) });
                wanted.push(l);
            }
            Some(_) => not_local += 1,
            // Nothing to label: counted as a record without labels.
            None => {
                paths.push(PathBuf::new());
                wanted.push(l);
            }
        }
    }
    if not_local > 0 {
        eprintln!(
            "warning: {not_local} records with non-local images (s3://, http://) left out: evaluate a run's output with --output for those"
        );
    }
    let mut failures = crate::commands::model::Failures::default();
    let mut embedded: std::collections::HashMap<PathBuf, Vec<f32>> = Default::default();
    let progress = crate::commands::bar("eval");
    let images: Vec<PathBuf> = paths
        .iter()
        .filter(|p| !p.as_os_str().is_empty())
        .cloned()
        .collect();
    if let Some(b) = &progress {
        b.set_length(images.len() as u64);
    }
    crate::commands::model::for_each_image_batch(
        &mut model,
        &images,
        args.batch_size,
        &mut failures,
        |ok, e| {
            for (p, row) in ok.iter().zip(e.rows()) {
                embedded.insert(p.to_path_buf(), row.to_vec());
            }
            if let Some(b) = &progress {
                b.inc(ok.len() as u64);
            }
            Ok(())
        },
    )?;
    if let Some(b) = progress {
        b.finish_and_clear();
    }
    unreadable += failures.0;
    let mut reports = Vec::new();
    for ((path, _), head) in sets.iter().zip(&heads) {
        let classes = head.classes().to_vec();
        let candidates = wanted
            .iter()
            .zip(&paths)
            .map(|(l, p)| {
                let ranked = embedded.get(p).map_or_else(Vec::new, |e| {
                    let mut r: Vec<(String, f64)> = classes
                        .iter()
                        .cloned()
                        .zip(head.scores(e).into_iter().map(f64::from))
                        .collect();
                    r.sort_by(|a, b| b.1.total_cmp(&a.1));
                    r
                });
                (l.id.clone(), l.truth.clone(), ranked)
            })
            .collect();
        let (samples, mut skipped) = eval::admit(candidates, &classes);
        skipped.no_truth += no_truth;
        reports.push(set_report(
            path.display().to_string(),
            classes,
            skipped,
            samples,
            args,
        )?);
    }
    Ok(Report {
        source: format!("model {}", model_dir.display()),
        truth_field: args.truth_field.clone(),
        records: lines.len(),
        unreadable,
        sets: reports,
    })
}

fn set_report(
    name: String,
    classes: Vec<String>,
    skipped: Skipped,
    samples: Vec<Sample>,
    args: &EvalArgs,
) -> anyhow::Result<SetReport> {
    anyhow::ensure!(
        !samples.is_empty(),
        "{name}: no record could be evaluated ({} without attributes.{}, {} with a label unknown to the label set, {} without labels)",
        skipped.no_truth,
        args.truth_field,
        skipped.unknown_truth.values().sum::<usize>(),
        skipped.no_labels
    );
    let metrics = eval::evaluate(&samples, &classes, &args.precision);
    Ok(SetReport {
        name,
        classes,
        skipped,
        metrics,
        samples,
    })
}

/// Reads the labels a run wrote.
fn from_output(args: &EvalArgs, output: &Path) -> anyhow::Result<Report> {
    let rows = eval::output::read(output)?;
    let models: BTreeSet<&str> = rows.iter().map(|r| r.model_id.as_str()).collect();
    anyhow::ensure!(
        models.len() <= 1,
        "{}: written by more than one model ({}): evaluate each run's output on its own",
        output.display(),
        models.into_iter().collect::<Vec<_>>().join(", ")
    );
    // True labels: from the manifest when given, else the rows' attributes.
    let truths: Option<std::collections::HashMap<String, Option<String>>> = match &args.manifest {
        Some(m) => {
            let (lines, _) = read_manifest(m, &args.truth_field)?;
            if !lines.iter().any(|l| l.truth.is_some()) {
                return Err(no_truth_error(&args.truth_field, &m.display().to_string()));
            }
            Some(lines.into_iter().map(|l| (l.id, l.truth)).collect())
        }
        None => None,
    };
    let candidates: Vec<eval::Candidate> = rows
        .iter()
        .map(|r| {
            let truth = match &truths {
                Some(t) => t.get(&r.id).cloned().flatten(),
                None => eval::truth_of(&r.attributes, &args.truth_field),
            };
            (r.id.clone(), truth, r.labels.clone())
        })
        .collect();
    if candidates.iter().all(|c| c.1.is_none()) {
        return Err(no_truth_error(
            &args.truth_field,
            &output.display().to_string(),
        ));
    }
    if candidates.iter().all(|c| c.2.is_empty()) {
        anyhow::bail!(
            "{}: no row has labels (was the run's [model] labels set?)",
            output.display()
        );
    }
    anyhow::ensure!(
        args.labels.len() <= 1,
        "--output: give at most one --labels (the run wrote one label set's labels)"
    );
    let (name, classes) = match args.labels.first() {
        Some(p) => {
            let set = LabelSet::from_file(p)?;
            (p.display().to_string(), set.classes.clone())
        }
        None => {
            // The true labels and what was predicted for them: labels only
            // ever ranked second are not classes of the evaluation.
            let mut seen = BTreeSet::new();
            for (_, truth, ranked) in &candidates {
                if let Some(t) = truth {
                    seen.insert(t.clone());
                    seen.extend(ranked.first().map(|(l, _)| l.clone()));
                }
            }
            (output.display().to_string(), seen.into_iter().collect())
        }
    };
    let (samples, skipped) = eval::admit(candidates, &classes);
    Ok(Report {
        source: format!(
            "output {} (model {})",
            output.display(),
            rows.first().map_or("", |r| r.model_id.as_str())
        ),
        truth_field: args.truth_field.clone(),
        records: rows.len(),
        unreadable: 0,
        sets: vec![set_report(name, classes, skipped, samples, args)?],
    })
}
