//! `clipstream snapshot`: one row per product after a night.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use clipstream_pipeline::catalog::snapshot::SnapshotInput;
use clipstream_pipeline::catalog::{plan as planner, s3_folder, snapshot as snapshotter};
use clipstream_pipeline::config::PipelineConfig;

use crate::commands::{Spool, bar};
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The night's folder (written by `clipstream plan`).
    #[arg(long, value_name = "DIR")]
    pub night: PathBuf,
    /// Tonight's run output (the pipeline's [sink.parquet] dir or url;
    /// local or s3://; repeatable).
    #[arg(long, value_name = "DIR", required = true)]
    pub output: Vec<PathBuf>,
    /// The previous night's snapshot, local or s3:// (none on a first night).
    #[arg(long, value_name = "DIR")]
    pub previous: Option<PathBuf>,
    /// Where the snapshot goes: a new folder, local or s3:// (a finished
    /// snapshot there is kept as it is).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// With a fleet (`plan --publish`): first wait up to this many seconds
    /// for the pipeline's consumer group to have committed every event the
    /// plan published, and fail, saying how far it got, if it has not.
    #[arg(long, value_name = "SECONDS", requires = "pipeline")]
    pub wait: Option<u64>,
    /// Where `s3://` folders are copied to be read and the snapshot is
    /// written before its upload (default: the system's temporary folder);
    /// removed afterwards.
    #[arg(long, value_name = "DIR")]
    pub spool: Option<PathBuf>,
    /// The night's pipeline: when it has a [sink.kafka] embeddings_topic,
    /// the removed products' tombstones (the id as key, no value) are
    /// published there once the snapshot is in place (again on a rerun:
    /// that is harmless).
    #[arg(long, value_name = "FILE")]
    pub pipeline: Option<PathBuf>,
}

pub fn snapshot(args: SnapshotArgs) -> anyhow::Result<ExitCode> {
    let cfg = match &args.pipeline {
        Some(p) => Some(PipelineConfig::load(p)?),
        None => None,
    };
    let s3 = cfg.as_ref().map(|c| c.s3.clone()).unwrap_or_default();
    let remote_out = s3_folder::is_s3(&args.out).then(|| args.out.to_string_lossy().into_owned());
    if let Some(url) = &remote_out
        && s3_folder::has(&s3, url, "_snapshot.json")?
    {
        println!("{url} is a finished snapshot (kept; its tombstones went out before it was)");
        return Ok(ExitCode::SUCCESS);
    }
    if let (Some(secs), Some(cfg)) = (args.wait, &cfg) {
        let clipstream_pipeline::config::SourceConfig::Kafka(k) = &cfg.source else {
            anyhow::bail!("--wait needs a pipeline that reads from Kafka (the fleet's)");
        };
        let plan = planner::existing(&args.night)?.with_context(|| {
            format!(
                "{}: no plan (run `clipstream plan` first)",
                args.night.display()
            )
        })?;
        let topic = k.topics.first().cloned().unwrap_or_default();
        eprintln!(
            "waiting for group {:?} to finish the night's {} events ...",
            k.group_id,
            plan.published.unwrap_or(0)
        );
        clipstream_pipeline::catalog::tombstones::wait_committed(
            &k.brokers,
            &k.options,
            &k.group_id,
            &topic,
            &plan.published_ends,
            std::time::Duration::from_secs(secs),
        )?;
    }
    let spool = Spool::new(args.spool.as_ref(), "snapshot")?;
    let outputs = args
        .output
        .iter()
        .enumerate()
        .map(|(k, p)| spool.local(&s3, p, k, s3_folder::Expect::Output))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let previous = match &args.previous {
        Some(p) => Some(spool.local(&s3, p, args.output.len(), s3_folder::Expect::Snapshot)?),
        None => None,
    };
    let input = SnapshotInput {
        night: args.night.clone(),
        outputs,
        previous,
        out: match &remote_out {
            Some(_) => spool.0.join("snapshot"),
            None => args.out.clone(),
        },
    };
    // Tombstones go out before the snapshot is in place (renamed, or its
    // marker uploaded), so that a night is finished only once they are
    // acknowledged.
    let tombstones = match (&args.pipeline, &cfg) {
        (Some(p), Some(cfg)) => {
            let kafka = cfg.sink.kafka.clone();
            let topic = kafka.as_ref().and_then(|k| k.embeddings_topic.clone());
            match (cfg.kafka_sink_brokers(), topic) {
                (Some(brokers), Some(topic)) => {
                    let options = kafka.map(|k| k.options).unwrap_or_default();
                    Some((brokers, options, topic))
                }
                _ => {
                    println!(
                        "no tombstones: {} has no [sink.kafka] embeddings_topic",
                        p.display()
                    );
                    None
                }
            }
        }
        _ => None,
    };
    let mut sent = None;
    let mut publish = || -> anyhow::Result<()> {
        if let Some((brokers, options, topic)) = &tombstones {
            let n = clipstream_pipeline::catalog::tombstones::publish(
                brokers,
                options,
                topic,
                &args.night,
            )?;
            sent = Some((n, topic.clone()));
        }
        Ok(())
    };
    let progress = bar("snapshot");
    let (s, written) = snapshotter::snapshot(&input, &mut publish, |done, total| {
        if let Some(b) = &progress {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    })?;
    if let Some(b) = progress {
        b.finish_and_clear();
    }
    if let Some(url) = &remote_out {
        // The files, then the marker: a snapshot with `_snapshot.json` is
        // complete. A rerun after a partial upload finds its own objects.
        s3_folder::upload(&s3, &input.out, url, s3_folder::MARKER)?;
    }
    if !written {
        println!(
            "{} is a finished snapshot (kept; its tombstones went out before it was)",
            args.out.display()
        );
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
    if s.planned_not_done > 0 {
        println!(
            "{} planned products got no row tonight (see the run's dead letters); those embedded before keep their earlier row",
            s.planned_not_done
        );
    }
    if let Some((n, topic)) = sent {
        println!("tombstones: {n} on {topic}");
    }
    Ok(ExitCode::SUCCESS)
}
