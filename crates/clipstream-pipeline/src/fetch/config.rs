//! `[fetch]`: which objects events may reference, and how they are read.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::file::Problems;

/// `[fetch]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FetchConfig {
    /// URI schemes events may reference: `file`, `s3`. Default `["file"]`
    /// for the files source.
    #[serde(default = "default_schemes")]
    pub allowed_schemes: Vec<Scheme>,
    /// Buckets `s3://` URIs may name; required when `s3` is allowed.
    #[serde(default)]
    pub allowed_buckets: Vec<String>,
    /// Objects larger than this are dead letters. Default 64 MiB.
    #[serde(default = "default_max_object_bytes")]
    pub max_object_bytes: u64,
    /// Concurrent fetches. Default 16.
    #[serde(default = "default_fetch_concurrency")]
    pub concurrency: usize,
    /// Local files (`file://` and bare paths) must lie under this directory
    /// once `..` and symbolic links are resolved. Default: the manifest's
    /// directory (or the images directory).
    #[serde(default)]
    pub root: Option<PathBuf>,
}

/// A URI scheme events may reference.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// `file://` and bare paths: local files under `fetch.root`.
    File,
    /// `s3://bucket/key`, in `fetch.allowed_buckets`.
    S3,
}

impl Scheme {
    /// As written in URIs and in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::File => "file",
            Scheme::S3 => "s3",
        }
    }

    /// The scheme of a URI's prefix (any case), if it is one of ours.
    pub fn parse(s: &str) -> Option<Scheme> {
        if s.eq_ignore_ascii_case("file") {
            Some(Scheme::File)
        } else if s.eq_ignore_ascii_case("s3") {
            Some(Scheme::S3)
        } else {
            None
        }
    }
}

fn default_schemes() -> Vec<Scheme> {
    vec![Scheme::File]
}
fn default_max_object_bytes() -> u64 {
    64 << 20
}
fn default_fetch_concurrency() -> usize {
    16
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            allowed_schemes: default_schemes(),
            allowed_buckets: Vec::new(),
            max_object_bytes: default_max_object_bytes(),
            concurrency: default_fetch_concurrency(),
            root: None,
        }
    }
}

impl FetchConfig {
    /// Whether events may reference `scheme`.
    pub fn allows(&self, scheme: Scheme) -> bool {
        self.allowed_schemes.contains(&scheme)
    }

    pub(crate) fn check(&self, p: &mut Problems) {
        if self.allows(Scheme::S3) && self.allowed_buckets.is_empty() {
            p.bad(
                "fetch.allowed_buckets",
                "list the buckets events may reference (an allow-list), e.g. [\"my-images\"]",
            );
        }
        if self.concurrency == 0 {
            p.bad("fetch.concurrency", "must be at least 1");
        }
        if self.max_object_bytes == 0 {
            p.bad("fetch.max_object_bytes", "must be positive");
        }
    }
}
