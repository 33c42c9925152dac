//! `clipstream plan`: what changed since the last night.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use clipstream_model::preprocess::ImageMode;
use clipstream_model::{ModelDir, Variant};
use clipstream_pipeline::catalog::plan::{PlanInput, PlanSummary};
use clipstream_pipeline::catalog::{Columns, plan as planner, progress, s3_folder};
use clipstream_pipeline::config::{PipelineConfig, Scheme};

use crate::commands::{Spool, bar};
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Tonight's catalog export: JSON Lines (.jsonl), CSV (.csv) or Parquet
    /// (.parquet); local or s3://bucket/key.
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
    /// output; local or s3:// (repeatable; a missing folder is a first
    /// night).
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
    /// updated_at): images are then never looked at. Without it, local
    /// images are compared by size and mtime, s3:// images by the ETags of
    /// a listing (the pipeline's [s3] settings; nothing is downloaded).
    #[arg(long, value_name = "NAME")]
    pub change_column: Option<String>,
    /// The fleet's records/s, for the estimate of the night's encode time.
    #[arg(long, value_name = "N", value_parser = crate::args::positive_rate)]
    pub rate: Option<f64>,
    /// Refuse a night that would delete more than this share of the
    /// products in earlier output (a partial export must not empty the
    /// index).
    #[arg(long, default_value_t = 10.0, value_name = "PERCENT", value_parser = crate::args::percent)]
    pub max_deleted_percent: f64,
    /// Also send the planned events to the pipeline's Kafka topic (its
    /// [source] topics[0], keyed by product id) for the worker fleet, before
    /// the plan is complete.
    #[arg(long, requires = "pipeline")]
    pub publish: bool,
    /// Write a new plan even if the night's folder holds one.
    #[arg(long)]
    pub replan: bool,
    /// Print the summary as JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Where `s3://` folders are copied to be read (default: the system's
    /// temporary folder); removed afterwards.
    #[arg(long, value_name = "DIR")]
    pub spool: Option<PathBuf>,
}

pub fn plan(args: PlanArgs) -> anyhow::Result<ExitCode> {
    let cfg = match &args.pipeline {
        Some(p) => Some(PipelineConfig::load(p)?),
        None => None,
    };
    let (dir, variant, mode, s3, buckets) = match &cfg {
        Some(cfg) => (
            cfg.model.dir.clone(),
            cfg.model.variant.clone(),
            cfg.image.mode,
            cfg.s3.clone(),
            cfg.fetch.allowed_buckets.clone(),
        ),
        None => (
            args.model.clone().unwrap_or_default(),
            args.variant.clone(),
            args.image_mode,
            Default::default(),
            Vec::new(),
        ),
    };
    // Where --publish sends the events: the fleet's topic.
    let fleet = match (&cfg, args.publish) {
        (Some(cfg), true) => match &cfg.source {
            // The source cluster's own settings (security), and its limit
            // on an event's size.
            clipstream_pipeline::config::SourceConfig::Kafka(k) => Some((
                k.brokers.clone(),
                k.options.clone(),
                k.topics.first().cloned().unwrap_or_default(),
                k.max_event_bytes,
            )),
            _ => anyhow::bail!(
                "--publish needs a pipeline that reads from Kafka ([source] kind = \"kafka\")"
            ),
        },
        _ => None,
    };
    let fingerprint = format!(
        "{}{}",
        ModelDir::open(&dir)?.fingerprint(&variant)?,
        mode.fingerprint_suffix()
    );
    let spool = Spool::new(args.spool.as_ref(), "plan")?;
    let previous = args
        .previous
        .iter()
        .enumerate()
        .map(|(k, p)| spool.local(&s3, p, k, s3_folder::Expect::Earlier))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // A catalog on S3 is copied into the spool first (keeping its name, so
    // that its format is known).
    let catalog = if s3_folder::is_s3(&args.catalog) {
        let url = args.catalog.to_string_lossy().into_owned();
        let name = url
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .unwrap_or("catalog");
        let local = spool.0.join(name);
        s3_folder::download_object(&s3, &url, &local)?;
        local
    } else {
        args.catalog.clone()
    };
    let input = PlanInput {
        catalog,
        columns: Columns {
            id: args.id_column.clone(),
            image: column(&args.image_column),
            text: column(&args.text_column),
            change: args.change_column.clone(),
        },
        previous,
        fingerprint,
        out: args.night.clone(),
        rate: args.rate,
        max_deleted_share: args.max_deleted_percent / 100.0,
    };
    let progress = bar("plan");
    let mut remote = |uris: &[String]| s3_etags(&s3, &buckets, uris);
    let mut send = |events: &[serde_json::Value]| -> anyhow::Result<(u64, BTreeMap<i32, i64>)> {
        let Some((brokers, options, topic, max_bytes)) = &fleet else {
            return Ok((0, BTreeMap::new()));
        };
        let mut messages: Vec<(String, Option<Vec<u8>>)> = Vec::with_capacity(events.len());
        for e in events {
            let id = e["id"].as_str().unwrap_or_default().to_string();
            let bytes = e.to_string().into_bytes();
            // The workers would refuse it: say so here, and send the rest.
            if bytes.len() > *max_bytes {
                eprintln!(
                    "warning: the event of {id:?} is {} bytes, over the source's max_event_bytes ({max_bytes}): not published",
                    bytes.len()
                );
                continue;
            }
            messages.push((id, Some(bytes)));
        }
        // Marked with the night and its size: the fleet's dashboard shows
        // the night's progress from them.
        let mark = progress::NightMark {
            night: progress::night_name(&args.night),
            planned: messages.len() as u64,
            published: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        clipstream_pipeline::catalog::tombstones::send(
            brokers,
            options,
            topic,
            &messages,
            &progress::headers(&mark),
        )
    };
    let publish: Option<planner::Publish> = if fleet.is_some() {
        Some(&mut send)
    } else {
        None
    };
    let (summary, written) = planner::plan(
        &input,
        args.replan,
        &mut remote,
        publish,
        |step: &str, done: usize, total: usize| {
            if let Some(b) = &progress {
                b.set_message(step.to_string());
                b.set_length(total as u64);
                b.set_position(done as u64);
            }
        },
    )?;
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

/// Change tokens (ETags) of `s3://` images from listings (the [s3]
/// settings of the pipeline): per bucket, one listing of the keys' longest
/// common folder.
fn s3_etags(
    cfg: &clipstream_pipeline::config::S3Config,
    allowed: &[String],
    uris: &[String],
) -> anyhow::Result<(HashMap<String, String>, u64)> {
    use clipstream_pipeline::fetch::{Location, resolve};
    let mut by_bucket: BTreeMap<String, Vec<(String, &String)>> = BTreeMap::new();
    for uri in uris {
        // Anything else is left out of the answer: that product's image
        // cannot be looked at (counted), and the run would refuse it too.
        if let Ok(Location::S3 { bucket, key }) = resolve(uri, &[Scheme::S3], Path::new("/"))
            && (allowed.is_empty() || allowed.contains(&bucket))
        {
            by_bucket.entry(bucket).or_default().push((key, uri));
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let stats = std::sync::Arc::new(clipstream_pipeline::stats::Stats::default());
        let s3 = clipstream_pipeline::s3::S3::connect(cfg, stats).await;
        let (mut out, mut requests) = (HashMap::new(), 0);
        for (bucket, keys) in by_bucket {
            let prefix = common_folder(keys.iter().map(|(k, _)| k.as_str()));
            // A bucket that cannot be listed leaves its products as they
            // were (counted), not the whole night undone.
            let (etags, pages) = match s3.list_change_tokens(&bucket, &prefix).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!(
                        "warning: cannot list s3://{bucket}/{prefix}: {e}; its {} products are skipped tonight",
                        keys.len()
                    );
                    continue;
                }
            };
            requests += pages;
            let etags: HashMap<String, String> = etags.into_iter().collect();
            for (key, uri) in keys {
                if let Some(e) = etags.get(&key) {
                    out.insert(uri.clone(), e.clone());
                }
            }
        }
        Ok((out, requests))
    })
}

/// The longest common prefix of `keys` that ends with `/` ("" if none).
fn common_folder<'a>(mut keys: impl Iterator<Item = &'a str>) -> String {
    let Some(first) = keys.next() else {
        return String::new();
    };
    let mut common = first.len();
    for k in keys {
        common = first
            .bytes()
            .zip(k.bytes())
            .take(common)
            .take_while(|(a, b)| a == b)
            .count();
    }
    // `/` is one byte, so the prefix up to it ends on a character boundary
    // even where the keys part in the middle of a character.
    match first.as_bytes()[..common].iter().rposition(|&b| b == b'/') {
        Some(i) => first[..=i].to_string(),
        None => String::new(),
    }
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
    if s.listing_requests > 0 {
        println!(
            "S3 listing requests for image ETags: {}",
            s.listing_requests
        );
    }
    if s.deletions_held > 0 {
        println!(
            "deletions held back: {} (catalog rows that could not be read may be those products)",
            s.deletions_held
        );
    }
    if s.unreadable_images > 0 {
        println!(
            "skipped: {} products whose image cannot be looked at",
            s.unreadable_images
        );
    }
    for p in s.problems.iter().take(10) {
        println!("  {p}");
    }
    if let Some(n) = s.published {
        println!("published: {n} events to the fleet's topic");
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

fn column(name: &str) -> Option<String> {
    (!name.is_empty()).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::common_folder;

    #[test]
    fn common_folder_stops_at_a_slash() {
        assert_eq!(
            common_folder(["a/b/c.jpg", "a/b/d.jpg"].into_iter()),
            "a/b/"
        );
        assert_eq!(common_folder(["a/bx.jpg", "a/by.jpg"].into_iter()), "a/");
        assert_eq!(common_folder(["x.jpg", "y.jpg"].into_iter()), "");
        assert_eq!(common_folder(["a/é1", "a/è2"].into_iter()), "a/");
        assert_eq!(common_folder(["only/one.jpg"].into_iter()), "only/");
        assert_eq!(common_folder(std::iter::empty()), "");
    }
}
