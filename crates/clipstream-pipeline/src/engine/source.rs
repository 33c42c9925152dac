//! The source of a run, and the policy it sets for the other stages.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::config::{FilesInput, KafkaSourceConfig, PipelineConfig, Scheme, SourceConfig};
use crate::sink::Control;
use crate::sink::parquet::Destination;
use crate::source::files::FilesSource;
use crate::source::files::resume::{DoneSet, InputIdentity};
use crate::source::kafka::KafkaSource;
use crate::source::{Cleanup, SourceContext};

/// What the source decides about the rest of the pipeline, as one value
/// instead of a test of which source it is at each place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SourcePolicy {
    /// Transient fetch failures are retried until they succeed (streaming:
    /// a failed record would hold its partition back) rather than failing
    /// the record (local runs: a rerun retries it).
    pub retry_fetches_forever: bool,
    /// The run ends when the input does, so a stop before that is "stopped
    /// early"; a Kafka source runs until stopped.
    pub ends_with_input: bool,
}

/// The source of a run.
#[derive(Debug)]
pub(super) enum Source {
    /// Resumes by skipping what an earlier run wrote to the same output.
    Files(FilesSource),
    /// Resumes from committed offsets, removing files written beyond them.
    Kafka(Box<KafkaSourceConfig>),
}

impl Source {
    /// The files source loads what an earlier run already wrote (it resumes
    /// by skipping it); Kafka resumes from committed offsets.
    pub async fn prepare(cfg: &PipelineConfig) -> anyhow::Result<Source> {
        let f = match &cfg.source {
            SourceConfig::Kafka(k) => return Ok(Source::Kafka(Box::new(k.clone()))),
            SourceConfig::Files(f) => f,
        };
        let source = FilesSource::new(f, DoneSet::default())?;
        let (Some(dir), Some(dead)) = (cfg.sink.parquet.local_dir(), cfg.dead_letter_path()) else {
            return Ok(Source::Files(source));
        };
        let (dir, input) = (dir.to_path_buf(), source.input().clone());
        let stem = crate::sink::parquet::destination::stem(&source.key());
        let done = tokio::task::spawn_blocking(move || -> anyhow::Result<DoneSet> {
            let identity = match &input {
                FilesInput::Manifest(m) => InputIdentity::manifest(m)?,
                FilesInput::Dir(d) => InputIdentity::dir(d)?,
            };
            DoneSet::load(&dir, &dead, &identity, &stem)
        })
        .await??;
        if !done.is_empty() {
            tracing::info!(
                done = done.len(),
                files = done.files,
                "resuming: records already written are skipped"
            );
        }
        Ok(Source::Files(FilesSource::new(f, done)?))
    }

    /// What this source decides for the other stages.
    pub fn policy(&self) -> SourcePolicy {
        let streaming = matches!(self, Source::Kafka(_));
        SourcePolicy {
            retry_fetches_forever: streaming,
            ends_with_input: !streaming,
        }
    }

    /// Base of relative file paths in events.
    pub fn base_dir(&self) -> PathBuf {
        match self {
            Source::Files(f) => f.base_dir(),
            Source::Kafka(_) => PathBuf::new(),
        }
    }

    /// The directory local files must lie under (canonical): `fetch.root`,
    /// or the source's own directory.
    pub fn fetch_root(&self, cfg: &PipelineConfig) -> anyhow::Result<PathBuf> {
        let root = cfg.fetch.root.clone().unwrap_or_else(|| self.base_dir());
        if !cfg.fetch.allows(Scheme::File) {
            return Ok(root);
        }
        std::fs::canonicalize(&root).map_err(|e| {
            anyhow::anyhow!(
                "fetch.root {}: {e} (local images must lie under an existing directory)",
                root.display()
            )
        })
    }

    /// Reads until the input ends or `ctx.stop`; returns the records left
    /// unfinished by a stop (Kafka: they are read again on restart).
    pub async fn run(
        self,
        cfg: &PipelineConfig,
        ctx: SourceContext,
        control: flume::Sender<Control>,
        dest: Arc<Destination>,
    ) -> anyhow::Result<u64> {
        match self {
            Source::Files(f) => {
                drop(control);
                ctx.stats.ready.store(true, Ordering::Relaxed);
                f.run(ctx).await.map(|()| 0)
            }
            Source::Kafka(k) => {
                let cleanup: Arc<dyn Cleanup> = dest;
                KafkaSource::new(*k, control, Some(cleanup), cfg.shutdown.source_drain())
                    .run(ctx)
                    .await
            }
        }
    }
}
