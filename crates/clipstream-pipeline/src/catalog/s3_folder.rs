//! Folders of a night on S3: earlier output and tonight's fleet output are
//! read by copying their Parquet files into a local folder first; a
//! snapshot is written locally and uploaded, its `_snapshot.json` last, so
//! that (as with the local rename) a snapshot with that object is complete.
//! Every upload is no-clobber: an object that is there is never replaced.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::config::S3Config;
use crate::s3::{PutError, S3};
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

/// Copies the Parquet files under the `s3://` folder `url` into `dest`
/// (keeping their paths below the folder); returns how many.
pub fn download(cfg: &S3Config, url: &str, dest: &Path) -> anyhow::Result<usize> {
    let (bucket, prefix) = split(url)?;
    runtime()?.block_on(async {
        let s3 = S3::connect(cfg, Arc::new(Stats::default())).await;
        let keys = s3
            .list(&bucket, &prefix, None)
            .await
            .map_err(|e| anyhow::anyhow!("listing {url}: {e}"))?;
        let budget = crate::budget::Budget::new(u64::MAX);
        let mut n = 0;
        for key in keys {
            let rel = &key[prefix.len()..];
            // Hidden and underscore names are not data (as in local folders).
            if !rel.ends_with(".parquet")
                || rel
                    .split('/')
                    .any(|seg| seg.starts_with('.') || seg.starts_with('_'))
            {
                continue;
            }
            let memory = tokio::sync::Mutex::new(budget.charge(0));
            let (bytes, _) = s3
                .get(&bucket, &key, 64 << 30, &memory)
                .await
                .map_err(|e| anyhow::anyhow!("reading s3://{bucket}/{key}: {e}"))?;
            let path = dest.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
            n += 1;
        }
        Ok(n)
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

/// Uploads every file of `dir` into the `s3://` folder `url`, `last` after
/// all the others. An object that is already there from an earlier attempt
/// of the same snapshot (same `tag`) counts as uploaded; one from anyone
/// else is an error: nothing is replaced.
pub fn upload(cfg: &S3Config, dir: &Path, url: &str, last: &str, tag: &str) -> anyhow::Result<()> {
    let (bucket, prefix) = split(url)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort_by_key(|p| (p.file_name().is_some_and(|n| n == last), p.clone()));
    runtime()?.block_on(async {
        let s3 = S3::connect(cfg, Arc::new(Stats::default())).await;
        for path in &files {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| format!("{}: not a UTF-8 name", path.display()))?;
            let key = format!("{prefix}{name}");
            match s3
                .put_new_file(path, &bucket, &key, 16 << 20, tag, &|| true)
                .await
            {
                Ok(()) => {}
                Err(PutError::Exists) => anyhow::bail!(
                    "s3://{bucket}/{key} exists and was not written by this snapshot: refusing to \
                     replace it"
                ),
                Err(PutError::NotOwned) => anyhow::bail!("s3://{bucket}/{key}: not owned"),
                Err(PutError::Failed(e)) => {
                    anyhow::bail!("uploading {} to s3://{bucket}/{key}: {e}", path.display())
                }
            }
        }
        Ok(())
    })
}
