//! The fetch stage: turns each record's image URI into bytes. Which schemes
//! may be fetched is the pipeline's choice (`fetch.allowed_schemes`), so an
//! event cannot make the worker read what it should not. Permanent problems
//! (no such object, access denied, too large, bad URI) are dead letters;
//! transient I/O errors are retried with exponential backoff and jitter, and
//! a record whose retries run out fails (not dead-lettered: a rerun retries).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub mod config;
pub mod metrics;

pub use self::config::{FetchConfig, Scheme};
use crate::dead_letter::{Kind, Stage};
use crate::record::{Done, Record};

/// A record with its object's bytes.
#[derive(Debug)]
pub struct Fetched {
    /// The record.
    pub record: Record,
    /// The image bytes, when the event has an image.
    pub bytes: Option<Vec<u8>>,
    /// The object's ETag, when the store has one.
    pub etag: Option<String>,
    /// The bytes' charge against the memory budget (given back with them).
    pub memory: crate::budget::Charge,
}

/// Where an image URI points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local file.
    File(PathBuf),
    /// An S3 object.
    S3 {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
    },
}

pub use crate::retry::{FetchError, with_retries};

/// Parses an image reference: `s3://bucket/key`, `file:///abs/path`,
/// `file://rel/path` or a bare path (relative ones resolved against `base`).
pub fn resolve(uri: &str, allowed: &[Scheme], base: &Path) -> Result<Location, FetchError> {
    let perm = |k, m: String| Err(FetchError::Permanent(k, m));
    let (written, rest) = uri.split_once("://").unwrap_or(("file", uri));
    let scheme = match Scheme::parse(written) {
        Some(s) if allowed.contains(&s) => s,
        _ => {
            let allowed: Vec<&str> = allowed.iter().map(|s| s.as_str()).collect();
            return perm(
                Kind::SchemeNotAllowed,
                format!(
                    "scheme `{}` is not allowed by this pipeline (allowed: {})",
                    written.to_ascii_lowercase(),
                    allowed.join(", ")
                ),
            );
        }
    };
    match scheme {
        Scheme::File => {
            if rest.is_empty() {
                return perm(Kind::InvalidUri, format!("`{uri}` has no path"));
            }
            let p = PathBuf::from(rest);
            Ok(Location::File(if p.is_absolute() {
                p
            } else {
                base.join(p)
            }))
        }
        Scheme::S3 => match rest.split_once('/') {
            Some((_, key)) if key.split('/').any(|seg| seg == ".." || seg == ".") => perm(
                Kind::InvalidUri,
                format!("`{uri}` has a `.` or `..` segment in its key"),
            ),
            Some((bucket, key)) if !bucket.is_empty() && !key.is_empty() => Ok(Location::S3 {
                bucket: bucket.to_string(),
                key: key.to_string(),
            }),
            _ => perm(Kind::InvalidUri, format!("`{uri}` is not s3://bucket/key")),
        },
    }
}

/// Reads a local file: only a regular file, only under `root` once `..`
/// and symbolic links are resolved, and at most `max_bytes` of it (counted
/// as read, so a file that grows meanwhile cannot go past it). Devices,
/// FIFOs and sockets are refused without being opened for a blocking read.
async fn read_file(path: &Path, root: &Path, max_bytes: u64) -> Result<Vec<u8>, FetchError> {
    let (path, root) = (path.to_path_buf(), root.to_path_buf());
    tokio::task::spawn_blocking(move || read_file_blocking(&path, &root, max_bytes))
        .await
        .map_err(|e| FetchError::Transient(format!("reading a file: {e}")))?
}

fn read_file_blocking(path: &Path, root: &Path, max_bytes: u64) -> Result<Vec<u8>, FetchError> {
    use std::io::ErrorKind as E;
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let classify = |e: std::io::Error| match e.kind() {
        E::NotFound => FetchError::Permanent(
            Kind::ObjectNotFound,
            format!("{}: no such file", path.display()),
        ),
        E::PermissionDenied => FetchError::Permanent(
            Kind::ObjectForbidden,
            format!("{}: permission denied", path.display()),
        ),
        // A path no file system would take (a NUL byte, a name too long, a
        // file used as a folder, a loop of links): the event's fault.
        // (ELOOP, 40 on Linux, has no stable ErrorKind.)
        E::InvalidInput | E::InvalidFilename | E::NotADirectory => {
            FetchError::Permanent(Kind::InvalidUri, format!("{}: {e}", path.display()))
        }
        _ if e.raw_os_error() == Some(40) => {
            FetchError::Permanent(Kind::InvalidUri, format!("{}: {e}", path.display()))
        }
        _ => FetchError::Transient(format!("{}: {e}", path.display())),
    };
    let real = std::fs::canonicalize(path).map_err(classify)?;
    if !real.starts_with(root) {
        return Err(FetchError::Permanent(
            Kind::PathNotAllowed,
            format!(
                "{} is outside the allowed root {} (fetch.root)",
                path.display(),
                root.display()
            ),
        ));
    }
    let not_a_file = |what: &str| {
        Err(FetchError::Permanent(
            Kind::InvalidUri,
            format!("{} is {what}, not a regular file", path.display()),
        ))
    };
    let kind = |t: std::fs::FileType| {
        if t.is_dir() {
            Some("a directory")
        } else if t.is_fifo() {
            Some("a FIFO")
        } else if t.is_char_device() || t.is_block_device() {
            Some("a device")
        } else if t.is_socket() {
            Some("a socket")
        } else if !t.is_file() {
            Some("not a file")
        } else {
            None
        }
    };
    let meta = std::fs::metadata(&real).map_err(classify)?;
    if let Some(what) = kind(meta.file_type()) {
        return not_a_file(what);
    }
    // Non-blocking open: should the path have become a FIFO since, the
    // open does not wait for a writer; the type is checked again on the
    // open file.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(&real)
        .map_err(classify)?;
    let meta = file.metadata().map_err(classify)?;
    if let Some(what) = kind(meta.file_type()) {
        return not_a_file(what);
    }
    if meta.len() > max_bytes {
        return Err(FetchError::Permanent(
            Kind::ObjectTooLarge,
            format!(
                "{} is {} bytes, over the limit of {max_bytes}",
                path.display(),
                meta.len()
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(classify)?;
    if bytes.len() as u64 > max_bytes {
        return Err(FetchError::Permanent(
            Kind::ObjectTooLarge,
            format!("{} is over the limit of {max_bytes} bytes", path.display()),
        ));
    }
    Ok(bytes)
}

/// `O_NONBLOCK` on Linux (x86-64 and aarch64).
const O_NONBLOCK: i32 = 0o4000;

/// What the fetch workers share.
#[derive(Debug)]
pub struct Fetcher {
    /// Limits and allow-lists.
    pub cfg: FetchConfig,
    /// Base of relative file paths.
    pub base: PathBuf,
    /// Local files must lie under this directory (canonical).
    pub root: PathBuf,
    /// The S3 client, when `s3` is an allowed scheme.
    pub s3: Option<crate::s3::S3>,
    /// The memory budget: objects wait for room before they are read.
    pub budget: Arc<crate::budget::Budget>,
    /// Retry transient S3 failures until they succeed (streaming: a failed
    /// record would hold its partition's commits back), instead of failing
    /// the record when the attempts run out (local runs: a rerun retries).
    pub persistent: bool,
}

/// Fetches the object of one record.
pub async fn fetch(record: Record, f: &Fetcher) -> Result<Fetched, Done> {
    let (cfg, base) = (&f.cfg, f.base.as_path());
    let Some(uri) = record.event.image.clone() else {
        return Ok(Fetched {
            record,
            bytes: None,
            etag: None,
            memory: f.budget.empty(),
        });
    };
    let memory = tokio::sync::Mutex::new(f.budget.empty());
    let location = match resolve(&uri, &cfg.allowed_schemes, base) {
        Ok(l) => l,
        Err(FetchError::Permanent(kind, why)) => return Err(record.dead(Stage::Fetch, kind, why)),
        Err(FetchError::Transient(why)) => return Err(record.failed(why)),
    };
    let result = match &location {
        Location::File(path) => {
            // Room in the memory budget before the file is read.
            if let Ok(meta) = tokio::fs::metadata(path).await
                && meta.is_file()
            {
                let len = meta.len().min(cfg.max_object_bytes);
                memory
                    .lock()
                    .await
                    .reserve(len, crate::budget::MAX_WAIT)
                    .await;
            }
            with_retries(3, Duration::from_millis(100), || {
                read_file(path, &f.root, cfg.max_object_bytes)
            })
            .await
            .map(|b| (b, None))
        }
        Location::S3 { bucket, .. } if !cfg.allowed_buckets.contains(bucket) => {
            Err(FetchError::Permanent(
                Kind::BucketNotAllowed,
                format!(
                    "bucket `{bucket}` is not in fetch.allowed_buckets ({})",
                    cfg.allowed_buckets.join(", ")
                ),
            ))
        }
        Location::S3 { bucket, key } => match &f.s3 {
            Some(s3) => {
                let mut pause = Duration::from_secs(1);
                loop {
                    match s3.get(bucket, key, cfg.max_object_bytes, &memory).await {
                        // Only while the partition is still ours: a revoked
                        // record's next owner fetches it.
                        Err(FetchError::Transient(why))
                            if f.persistent && record.ack.is_current() =>
                        {
                            tracing::warn!(%why, "S3 still failing after retries; waiting before trying again");
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_secs(30));
                        }
                        other => break other,
                    }
                }
            }
            None => Err(FetchError::Permanent(
                Kind::SchemeNotAllowed,
                "s3:// objects need an S3 client, which this pipeline does not configure".into(),
            )),
        },
    };
    match result {
        Ok((bytes, etag)) => {
            let mut memory = memory.into_inner();
            memory.reserve(bytes.len() as u64, Duration::ZERO).await;
            Ok(Fetched {
                record,
                bytes: Some(bytes),
                etag,
                memory,
            })
        }
        Err(FetchError::Permanent(kind, why)) => Err(record.dead(Stage::Fetch, kind, why)),
        Err(FetchError::Transient(why)) => {
            Err(record.failed(format!("fetch retries exhausted: {why}")))
        }
    }
}

/// Runs `cfg.concurrency` fetch workers until `rx` closes.
pub fn spawn_workers(
    rx: flume::Receiver<Record>,
    tx: flume::Sender<Fetched>,
    done: flume::Sender<Done>,
    fetcher: Fetcher,
    stats: Arc<crate::stats::Stats>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let fetcher = Arc::new(fetcher);
    (0..fetcher.cfg.concurrency)
        .map(|_| {
            let (rx, tx, done, fetcher, stats) = (
                rx.clone(),
                tx.clone(),
                done.clone(),
                Arc::clone(&fetcher),
                Arc::clone(&stats),
            );
            tokio::spawn(async move {
                while let Ok(record) = rx.recv_async().await {
                    let started = std::time::Instant::now();
                    let has_image = record.event.image.is_some();
                    let fetched = fetch(record, &fetcher).await;
                    if has_image {
                        stats.fetch.fetched(started.elapsed());
                    }
                    let sent = match fetched {
                        Ok(f) => tx.send_async(f).await.is_ok(),
                        Err(d) => done.send_async(d).await.is_ok(),
                    };
                    if !sent {
                        break;
                    }
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schemes(s: &[&str]) -> Vec<Scheme> {
        s.iter()
            .map(|s| Scheme::parse(s).expect("scheme"))
            .collect()
    }

    #[test]
    fn uris_resolve() {
        let base = Path::new("/data");
        let files = schemes(&["file"]);
        assert_eq!(
            resolve("a/b.jpg", &files, base),
            Ok(Location::File("/data/a/b.jpg".into()))
        );
        assert_eq!(
            resolve("file:///x/y.png", &files, base),
            Ok(Location::File("/x/y.png".into()))
        );
        assert_eq!(
            resolve("file://rel.png", &files, base),
            Ok(Location::File("/data/rel.png".into()))
        );
        assert!(matches!(
            resolve("s3://b/k", &files, base),
            Err(FetchError::Permanent(Kind::SchemeNotAllowed, _))
        ));
        let s3 = schemes(&["s3"]);
        assert_eq!(
            resolve("s3://b/k/x.jpg", &s3, base),
            Ok(Location::S3 {
                bucket: "b".into(),
                key: "k/x.jpg".into()
            })
        );
        assert!(matches!(
            resolve("s3://b", &s3, base),
            Err(FetchError::Permanent(Kind::InvalidUri, _))
        ));
        assert!(matches!(
            resolve("/etc/passwd", &s3, base),
            Err(FetchError::Permanent(Kind::SchemeNotAllowed, _))
        ));
        assert!(matches!(
            resolve("http://x/y", &schemes(&["file", "s3"]), base),
            Err(FetchError::Permanent(Kind::SchemeNotAllowed, _))
        ));
    }

    #[test]
    fn s3_keys_with_dot_segments_are_refused() {
        let s3 = schemes(&["s3"]);
        let base = Path::new("/");
        for uri in [
            "s3://b/../x.jpg",
            "s3://b/a/../../x",
            "s3://b/./x",
            "s3://b/a/..",
        ] {
            assert!(
                matches!(
                    resolve(uri, &s3, base),
                    Err(FetchError::Permanent(Kind::InvalidUri, _))
                ),
                "{uri}"
            );
        }
        assert!(resolve("s3://b/a..b/x..jpg", &s3, base).is_ok());
    }

    /// Only regular files under the root: `..` and links that leave it,
    /// devices and FIFOs are refused, a FIFO without blocking.
    #[tokio::test]
    async fn local_reads_are_confined_to_regular_files_under_the_root() {
        let dir = std::env::temp_dir().join(format!("clipstream-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("sub")).expect("dir");
        std::fs::write(root.join("sub/ok.png"), b"png").expect("file");
        std::fs::write(dir.join("secret.png"), b"secret").expect("file");
        std::os::unix::fs::symlink(dir.join("secret.png"), root.join("link.png")).expect("link");
        std::os::unix::fs::symlink(root.join("sub/ok.png"), root.join("inner.png")).expect("link");
        let fifo = root.join("fifo.png");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .expect("mkfifo")
                .success()
        );
        let root = std::fs::canonicalize(&root).expect("root");
        let read = |p: PathBuf| {
            let root = root.clone();
            async move { read_file(&p, &root, 1 << 20).await }
        };
        assert_eq!(read(root.join("sub/ok.png")).await, Ok(b"png".to_vec()));
        assert_eq!(read(root.join("inner.png")).await, Ok(b"png".to_vec()));
        for p in [
            root.join("sub/../../secret.png"),
            root.join("link.png"),
            PathBuf::from("/etc/hostname"),
        ] {
            assert!(
                matches!(
                    read(p.clone()).await,
                    Err(FetchError::Permanent(Kind::PathNotAllowed, _))
                ),
                "{}",
                p.display()
            );
        }
        let started = std::time::Instant::now();
        assert!(matches!(
            read(fifo).await,
            Err(FetchError::Permanent(Kind::InvalidUri, _))
        ));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a FIFO blocked the read"
        );
        assert!(matches!(
            read_file(Path::new("/dev/zero"), Path::new("/"), 1 << 20).await,
            Err(FetchError::Permanent(Kind::InvalidUri, _))
        ));
        assert!(matches!(
            read(root.join("sub")).await,
            Err(FetchError::Permanent(Kind::InvalidUri, _))
        ));
        // Paths no file system takes are the event's fault, not retried.
        std::os::unix::fs::symlink(root.join("loop-b"), root.join("loop-a")).expect("link");
        std::os::unix::fs::symlink(root.join("loop-a"), root.join("loop-b")).expect("link");
        for p in [
            root.join("sub/ok.png/inside.png"),
            root.join("a\0b.png"),
            root.join("x".repeat(300)),
            root.join("loop-a"),
        ] {
            let r = read(p.clone()).await;
            assert!(
                matches!(r, Err(FetchError::Permanent(Kind::InvalidUri, _))),
                "{}: {r:?}",
                p.display()
            );
        }
        assert!(matches!(
            read_file(&root.join("sub/ok.png"), &root, 2).await,
            Err(FetchError::Permanent(Kind::ObjectTooLarge, _))
        ));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test]
    async fn transient_errors_are_retried_then_given_up() {
        let mut calls = 0;
        let r: Result<(), _> = with_retries(3, Duration::from_millis(1), || {
            calls += 1;
            async { Err(FetchError::Transient("flaky".into())) }
        })
        .await;
        assert_eq!(calls, 3);
        assert!(matches!(r, Err(FetchError::Transient(_))));
        let mut calls = 0;
        let r: Result<u8, _> = with_retries(3, Duration::from_millis(1), || {
            calls += 1;
            let n = calls;
            async move {
                if n < 2 {
                    Err(FetchError::Transient("once".into()))
                } else {
                    Ok(7)
                }
            }
        })
        .await;
        assert_eq!((calls, r), (2, Ok(7)));
    }
}
