//! `[sink.parquet]`: where files go, how they roll, how they are written.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::file::Problems;

/// `[sink.parquet]`. Exactly one of `dir` / `url`
/// ([`ParquetConfig::output`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParquetConfig {
    /// Output directory (local). Exactly one of `dir` / `url`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Output on S3: `s3://bucket/prefix/`. Files are built in
    /// `spool_dir`, then uploaded with a multipart upload: an object
    /// appears only when complete.
    #[serde(default)]
    pub url: Option<String>,
    /// Local directory for files being built before upload. Default: the
    /// system temp directory.
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
    /// Size of multipart upload parts. Default 16 MiB (S3's minimum is 5).
    #[serde(default = "default_part_bytes")]
    pub part_bytes: usize,
    /// Hive-style folders by the record's date (`dt=YYYY-MM-DD/`, from the
    /// event time). Default false.
    #[serde(default)]
    pub partition_by_date: bool,
    /// Roll a file when a record's event time is this many seconds after
    /// the file's first (record time, never wall-clock time, so replays
    /// make the same files). Default: no limit.
    #[serde(default)]
    pub max_file_span_secs: Option<u64>,
    /// Rows per file before rolling. Default 10,000.
    #[serde(default = "default_rows_per_file")]
    pub max_rows_per_file: usize,
    /// Bytes per file (compressed, approximate) before rolling. Default 256 MiB.
    #[serde(default = "default_bytes_per_file")]
    pub max_bytes_per_file: u64,
    /// Rows per row group. Default 1,024.
    #[serde(default = "default_row_group")]
    pub row_group_rows: usize,
    /// zstd level (1-22). Default 3.
    #[serde(default = "default_zstd")]
    pub zstd_level: i32,
}

fn default_part_bytes() -> usize {
    16 << 20
}
fn default_rows_per_file() -> usize {
    10_000
}
fn default_bytes_per_file() -> u64 {
    256 << 20
}
fn default_row_group() -> usize {
    1024
}
fn default_zstd() -> i32 {
    3
}

/// Where Parquet files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParquetOutput {
    /// A local directory.
    Dir(PathBuf),
    /// An S3 bucket and prefix (no leading or trailing slash; may be empty).
    S3 {
        /// The bucket.
        bucket: String,
        /// The prefix.
        prefix: String,
    },
}

impl ParquetConfig {
    /// The output: the one rule for `dir` / `url`, used by validation and
    /// by the engine.
    pub fn output(&self) -> Result<ParquetOutput, String> {
        match (&self.dir, &self.url) {
            (Some(d), None) => Ok(ParquetOutput::Dir(d.clone())),
            (None, Some(u)) => crate::s3::config::parse_s3_url(u)
                .map(|(bucket, prefix)| ParquetOutput::S3 { bucket, prefix }),
            (Some(_), Some(_)) => Err("set `dir` or `url`, not both".into()),
            (None, None) => {
                Err("set `dir` (a local directory) or `url` (s3://bucket/prefix/)".into())
            }
        }
    }

    /// The local output directory, when `dir` is set (with `url` too the
    /// config is refused, and no other problem is made up for it).
    pub fn local_dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    pub(crate) fn check(&self, p: &mut Problems) {
        if let Err(m) = self.output() {
            let at = if self.url.is_some() && self.dir.is_none() {
                "sink.parquet.url"
            } else {
                "sink.parquet"
            };
            p.bad(at, m);
        }
        if self.part_bytes < 5 << 20 {
            p.bad(
                "sink.parquet.part_bytes",
                "must be at least 5 MiB (5242880), S3's smallest multipart part",
            );
        }
        if self.max_file_span_secs == Some(0) {
            p.bad("sink.parquet.max_file_span_secs", "must be positive");
        }
        if self.max_rows_per_file == 0 {
            p.bad("sink.parquet.max_rows_per_file", "must be at least 1");
        }
        if self.row_group_rows == 0 {
            p.bad("sink.parquet.row_group_rows", "must be at least 1");
        }
        if self.max_bytes_per_file < 1024 {
            p.bad("sink.parquet.max_bytes_per_file", "must be at least 1024");
        }
        if !(1..=22).contains(&self.zstd_level) {
            p.bad(
                "sink.parquet.zstd_level",
                format!("{} is not a zstd level (1-22)", self.zstd_level),
            );
        }
    }

    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        for p in [&mut self.dir, &mut self.spool_dir].into_iter().flatten() {
            crate::config::file::absolute(base, p);
        }
    }
}
