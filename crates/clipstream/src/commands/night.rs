//! `clipstream night`: one night of catalog re-embedding for a worker fleet,
//! in one command (what the Helm chart's CronJob runs): plan and publish
//! what changed since the newest earlier snapshot, wait for the fleet to
//! embed it, write tonight's snapshot and the removed products' tombstones.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use clipstream_pipeline::catalog::s3_folder;
use clipstream_pipeline::config::{PipelineConfig, SourceConfig};

use super::catalog::{PlanArgs, SnapshotArgs};

#[derive(Debug, Args)]
pub struct NightArgs {
    /// Tonight's catalog export: JSON Lines, CSV or Parquet; local or
    /// s3://bucket/key.
    #[arg(long, value_name = "FILE")]
    pub catalog: PathBuf,
    /// The fleet's pipeline ([source] kind = "kafka"): the plan's events go
    /// to its topic, the snapshot reads its [sink.parquet] output and sends
    /// tombstones to its embeddings topic.
    #[arg(long, value_name = "FILE")]
    pub pipeline: PathBuf,
    /// The folder of the nightly snapshots, local or s3://: tonight's is
    /// written to SNAPSHOTS/NAME/, and the newest finished one whose name
    /// sorts before NAME is the previous night.
    #[arg(long, value_name = "DIR")]
    pub snapshots: PathBuf,
    /// The night's name (default: today's date in UTC, YYYY-MM-DD; letters,
    /// digits, `.`, `_`, `-`).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Where the night's plan is kept: WORK/NAME/ (a rerun of the night on
    /// the same folder resumes it instead of publishing again).
    #[arg(long, value_name = "DIR")]
    pub work: PathBuf,
    /// How long to wait for the fleet to embed the night, in seconds.
    #[arg(long, default_value_t = 6 * 3600, value_name = "SECONDS")]
    pub wait: u64,
    /// The catalog column of the product id.
    #[arg(long, default_value = "id", value_name = "NAME")]
    pub id_column: String,
    /// The catalog column of the image URI; "" for none.
    #[arg(long, default_value = "image", value_name = "NAME")]
    pub image_column: String,
    /// The catalog column of the text; "" for none.
    #[arg(long, default_value = "text", value_name = "NAME")]
    pub text_column: String,
    /// A catalog column that changes whenever the image does (see `plan`).
    #[arg(long, value_name = "NAME")]
    pub change_column: Option<String>,
    /// Refuse a night that would delete more than this share of products.
    #[arg(long, default_value_t = 10.0, value_name = "PERCENT", value_parser = crate::args::percent)]
    pub max_deleted_percent: f64,
    /// Where s3:// folders are copied to be read (default: the system's
    /// temporary folder).
    #[arg(long, value_name = "DIR")]
    pub spool: Option<PathBuf>,
}

/// Today in UTC, `YYYY-MM-DD`.
fn today() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    clipstream_pipeline::sink::parquet::destination::date_folder(Some(ms))
}

/// A night's name: used in paths and as a label, so a plain one.
fn check_name(name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !name.is_empty()
            && name.len() <= clipstream_pipeline::catalog::progress::MAX_NAME
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
        "--name {name:?}: use letters, digits, '.', '_' and '-' (at most 64, not starting with '.')"
    );
    Ok(())
}

/// `folder/name`, for a local path or an `s3://` folder (ending in `/`).
fn child(folder: &Path, name: &str) -> PathBuf {
    if s3_folder::is_s3(folder) {
        let url = folder.to_string_lossy();
        PathBuf::from(format!("{}/{name}/", url.trim_end_matches('/')))
    } else {
        folder.join(name)
    }
}

/// The newest finished snapshot before `name`.
fn previous(snapshots: &[String], name: &str) -> Option<String> {
    snapshots
        .iter()
        .filter(|s| s.as_str() < name)
        .max()
        .cloned()
}

pub fn night(args: NightArgs) -> anyhow::Result<ExitCode> {
    let name = args.name.clone().unwrap_or_else(today);
    check_name(&name)?;
    let cfg = PipelineConfig::load(&args.pipeline)?;
    anyhow::ensure!(
        matches!(cfg.source, SourceConfig::Kafka(_)),
        "{}: `clipstream night` runs a fleet's night and needs [source] kind = \"kafka\" \
         (for a local night see scripts/nightly.sh)",
        args.pipeline.display()
    );
    let output = match (&cfg.sink.parquet.url, &cfg.sink.parquet.dir) {
        (Some(url), _) => PathBuf::from(url),
        (None, Some(dir)) => dir.clone(),
        (None, None) => anyhow::bail!(
            "{}: [sink.parquet] has neither url nor dir",
            args.pipeline.display()
        ),
    };
    let finished = s3_folder::finished_snapshots(&cfg.s3, &args.snapshots)?;
    let previous = previous(&finished, &name).map(|p| child(&args.snapshots, &p));
    let work = args.work.join(&name);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    println!(
        "== night {name}: plan (previous snapshot: {})",
        previous
            .as_ref()
            .map_or("none: a first night".into(), |p| p.display().to_string())
    );
    super::catalog::plan(PlanArgs {
        catalog: args.catalog.clone(),
        pipeline: Some(args.pipeline.clone()),
        model: None,
        variant: cfg.model.variant.clone(),
        image_mode: cfg.image.mode,
        previous: previous.iter().cloned().collect(),
        night: work.clone(),
        id_column: args.id_column.clone(),
        image_column: args.image_column.clone(),
        text_column: args.text_column.clone(),
        change_column: args.change_column.clone(),
        rate: None,
        max_deleted_percent: args.max_deleted_percent,
        publish: true,
        replan: false,
        json: false,
        spool: args.spool.clone(),
    })?;
    println!("== night {name}: snapshot, once the fleet has embedded the plan");
    super::catalog::snapshot(SnapshotArgs {
        night: work,
        output: vec![output],
        previous,
        out: child(&args.snapshots, &name),
        wait: Some(args.wait),
        spool: args.spool.clone(),
        pipeline: Some(args.pipeline.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_night_is_the_newest_before_tonight() {
        let s: Vec<String> = ["2026-11-29", "2026-11-30", "2026-12-02"]
            .map(String::from)
            .to_vec();
        assert_eq!(previous(&s, "2026-12-01").as_deref(), Some("2026-11-30"));
        assert_eq!(previous(&s, "2026-12-02").as_deref(), Some("2026-11-30"));
        assert_eq!(previous(&s, "2026-11-01"), None);
        assert_eq!(
            child(Path::new("s3://b/snaps"), "n1"),
            PathBuf::from("s3://b/snaps/n1/")
        );
        assert_eq!(
            child(Path::new("s3://b/snaps/"), "n1"),
            PathBuf::from("s3://b/snaps/n1/")
        );
    }

    #[test]
    fn night_names_are_plain() {
        for bad in ["", "../x", ".hidden", "a b", "a/b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["2026-12-02", "night_1.a"] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
    }
}
