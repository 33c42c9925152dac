//! One module per subcommand (`main.rs` dispatches), and what several
//! of them share: printing a report, loading a model, a progress bar, a
//! spool folder.

pub mod bench;
pub mod catalog;
pub mod eval;
pub mod http;
pub mod model;
pub mod night;
pub mod run;
pub mod search;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use clipstream_model::ClipModel;
use clipstream_pipeline::catalog::s3_folder;

use crate::args::{ImageArgs, ModelArgs};

/// Writes a command's report to stdout. A reader that went away (`| head`)
/// is not an error: what it wanted it got.
pub(crate) fn print_out(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

pub(crate) fn load_model(args: &ModelArgs, images: &ImageArgs) -> anyhow::Result<ClipModel> {
    let mut model = ClipModel::load(&args.model, &args.variant, &args.runtime.options())?;
    model.preprocessor.limits = images.limits();
    model.preprocessor.apply_exif_orientation = images.exif_orientation;
    model.preprocessor.mode = images.image_mode;
    Ok(model)
}

/// A progress bar on stderr, when it is a terminal.
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
