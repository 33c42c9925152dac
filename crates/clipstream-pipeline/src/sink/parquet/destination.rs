//! Where complete Parquet files go, how they get there, and how a newly
//! assigned partition's leftovers are found.
//!
//! **Names.** A file is named by its partition and the offset of its first
//! row, `<source>-<partition>-<offset, 10 digits>.parquet` (in a `dt=DATE/`
//! folder when partitioning by date), so that a replay from a committed
//! offset makes the same names.
//!
//! **Publishing never replaces a file.** A local file is hard-linked into
//! place (which fails if the name exists) and an S3 object is completed
//! with `If-None-Match: *` (which fails if the key exists), after checking
//! that the partition is still this worker's. A name that is taken is
//! another writer's file: a worker that lost the partition and is still
//! finishing an upload, or, for local runs, an earlier run over changed
//! input. Both are kept: ours goes to the next free `+N` name and a warning
//! says which rows may then be there twice. So a late upload can never
//! overwrite a newer, committed file, whatever the timing; at worst a row is
//! stored twice, never lost. A retried S3 completion whose first attempt
//! did succeed is recognised by the writer tag each upload carries
//! (`x-amz-meta-clipstream-writer`).
//!
//! **Cleanup.** Files of a partition whose first offset is at or after the
//! partition's committed offset were written by a worker that stopped
//! before committing them; `remove_from` deletes them before the partition
//! is read again, listing only that partition's own names from that offset
//! on (one listing per date folder when partitioned by date).

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::ack::PartitionKey;
use crate::retry::FetchError;
use crate::s3::S3;
use crate::s3::upload::PutError;

/// Where complete files go.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A local directory.
    Local {
        /// The directory.
        dir: PathBuf,
    },
    /// An S3 prefix: files are built in `spool`, then uploaded.
    S3 {
        /// The client.
        s3: S3,
        /// Bucket.
        bucket: String,
        /// Prefix, without slashes at either end (may be empty).
        prefix: String,
        /// Local directory for files being built.
        spool: PathBuf,
        /// Part size of multipart uploads.
        part_bytes: usize,
        /// Runs the uploads from the sink thread.
        handle: tokio::runtime::Handle,
    },
}

/// Why a file was not published.
#[derive(Debug)]
pub enum PublishError {
    /// The partition is no longer this worker's: the file was dropped.
    NotOwned,
    /// The destination refuses for good (disk full, access denied, no such
    /// bucket): the stage cannot go on.
    Failed(String),
}

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishError::NotOwned => f.write_str("the partition was revoked"),
            PublishError::Failed(m) => f.write_str(m),
        }
    }
}

/// The file name stem of a partition: `<source>-<partition>-`.
pub fn stem(partition: &PartitionKey) -> String {
    format!("{}-{}-", sanitize(&partition.source), partition.partition)
}

/// `rel` with the `+n` suffix of the n-th alternative name (n > 0).
fn alternative(rel: &str, n: usize) -> String {
    if n == 0 {
        return rel.to_string();
    }
    let base = rel.strip_suffix(".parquet").unwrap_or(rel);
    format!("{base}+{n}.parquet")
}

impl Destination {
    /// The directory files are built in.
    pub fn build_dir(&self) -> &Path {
        match self {
            Destination::Local { dir } => dir,
            Destination::S3 { spool, .. } => spool,
        }
    }

    fn s3_key(prefix: &str, rel: &str) -> String {
        if prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{prefix}/{rel}")
        }
    }

    /// Publishes the complete file `tmp` as `rel` (or, when that name is
    /// another writer's, the next free `+N` name), checking `owned` right
    /// before the file becomes visible. Transient S3 failures are retried
    /// for as long as `owned` holds. Returns the name used.
    pub fn publish(
        &self,
        tmp: &Path,
        rel: &str,
        tag: &str,
        owned: &(dyn Fn() -> bool + Sync),
    ) -> Result<String, PublishError> {
        let mut backoff = crate::retry::Backoff::new(
            std::time::Duration::from_millis(200),
            std::time::Duration::from_secs(30),
        );
        let mut n = 0;
        loop {
            if !owned() {
                return Err(PublishError::NotOwned);
            }
            let name = alternative(rel, n);
            let result = match self {
                Destination::Local { dir } => publish_local(tmp, dir, &name),
                Destination::S3 {
                    s3,
                    bucket,
                    prefix,
                    part_bytes,
                    handle,
                    ..
                } => {
                    let key = Destination::s3_key(prefix, &name);
                    handle.block_on(s3.put_new_file(tmp, bucket, &key, *part_bytes, tag, owned))
                }
            };
            match result {
                Ok(()) => {
                    if n > 0 {
                        tracing::warn!(
                            file = %rel,
                            written_as = %name,
                            "another writer's file has this name (a worker that lost the partition, or an earlier run); it is kept, and rows in both may appear twice"
                        );
                    }
                    return Ok(name);
                }
                Err(PutError::Exists) => n += 1,
                Err(PutError::NotOwned) => return Err(PublishError::NotOwned),
                Err(PutError::Failed(FetchError::Transient(why))) => {
                    let pause = backoff.next_delay();
                    tracing::error!(file = %name, %why, retry_in_ms = pause.as_millis() as u64, "publishing a Parquet file failed; retrying");
                    std::thread::sleep(pause);
                }
                Err(PutError::Failed(FetchError::Permanent(_, why))) => {
                    return Err(PublishError::Failed(format!(
                        "cannot publish {name}: {why}"
                    )));
                }
            }
        }
    }

    /// Removes the files of `partition` whose first offset is `from` or
    /// later (written by a worker that stopped before committing them), so
    /// that replaying the partition from `from` leaves each record in one
    /// file. Lists only the partition's own names. An error leaves
    /// everything in place; the caller retries.
    pub async fn remove_from(
        &self,
        partition: &PartitionKey,
        from: i64,
        owned: &(dyn Fn() -> bool + Sync),
    ) -> anyhow::Result<usize> {
        let stem = stem(partition);
        let matches = |name: &str| first_offset_of(name, &stem).is_some_and(|o| o >= from);
        let removed = match self {
            Destination::Local { dir } => {
                let dir = dir.clone();
                let stem = stem.clone();
                if !owned() {
                    anyhow::bail!("the partition moved on");
                }
                tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
                    let mut removed = 0;
                    for folder in local_folders(&dir)? {
                        for e in std::fs::read_dir(&folder)? {
                            let path = e?.path();
                            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                                continue;
                            };
                            if name.starts_with(&stem)
                                && first_offset_of(name, &stem).is_some_and(|o| o >= from)
                            {
                                std::fs::remove_file(&path)?;
                                removed += 1;
                            }
                        }
                        sync_dir(&folder);
                    }
                    Ok(removed)
                })
                .await??
            }
            Destination::S3 {
                s3, bucket, prefix, ..
            } => {
                let root = if prefix.is_empty() {
                    String::new()
                } else {
                    format!("{prefix}/")
                };
                let mut folders = vec![root.clone()];
                folders.extend(
                    s3.list_folders(bucket, &root)
                        .await?
                        .into_iter()
                        .filter(|f| f[root.len()..].starts_with("dt=")),
                );
                let mut removed = 0;
                for folder in folders {
                    let names = format!("{folder}{stem}");
                    // Keys sort by offset while offsets have 10 digits.
                    let start_after = (from < 10_000_000_000).then(|| format!("{names}{from:010}"));
                    for key in s3.list(bucket, &names, start_after.as_deref()).await? {
                        let name = key.rsplit('/').next().unwrap_or(&key);
                        if matches(name) {
                            // Checked before each deletion: a job that
                            // outlived its assignment must not delete what
                            // the partition's next owner wrote.
                            if !owned() {
                                anyhow::bail!("the partition moved on");
                            }
                            s3.delete(bucket, &key).await?;
                            removed += 1;
                        }
                    }
                }
                removed
            }
        };
        if removed > 0 {
            tracing::info!(partition = %format!("{}[{}]", partition.source, partition.partition), from, removed, "removed output files at or beyond the committed offset (left by a worker that stopped before committing them)");
        }
        Ok(removed)
    }
}

impl crate::source::Cleanup for Destination {
    fn remove_from<'a>(
        &'a self,
        partition: &'a PartitionKey,
        from: i64,
        owned: &'a (dyn Fn() -> bool + Sync),
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<usize>> + Send + 'a>>
    {
        Box::pin(Destination::remove_from(self, partition, from, owned))
    }
}

/// A local directory and its `dt=` folders.
fn local_folders(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = vec![dir.to_path_buf()];
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                let e = e?;
                if e.file_name().to_string_lossy().starts_with("dt=") && e.path().is_dir() {
                    out.push(e.path());
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    Ok(out)
}

/// Puts `tmp` at `dir/rel` unless that name exists (a hard link fails on an
/// existing name; where links are not supported, an existence check and a
/// rename).
fn publish_local(tmp: &Path, dir: &Path, rel: &str) -> Result<(), PutError> {
    let path = dir.join(rel);
    let io = |what: &str, e: std::io::Error| {
        let why = format!("{what} {}: {e}", path.display());
        PutError::Failed(FetchError::Permanent(
            crate::dead_letter::Kind::FetchFailed,
            why,
        ))
    };
    if let Some(parent) = path.parent() {
        let created = !parent.is_dir();
        std::fs::create_dir_all(parent).map_err(|e| io("cannot create the folder of", e))?;
        if created {
            // A new `dt=` folder: its own entry must survive a power loss too,
            // or the file published into it could vanish with it.
            let mut up = parent.parent();
            while let Some(d) = up.filter(|d| d.starts_with(dir)) {
                sync_dir(d);
                up = d.parent();
            }
        }
    }
    match std::fs::hard_link(tmp, &path) {
        Ok(()) => {
            std::fs::remove_file(tmp).map_err(|e| io("cannot remove the temporary file of", e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(PutError::Exists),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::Unsupported | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            if path.exists() {
                return Err(PutError::Exists);
            }
            std::fs::rename(tmp, &path).map_err(|e| io("cannot rename to", e))?;
        }
        Err(e) => return Err(io("cannot link", e)),
    }
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(())
}

/// `YYYY-MM-DD` (UTC) of an event time; `unknown` without one.
pub fn date_folder(ms: Option<i64>) -> String {
    let Some(ms) = ms else {
        return "unknown".into();
    };
    // Howard Hinnant's days-to-civil.
    let z = ms.div_euclid(86_400_000) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Makes a directory's entries durable (after a rename or a removal).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The first offset in a file name `<stem><offset>[+n].parquet`.
pub fn first_offset_of(name: &str, stem: &str) -> Option<i64> {
    let rest = name.strip_prefix(stem)?.strip_suffix(".parquet")?;
    let digits = rest.split('+').next()?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_names() {
        assert_eq!(date_folder(Some(0)), "1970-01-01");
        assert_eq!(date_folder(Some(1_795_996_800_000)), "2026-11-30");
        assert_eq!(date_folder(Some(951_782_400_000)), "2000-02-29");
        assert_eq!(date_folder(None), "unknown");
        assert_eq!(first_offset_of("t-3-0000000120.parquet", "t-3-"), Some(120));
        assert_eq!(
            first_offset_of("t-3-0000000120+2.parquet", "t-3-"),
            Some(120)
        );
        assert_eq!(first_offset_of("t-31-0000000120.parquet", "t-3-"), None);
        assert_eq!(first_offset_of(".t-3-0000000120.parquet.tmp", "t-3-"), None);
        assert_eq!(
            alternative("dt=x/t-3-0000000120.parquet", 2),
            "dt=x/t-3-0000000120+2.parquet"
        );
        assert_eq!(
            alternative("t-3-0000000120.parquet", 0),
            "t-3-0000000120.parquet"
        );
    }

    /// A published name is never replaced: the second file with that name
    /// goes to `+1`, and both stay.
    #[test]
    fn local_publishing_never_replaces_a_file() {
        let dir = std::env::temp_dir().join(format!("clipstream-publish-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let dest = Destination::Local { dir: dir.clone() };
        let owned = || true;
        for (i, body) in ["first", "second"].iter().enumerate() {
            let tmp = dir.join(format!(".tmp{i}"));
            std::fs::write(&tmp, body).expect("tmp");
            let name = dest
                .publish(&tmp, "dt=2026-01-01/t-0-0000000005.parquet", "tag", &owned)
                .expect("published");
            assert_eq!(
                name,
                alternative("dt=2026-01-01/t-0-0000000005.parquet", i),
                "{body}"
            );
            assert!(!tmp.exists());
        }
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).expect("file");
        assert_eq!(read("dt=2026-01-01/t-0-0000000005.parquet"), "first");
        assert_eq!(read("dt=2026-01-01/t-0-0000000005+1.parquet"), "second");
        let tmp = dir.join(".tmp-late");
        std::fs::write(&tmp, "late").expect("tmp");
        let not_owned = || false;
        assert!(matches!(
            dest.publish(&tmp, "t-0-0000000009.parquet", "tag", &not_owned),
            Err(PublishError::NotOwned)
        ));
        assert!(!dir.join("t-0-0000000009.parquet").exists());
        std::fs::remove_dir_all(&dir).ok();
    }
}
