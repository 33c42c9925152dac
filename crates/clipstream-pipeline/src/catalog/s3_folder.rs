//! Folders of a night on S3: earlier output and tonight's fleet output are
//! read by copying their Parquet files into a local folder first; a
//! snapshot is written locally and uploaded, its `_snapshot.json` last, so
//! that (as with the local rename) a snapshot with that object is complete.
//! Every upload is no-clobber: an object that is there is never replaced.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::s3::S3;
use crate::s3::config::S3Config;
use crate::s3::upload::PutError;
use crate::stats::Stats;

/// Whether `location` is an `s3://` folder.
pub fn is_s3(location: &Path) -> bool {
    location.to_str().is_some_and(|s| s.starts_with("s3://"))
}

/// `s3://bucket/prefix` → (bucket, prefix ending with `/`, or empty).
pub fn split(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("s3://")
        .with_context(|| format!("{url} is not an s3:// URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    anyhow::ensure!(!bucket.is_empty(), "{url} names no bucket");
    anyhow::ensure!(
        !prefix.split('/').any(|seg| seg == ".." || seg == "."),
        "{url} has a `.` or `..` segment"
    );
    let mut prefix = prefix.to_string();
    if !prefix.is_empty() && !prefix.ends_with('/') {
        prefix.push('/');
    }
    Ok((bucket.to_string(), prefix))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// What an `s3://` folder to read is expected to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A snapshot: it must be finished (hold `_snapshot.json`).
    Snapshot,
    /// A snapshot or earlier run output: not an unfinished snapshot (files
    /// named `part-*` without the marker), and not empty (a mistyped
    /// prefix is not a first night).
    Earlier,
    /// Run output: anything, even nothing.
    Output,
}

/// The marker of a finished snapshot.
pub const MARKER: &str = "_snapshot.json";

/// Copies the Parquet files under the `s3://` folder `url` into `dest`
/// (keeping their paths below the folder), after checking that the folder
/// is what `expect` says; returns how many.
pub fn download(cfg: &S3Config, url: &str, dest: &Path, expect: Expect) -> anyhow::Result<usize> {
    let (bucket, prefix) = split(url)?;
    runtime()?.block_on(async {
        let s3 = S3::connect(cfg, Arc::new(Stats::default())).await;
        let keys = s3
            .list(&bucket, &prefix, None)
            .await
            .map_err(|e| anyhow::anyhow!("listing {url}: {e}"))?;
        let mut files = Vec::new();
        let mut finished = false;
        for key in &keys {
            let Some(rel) = key.strip_prefix(&prefix) else {
                continue;
            };
            if rel == MARKER {
                finished = true;
            }
            // Hidden and underscore names are not data (as in local folders).
            if !rel.ends_with(".parquet")
                || rel
                    .split('/')
                    .any(|seg| seg.starts_with('.') || seg.starts_with('_'))
            {
                continue;
            }
            // Only plain relative paths land in the spool.
            anyhow::ensure!(
                !rel.split('/').any(str::is_empty),
                "s3://{bucket}/{key}: an empty path segment; refusing to copy it"
            );
            files.push((key.clone(), rel.to_string()));
        }
        let unfinished_snapshot = !finished
            && files
                .iter()
                .any(|(_, rel)| !rel.contains('/') && rel.starts_with("part-"));
        match expect {
            Expect::Snapshot => anyhow::ensure!(
                finished,
                "{url} is not a finished snapshot (no {MARKER}): an upload that died part way?"
            ),
            Expect::Earlier => {
                anyhow::ensure!(
                    !unfinished_snapshot,
                    "{url} looks like an unfinished snapshot (part-* files, no {MARKER})"
                );
                anyhow::ensure!(!files.is_empty(), "{url} holds no Parquet files");
            }
            Expect::Output => {}
        }
        let budget = crate::budget::Budget::new(u64::MAX);
        for (key, rel) in &files {
            let memory = tokio::sync::Mutex::new(budget.charge(0));
            let (bytes, _) = s3
                .get(&bucket, key, 64 << 30, &memory)
                .await
                .map_err(|e| anyhow::anyhow!("reading s3://{bucket}/{key}: {e}"))?;
            let path = dest.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(files.len())
    })
}

/// Copies the object `url` (`s3://bucket/key`) to the file `dest`.
pub fn download_object(cfg: &S3Config, url: &str, dest: &Path) -> anyhow::Result<()> {
    let rest = url
        .strip_prefix("s3://")
        .with_context(|| format!("{url} is not an s3:// URL"))?;
    let (bucket, key) = rest
        .split_once('/')
        .filter(|(b, k)| !b.is_empty() && !k.is_empty())
        .with_context(|| format!("{url} is not s3://bucket/key"))?;
    runtime()?.block_on(async {
        let s3 = S3::connect(cfg, Arc::new(Stats::default())).await;
        let budget = crate::budget::Budget::new(u64::MAX);
        let memory = tokio::sync::Mutex::new(budget.charge(0));
        let (bytes, _) = s3
            .get(bucket, key, 64 << 30, &memory)
            .await
            .map_err(|e| anyhow::anyhow!("reading {url}: {e}"))?;
        std::fs::write(dest, bytes).with_context(|| format!("writing {}", dest.display()))
    })
}

/// Whether `url` holds the object `name` (a finished snapshot's marker).
pub fn has(cfg: &S3Config, url: &str, name: &str) -> anyhow::Result<bool> {
    let (bucket, prefix) = split(url)?;
    let key = format!("{prefix}{name}");
    runtime()?.block_on(async {
        let s3 = S3::connect(cfg, Arc::new(Stats::default())).await;
        let keys = s3
            .list(&bucket, &key, None)
            .await
            .map_err(|e| anyhow::anyhow!("listing {url}: {e}"))?;
        Ok(keys.contains(&key))
    })
}

/// The names of the finished snapshots (folders holding [`MARKER`]) right
/// under the folder `url` (local or `s3://`), sorted.
pub fn finished_snapshots(cfg: &S3Config, url: &Path) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    if is_s3(url) {
        let url = url.to_string_lossy();
        let (bucket, prefix) = split(&url)?;
        let keys = runtime()?.block_on(async {
            let s3 = S3::connect(cfg, Arc::new(Stats::default())).await;
            s3.list(&bucket, &prefix, None)
                .await
                .map_err(|e| anyhow::anyhow!("listing {url}: {e}"))
        })?;
        for key in keys {
            if let Some(name) = key
                .strip_prefix(&prefix)
                .and_then(|rel| rel.strip_suffix(&format!("/{MARKER}")))
                .filter(|n| !n.is_empty() && !n.contains('/') && !n.starts_with('.'))
            {
                names.push(name.to_string());
            }
        }
    } else {
        let entries = match std::fs::read_dir(url) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
            Err(e) => return Err(e).with_context(|| format!("listing {}", url.display())),
        };
        for e in entries {
            let e = e.with_context(|| format!("listing {}", url.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && e.path().join(MARKER).is_file() {
                names.push(name);
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Uploads every file of `dir` into the `s3://` folder `url`, `last` after
/// all the others and only once the folder holds exactly these files. Each
/// object is tagged with its content's hash: one already there with the
/// same content (an earlier attempt of the same snapshot) counts as
/// uploaded; anything else is an error, and nothing is replaced.
pub fn upload(cfg: &S3Config, dir: &Path, url: &str, last: &str) -> anyhow::Result<()> {
    use sha2::{Digest, Sha256};
    let (bucket, prefix) = split(url)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort_by_key(|p| (p.file_name().is_some_and(|n| n == last), p.clone()));
    runtime()?.block_on(async {
        let s3 = S3::connect(cfg, Arc::new(Stats::default())).await;
        let mut ours = std::collections::HashSet::new();
        for path in &files {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| format!("{}: not a UTF-8 name", path.display()))?;
            let key = format!("{prefix}{name}");
            if name == last {
                // Only over exactly this snapshot's files.
                let there = s3
                    .list(&bucket, &prefix, None)
                    .await
                    .map_err(|e| anyhow::anyhow!("listing {url}: {e}"))?;
                if let Some(other) = there.iter().find(|k| !ours.contains(*k)) {
                    anyhow::bail!(
                        "s3://{bucket}/{other} is not a file of this snapshot (an earlier \
                         attempt from other inputs?): remove it or choose another --out"
                    );
                }
            }
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let tag = format!(
                "clipstream-snapshot sha256:{}",
                Sha256::digest(&bytes)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            );
            match s3
                .put_new_file(path, &bucket, &key, 16 << 20, &tag, &|| true)
                .await
            {
                Ok(()) => {}
                Err(PutError::Exists) => anyhow::bail!(
                    "s3://{bucket}/{key} exists with other content: refusing to replace it \
                     (an earlier attempt from other inputs? remove it or choose another --out)"
                ),
                Err(PutError::NotOwned) => anyhow::bail!("s3://{bucket}/{key}: not owned"),
                Err(PutError::Failed(e)) => {
                    anyhow::bail!("uploading {} to s3://{bucket}/{key}: {e}", path.display())
                }
            }
            ours.insert(key);
        }
        Ok(())
    })
}
