//! `clipstream plan` and `clipstream snapshot`: the two ends of a nightly
//! re-embedding (see `clipstream_pipeline::catalog`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use clipstream_model::preprocess::ImageMode;
use clipstream_model::{ModelDir, Variant};
use clipstream_pipeline::catalog::plan::{PlanInput, PlanSummary};
use clipstream_pipeline::catalog::snapshot::SnapshotInput;
use clipstream_pipeline::catalog::{Columns, plan as planner, snapshot as snapshotter};
use clipstream_pipeline::config::PipelineConfig;

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Tonight's catalog export: JSON Lines (.jsonl) or CSV (.csv).
    #[arg(long, value_name = "FILE")]
    pub catalog: PathBuf,
    /// The pipeline that will embed the plan: its model (and image mode)
    /// decide whether earlier rows are still current.
    #[arg(long, value_name = "FILE", required_unless_present = "model")]
    pub pipeline: Option<PathBuf>,
    /// The model directory, instead of --pipeline.
    #[arg(long, value_name = "DIR", conflicts_with = "pipeline")]
    pub model: Option<PathBuf>,
    /// With --model: the export of the towers.
    #[arg(long, default_value = "fp32", value_name = "VARIANT")]
    pub variant: Variant,
    /// With --model: the image mode the run will use.
    #[arg(long, default_value = "exact", value_name = "MODE")]
    pub image_mode: ImageMode,
    /// Folder of earlier output: the last snapshot, or earlier nights' run
    /// output (repeatable; a missing folder is a first night).
    #[arg(long, value_name = "DIR")]
    pub previous: Vec<PathBuf>,
    /// The night's folder: the plan is written there (events.jsonl,
    /// deletions.jsonl, catalog-ids.jsonl, plan.json). A folder that
    /// already holds a plan keeps it (a rerun of the night resumes the same
    /// work) unless --replan.
    #[arg(long, value_name = "DIR")]
    pub night: PathBuf,
    /// The catalog column of the product id.
    #[arg(long, default_value = "id", value_name = "NAME")]
    pub id_column: String,
    /// The catalog column of the image URI (local path, file:// or s3://);
    /// "" for none.
    #[arg(long, default_value = "image", value_name = "NAME")]
    pub image_column: String,
    /// The catalog column of the text; "" for none.
    #[arg(long, default_value = "text", value_name = "NAME")]
    pub text_column: String,
    /// A catalog column that changes whenever the image does (a checksum,
    /// updated_at): images are then never looked at. Required for s3://
    /// images; local images are otherwise compared by size and mtime.
    #[arg(long, value_name = "NAME")]
    pub change_column: Option<String>,
    /// The fleet's records/s, for the estimate of the night's encode time.
    #[arg(long, value_name = "N")]
    pub rate: Option<f64>,
    /// Write a new plan even if the night's folder holds one.
    #[arg(long)]
    pub replan: bool,
    /// Print the summary as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The night's folder (written by `clipstream plan`).
    #[arg(long, value_name = "DIR")]
    pub night: PathBuf,
    /// Tonight's run output (the pipeline's [sink.parquet] dir; repeatable).
    #[arg(long, value_name = "DIR", required = true)]
    pub output: Vec<PathBuf>,
    /// The previous night's snapshot (none on a first night).
    #[arg(long, value_name = "DIR")]
    pub previous: Option<PathBuf>,
    /// Where the snapshot goes: a new folder (a finished snapshot there is
    /// kept as it is).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

fn bar(what: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{msg}} [{{bar:30}}] {{pos}}/{{len}} {{eta}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(bar)
}

fn column(name: &str) -> Option<String> {
    (!name.is_empty()).then(|| name.to_string())
}

pub fn plan(args: PlanArgs) -> anyhow::Result<ExitCode> {
    let (dir, variant, mode) = match &args.pipeline {
        Some(p) => {
            let cfg = PipelineConfig::load(p)?;
            (cfg.model.dir, cfg.model.variant, cfg.image.mode)
        }
        None => (
            args.model.clone().unwrap_or_default(),
            args.variant.clone(),
            args.image_mode,
        ),
    };
    let fingerprint = format!(
        "{}{}",
        ModelDir::open(&dir)?.fingerprint(&variant)?,
        mode.fingerprint_suffix()
    );
    let input = PlanInput {
        catalog: args.catalog.clone(),
        columns: Columns {
            id: args.id_column.clone(),
            image: column(&args.image_column),
            text: column(&args.text_column),
            change: args.change_column.clone(),
        },
        previous: args.previous.clone(),
        fingerprint,
        out: args.night.clone(),
        rate: args.rate,
    };
    let progress = bar("plan");
    let (summary, written) = planner::plan(&input, args.replan, |step, done, total| {
        if let Some(b) = &progress {
            b.set_message(step.to_string());
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    })?;
    if let Some(b) = progress {
        b.finish_and_clear();
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_plan(&summary, &args, written);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_plan(s: &PlanSummary, args: &PlanArgs, written: bool) {
    let night = args.night.display();
    if !written {
        println!("{night} already holds a plan (kept; --replan writes a new one):");
    }
    println!(
        "catalog {}: {} rows, {} products ({} duplicate ids: the last row wins; {} bad rows skipped)",
        args.catalog.display(),
        s.catalog_rows,
        s.products,
        s.duplicate_ids,
        s.bad_rows
    );
    println!(
        "earlier output: {} products; model {}",
        s.previous_products, s.fingerprint
    );
    println!(
        "to embed: {} (new {}, model changed {}, image changed {}, text changed {}); unchanged {}; deleted {}",
        s.planned, s.new, s.changed_model, s.changed_image, s.changed_text, s.unchanged, s.deleted
    );
    if s.unreadable_images > 0 {
        println!(
            "skipped: {} products whose image cannot be looked at",
            s.unreadable_images
        );
    }
    for p in s.problems.iter().take(10) {
        println!("  {p}");
    }
    if let Some(secs) = s.estimated_seconds {
        println!("estimated encode time: {secs:.0} s at the given rate");
    }
    println!(
        "events: {}  deletions: {}",
        planner::events_path(&args.night).display(),
        planner::deletions_path(&args.night).display()
    );
}

pub fn snapshot(args: SnapshotArgs) -> anyhow::Result<ExitCode> {
    let input = SnapshotInput {
        night: args.night.clone(),
        outputs: args.output.clone(),
        previous: args.previous.clone(),
        out: args.out.clone(),
    };
    let progress = bar("snapshot");
    let (s, written) = snapshotter::snapshot(&input, |done, total| {
        if let Some(b) = &progress {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    })?;
    if let Some(b) = progress {
        b.finish_and_clear();
    }
    if !written {
        println!("{} is a finished snapshot (kept):", args.out.display());
    }
    println!(
        "snapshot {}: {} rows in {} files ({} from tonight, {} carried over); {} products without a row",
        args.out.display(),
        s.rows,
        s.files,
        s.from_tonight,
        s.carried_over,
        s.missing
    );
    Ok(ExitCode::SUCCESS)
}
