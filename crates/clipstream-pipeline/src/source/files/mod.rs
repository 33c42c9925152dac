//! The `files` source: a JSONL manifest of events (the same JSON as Kafka
//! events), or a directory of images with optional caption sidecars. It ends
//! when the input does. Records an earlier run already wrote (by id, or by
//! position for dead letters without an id) are skipped: a rerun resumes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;
use tokio::io::AsyncBufReadExt;

use self::config::{FilesInput, FilesSourceConfig};
use super::SourceContext;
use crate::ack::{PartitionKey, Position};
use crate::record::{Origin, Received, parse_event};
pub mod config;
pub mod resume;

use self::resume::DoneSet;
use crate::stats::Stats;

/// Extensions taken from a directory source.
const IMAGE_EXTENSIONS: [&str; 9] = [
    "jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "jfif",
];

/// The files source, ready to run.
#[derive(Debug)]
pub struct FilesSource {
    input: FilesInput,
    max_event_bytes: usize,
    done: DoneSet,
}

impl FilesSource {
    /// A source that skips what `done` holds.
    pub fn new(config: &FilesSourceConfig, done: DoneSet) -> anyhow::Result<Self> {
        Ok(FilesSource {
            input: config
                .input()
                .map_err(|m| anyhow::anyhow!("[source] {m}"))?,
            max_event_bytes: config.max_event_bytes,
            done,
        })
    }

    /// What it reads.
    pub fn input(&self) -> &FilesInput {
        &self.input
    }

    /// The name used in output rows and file names: the manifest's file stem
    /// or the directory's name.
    pub fn key(&self) -> PartitionKey {
        PartitionKey {
            source: Arc::from(self.name()),
            partition: 0,
        }
    }

    /// The name used in output rows and file names: the manifest's file stem
    /// or the directory's name.
    pub fn name(&self) -> String {
        self.input
            .path()
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "files".into())
    }

    /// Directory that relative image paths in the manifest are relative to.
    pub fn base_dir(&self) -> PathBuf {
        self.input.base_dir()
    }

    /// Emits every record, then returns. Errors are I/O errors on the input
    /// itself (a missing manifest), which stop the run.
    pub async fn run(self, mut ctx: SourceContext) -> anyhow::Result<()> {
        let key = PartitionKey {
            source: Arc::from(self.name()),
            partition: 0,
        };
        match &self.input {
            FilesInput::Manifest(manifest) => self.run_manifest(manifest, key, &mut ctx).await,
            FilesInput::Dir(dir) => self.run_dir(dir, key, &mut ctx).await,
        }
    }

    async fn run_manifest(
        &self,
        manifest: &Path,
        key: PartitionKey,
        ctx: &mut SourceContext,
    ) -> anyhow::Result<()> {
        let open = || async {
            tokio::fs::File::open(manifest)
                .await
                .map(tokio::io::BufReader::new)
                .map_err(|e| anyhow::anyhow!("cannot open manifest {}: {e}", manifest.display()))
        };
        // Count lines first so that progress can show an ETA.
        let mut reader = open().await?;
        let mut total = 0u64;
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).await? > 0 {
            if !is_blank(&line) {
                total += 1;
            }
            line.clear();
        }
        ctx.stats.records.total.add(total as i64);

        let mut reader = open().await?;
        let mut offset = -1i64;
        let mut seq = 0u64;
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line).await? == 0 {
                break;
            }
            offset += 1;
            if is_blank(&line) {
                continue;
            }
            let raw = trim_newline(&line);
            if !self.emit(raw, &key, offset, &mut seq, ctx).await {
                break;
            }
        }
        Ok(())
    }

    async fn run_dir(
        &self,
        dir: &Path,
        key: PartitionKey,
        ctx: &mut SourceContext,
    ) -> anyhow::Result<()> {
        let dir = dir.to_path_buf();
        let files = tokio::task::spawn_blocking(move || list_images(&dir)).await??;
        ctx.stats.records.total.add(files.len() as i64);
        let base = self.input.base_dir();
        let mut seq = 0u64;
        for (offset, path) in files.iter().enumerate() {
            let rel = path
                .strip_prefix(&base)
                .unwrap_or(path)
                .to_string_lossy()
                .into_owned();
            let caption = tokio::fs::read_to_string(path.with_extension("txt"))
                .await
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty());
            let event = json!({
                "id": rel,
                "image": format!("file://{}", path.display()),
                "text": caption,
            });
            let raw = serde_json::to_vec(&event)?;
            if !self.emit(&raw, &key, offset as i64, &mut seq, ctx).await {
                break;
            }
        }
        Ok(())
    }

    /// Emits one event; false when the pipeline is stopping.
    async fn emit(
        &self,
        raw: &[u8],
        key: &PartitionKey,
        offset: i64,
        seq: &mut u64,
        ctx: &mut SourceContext,
    ) -> bool {
        let parsed = parse_event(raw, self.max_event_bytes);
        let id = match &parsed {
            Ok(e) => Some(e.id.as_str()),
            Err(e) => e.id.as_deref(),
        };
        let already = self.done.is_done(key, offset, id);
        if already {
            Stats::add(&ctx.stats.records.skipped, 1);
            return true;
        }
        // The original bytes, and the parsed event (no larger).
        let Some(permit) = ctx.permit(2 * raw.len() as u64).await else {
            return false;
        };
        let position = Position { seq: *seq, offset };
        *seq += 1;
        let ack = ctx.tracker.token(key.clone(), position);
        Stats::add(&ctx.stats.records.read, 1);
        let raw: Arc<[u8]> = Arc::from(raw);
        let received = Received {
            origin: Origin {
                partition: key.clone(),
                position,
                key: None,
                headers: Arc::from([]),
                raw,
                event_time_ms: None,
            },
            ack,
            permit,
        };
        match received.admit(parsed) {
            Ok(record) => ctx.records.send_async(record).await.is_ok(),
            Err(dead) => ctx.done.send_async(*dead).await.is_ok(),
        }
    }
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

fn trim_newline(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn list_images(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", d.display()))?;
        for e in entries {
            let e = e?;
            let path = e.path();
            // Not following symbolic links to directories (a link to a
            // parent would loop); links to files are listed, and the fetch
            // stage resolves them against its root.
            if e.file_type()?.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| IMAGE_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}
