//! `[source]` with `kind = "files"`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::file::Problems;

/// `[source]` with `kind = "files"`. Exactly one of `manifest` / `dir`
/// ([`FilesSourceConfig::input`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilesSourceConfig {
    /// JSONL file, one event per line: `{"id", "image", "text", "attributes"}`.
    /// Relative image paths are relative to the manifest's directory.
    #[serde(default)]
    pub manifest: Option<PathBuf>,
    /// Directory of images (searched recursively); id = path relative to it;
    /// a `NAME.txt` beside `NAME.jpg` is its caption.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Events larger than this are dead letters. Default 1 MiB.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
}

/// Events larger than this are dead letters (both sources' default).
pub(crate) fn default_max_event_bytes() -> usize {
    1 << 20
}

/// What a files source reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilesInput {
    /// A JSONL manifest of events.
    Manifest(PathBuf),
    /// A directory of images.
    Dir(PathBuf),
}

impl FilesInput {
    /// The manifest or the directory.
    pub fn path(&self) -> &Path {
        match self {
            FilesInput::Manifest(p) | FilesInput::Dir(p) => p,
        }
    }

    /// Directory that relative image paths are relative to.
    pub fn base_dir(&self) -> PathBuf {
        match self {
            FilesInput::Manifest(m) => m.parent().map(Path::to_path_buf).unwrap_or_default(),
            FilesInput::Dir(d) => d.clone(),
        }
    }
}

impl FilesSourceConfig {
    /// The input: the one rule for `manifest` / `dir`, used by validation
    /// and by the source.
    pub fn input(&self) -> Result<FilesInput, &'static str> {
        match (&self.manifest, &self.dir) {
            (Some(m), None) => Ok(FilesInput::Manifest(m.clone())),
            (None, Some(d)) => Ok(FilesInput::Dir(d.clone())),
            (Some(_), Some(_)) => Err("set `manifest` or `dir`, not both"),
            (None, None) => Err("set `manifest` (a JSONL file) or `dir` (a directory of images)"),
        }
    }

    pub(crate) fn check(&self, p: &mut Problems) {
        if let Err(m) = self.input() {
            p.bad("source", m);
        }
        if self.max_event_bytes == 0 {
            p.bad("source.max_event_bytes", "must be positive");
        }
    }

    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        for p in [&mut self.manifest, &mut self.dir].into_iter().flatten() {
            crate::config::file::absolute(base, p);
        }
    }
}
