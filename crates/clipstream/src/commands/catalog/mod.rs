//! `clipstream plan` and `clipstream snapshot`: the two ends of a nightly
//! re-embedding (see `clipstream_pipeline::catalog`): [`plan`] and
//! [`snapshot`], with what both use here (a progress bar, a spool folder).

mod plan;
mod snapshot;

pub use self::plan::{PlanArgs, plan};
pub use self::snapshot::{SnapshotArgs, snapshot};

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clipstream_pipeline::catalog::s3_folder;

pub(crate) fn bar(what: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{msg}} [{{bar:30}}] {{pos}}/{{len}} {{eta}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(bar)
}

/// A spool folder for this command, removed when dropped.
pub(crate) struct Spool(pub(crate) PathBuf);

impl Spool {
    pub(crate) fn new(base: Option<&PathBuf>, what: &str) -> anyhow::Result<Spool> {
        let base = base.cloned().unwrap_or_else(std::env::temp_dir);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!("clipstream-{what}-{}-{nanos}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Spool(dir))
    }

    /// `folder` itself, or for an `s3://` one a local copy of its Parquet
    /// files (an empty folder when there are none: a first night).
    pub(crate) fn local(
        &self,
        s3: &clipstream_pipeline::config::S3Config,
        folder: &Path,
        k: usize,
        expect: s3_folder::Expect,
    ) -> anyhow::Result<PathBuf> {
        if !s3_folder::is_s3(folder) {
            return Ok(folder.to_path_buf());
        }
        let url = folder.to_string_lossy();
        let dest = self.0.join(format!("in-{k}"));
        std::fs::create_dir_all(&dest)?;
        let n = s3_folder::download(s3, &url, &dest, expect)?;
        eprintln!("copied {n} Parquet files of {url}");
        Ok(dest)
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn column(name: &str) -> Option<String> {
    (!name.is_empty()).then(|| name.to_string())
}
