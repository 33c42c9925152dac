//! `clipstream search`: query what a run produced. Texts and images are
//! embedded with the model that wrote the output and compared, by an exact
//! scan, with its image (or text) embeddings.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use clipstream_model::ModelDir;
use clipstream_pipeline::config::PipelineConfig;
use clipstream_pipeline::search::{self, Hit, QueryModel, Target};
use serde::Serialize;

use crate::args::{ImageArgs, ModelArgs, RuntimeArgs};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TargetArg {
    /// Find images (the output's image embeddings).
    Image,
    /// Find texts (the output's text embeddings).
    Text,
}

#[derive(Debug, Args)]
pub struct SearchArgs {
    /// The output to search: a run's [sink.parquet] folder or a snapshot,
    /// local or s3:// (copied into --spool first).
    #[arg(value_name = "OUTPUT")]
    pub output: PathBuf,
    /// Text queries ("a red dress"); each gets its own results.
    #[arg(value_name = "QUERY")]
    pub queries: Vec<String>,
    /// An image query (repeatable): image → image, or image → text with
    /// --target text.
    #[arg(long = "image", value_name = "FILE")]
    pub image_queries: Vec<PathBuf>,
    /// The model that wrote the output (another is refused).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The export of the towers.
    #[arg(long, default_value = "fp32", value_name = "VARIANT")]
    pub variant: clipstream_model::Variant,
    /// What to find: images or texts.
    #[arg(long, value_enum, default_value = "image")]
    pub target: TargetArg,
    /// Results per query.
    #[arg(short = 'k', long = "top", default_value_t = 10, value_name = "K")]
    pub k: usize,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// For an s3:// output: the pipeline whose [s3] settings reach it.
    #[arg(long, value_name = "FILE")]
    pub pipeline: Option<PathBuf>,
    /// Where an s3:// output is copied to be read (default: the system's
    /// temporary folder); removed afterwards.
    #[arg(long, value_name = "DIR")]
    pub spool: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub images: ImageArgs,
}

#[derive(Serialize)]
struct Answer<'a> {
    query: String,
    kind: &'static str,
    hits: &'a [Hit],
}

pub fn search(args: SearchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        !args.queries.is_empty() || !args.image_queries.is_empty(),
        "nothing to search for: give a QUERY text and/or --image FILE"
    );
    anyhow::ensure!(
        (1..=10_000).contains(&args.k),
        "--top {}: between 1 and 10000",
        args.k
    );
    let dir = ModelDir::open(&args.model)?;
    let fingerprint = dir.fingerprint(&args.variant)?;
    let model_args = ModelArgs {
        model: args.model.clone(),
        variant: args.variant.clone(),
        runtime: args.runtime.clone(),
    };
    let mut model = super::load_model(&model_args, &args.images)?;
    let mut queries: Vec<(String, &'static str, Vec<f32>)> = Vec::new();
    if !args.queries.is_empty() {
        let e = model.embed_texts(&args.queries)?;
        for (q, row) in args.queries.iter().zip(e.rows()) {
            queries.push((q.clone(), "text", row.to_vec()));
        }
    }
    for path in &args.image_queries {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let v = model
            .embed_image_bytes(&bytes)?
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        queries.push((path.display().to_string(), "image", v));
    }
    let query_model = QueryModel {
        id: model.model_id(),
        fingerprint,
        dim: queries[0].2.len(),
    };
    let s3 = match &args.pipeline {
        Some(p) => PipelineConfig::load(p)?.s3,
        None => Default::default(),
    };
    let spool = super::Spool::new(args.spool.as_ref(), "search")?;
    let output = spool.local(
        &s3,
        &args.output,
        0,
        clipstream_pipeline::catalog::s3_folder::Expect::Earlier,
    )?;
    let target = match args.target {
        TargetArg::Image => Target::Image,
        TargetArg::Text => Target::Text,
    };
    let vectors: Vec<Vec<f32>> = queries.iter().map(|q| q.2.clone()).collect();
    let (results, scanned) = search::search(&[output], target, &vectors, args.k, &query_model)?;
    let mut text = String::new();
    if args.json {
        let answers: Vec<Answer> = queries
            .iter()
            .zip(&results)
            .map(|((q, kind, _), hits)| Answer {
                query: q.clone(),
                kind,
                hits,
            })
            .collect();
        text = serde_json::to_string_pretty(&serde_json::json!({
            "model_id": query_model.id,
            "target": target.column(),
            "results": answers,
            "scanned": scanned,
        }))?;
        text.push('\n');
    } else {
        use std::fmt::Write as _;
        for ((q, kind, _), hits) in queries.iter().zip(&results) {
            let _ = writeln!(
                text,
                "{kind} query {q:?} -> {}: {} of {} rows",
                target.column(),
                hits.len(),
                scanned.rows
            );
            for (n, h) in hits.iter().enumerate() {
                let what = match target {
                    Target::Image => h.image_uri.as_deref().unwrap_or(""),
                    Target::Text => h.text.as_deref().unwrap_or(""),
                };
                let _ = writeln!(text, "  {:>3}  {:.4}  {}  {}", n + 1, h.score, h.id, what);
            }
        }
        let _ = writeln!(
            text,
            "scanned {} rows ({:.2} MB of embeddings) in {} files: Parquet reading {:.1} ms, scoring {:.1} ms",
            scanned.rows,
            scanned.bytes as f64 / 1e6,
            scanned.files,
            scanned.decode_secs * 1e3,
            scanned.score_secs * 1e3
        );
    }
    super::print_out(&text)?;
    Ok(ExitCode::SUCCESS)
}
