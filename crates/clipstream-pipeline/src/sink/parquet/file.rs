//! One Parquet file's life: created under a temporary name, filled row
//! group by row group, finished (written and synced) for publishing, or
//! abandoned when its partition moved on. Where it is published, and the
//! range it belongs to, are the writer's business ([`super`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use super::schema::to_batch;
use crate::ack::AckToken;
use crate::record::OutputRow;

/// Suffix of files being written (never read as output).
pub const TMP_SUFFIX: &str = ".parquet.tmp";

/// Rows buffered before they are encoded into the file, whatever
/// `row_group_rows` says (long texts make large rows).
pub(super) const ROW_GROUP_MAX_BYTES: u64 = 8 << 20;

/// The file metadata key holding the model's fingerprint.
pub const FINGERPRINT_KEY: &str = "clipstream.model_fingerprint";
/// The file metadata key holding the model id.
pub const MODEL_ID_KEY: &str = "clipstream.model_id";

/// How every file is written: zstd at `zstd_level`, row groups of
/// `row_group_rows`, the model's id and fingerprint in the metadata.
pub(super) fn properties(
    zstd_level: i32,
    row_group_rows: usize,
    model_id: &str,
    fingerprint: Option<&str>,
) -> anyhow::Result<WriterProperties> {
    let mut kv = vec![KeyValue::new(
        MODEL_ID_KEY.to_string(),
        Some(model_id.to_string()),
    )];
    if let Some(fp) = fingerprint {
        kv.push(KeyValue::new(
            FINGERPRINT_KEY.to_string(),
            Some(fp.to_string()),
        ));
    }
    Ok(WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(zstd_level)?))
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_key_value_metadata(Some(kv))
        .build())
}

/// A file being written.
pub(super) struct OpenFile {
    pub(super) tmp: PathBuf,
    /// Path relative to the destination (`dt=.../name.parquet`).
    pub(super) rel: String,
    writer: ArrowWriter<File>,
    pub(super) buffered: Vec<OutputRow>,
    pub(super) buffered_bytes: u64,
    pub(super) rows: usize,
    pub(super) acks: Vec<AckToken>,
    /// Date folder, when partitioning by date.
    pub(super) date: Option<String>,
    /// Event time of the first row.
    pub(super) first_time_ms: Option<i64>,
    /// This writer's number for the file (its upload's tag).
    pub(super) number: u64,
}

/// A file written and synced, ready to publish.
pub(super) struct Finished {
    /// The temporary file.
    pub(super) tmp: PathBuf,
    /// Path relative to the destination.
    pub(super) rel: String,
    /// Its size.
    pub(super) bytes: u64,
    /// Its rows.
    pub(super) rows: usize,
    /// Their tokens.
    pub(super) acks: Vec<AckToken>,
    /// This writer's number for the file.
    pub(super) number: u64,
}

impl OpenFile {
    /// Creates the temporary file of `rel` (`dt=.../name.parquet`) under
    /// `build`: `.name.PID-NUMBER.parquet.tmp`, unique per writer, so two
    /// writers (or two attempts) never share one.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create(
        build: &Path,
        rel: String,
        number: u64,
        date: Option<String>,
        first_time_ms: Option<i64>,
        schema: &arrow_schema::SchemaRef,
        props: WriterProperties,
    ) -> anyhow::Result<OpenFile> {
        let folder = build.join(rel.rsplit_once('/').map_or("", |(d, _)| d));
        std::fs::create_dir_all(&folder)
            .with_context(|| format!("cannot create {}", folder.display()))?;
        let base = rel.rsplit('/').next().unwrap_or(&rel);
        let tmp = folder.join(format!(
            ".{}.{}-{number}{TMP_SUFFIX}",
            base.trim_end_matches(".parquet"),
            std::process::id(),
        ));
        let file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let writer = ArrowWriter::try_new(file, Arc::clone(schema), Some(props))?;
        Ok(OpenFile {
            tmp,
            rel,
            writer,
            buffered: Vec::new(),
            buffered_bytes: 0,
            rows: 0,
            acks: Vec::new(),
            date,
            first_time_ms,
            number,
        })
    }

    /// Encodes the buffered rows into the file (the writer ends a row group
    /// by itself at `row_group_rows`); a row group that reaches 8 MiB is
    /// flushed to disk early.
    pub(super) fn write_buffered(
        &mut self,
        schema: &arrow_schema::SchemaRef,
        dim: usize,
        model_id: &str,
    ) -> anyhow::Result<()> {
        if !self.buffered.is_empty() {
            let batch = to_batch(schema, dim, model_id, &self.buffered)?;
            self.writer.write(&batch)?;
            self.buffered.clear();
            self.buffered_bytes = 0;
        }
        if self.writer.in_progress_size() as u64 >= ROW_GROUP_MAX_BYTES {
            self.writer.flush()?;
        }
        Ok(())
    }

    /// Bytes held in memory: rows buffered, and the row group being
    /// encoded.
    pub(super) fn in_memory(&self) -> u64 {
        self.buffered_bytes + self.writer.in_progress_size() as u64
    }

    /// Encodes the buffered rows and flushes the row group to disk,
    /// releasing their memory (the row group ends earlier; the rows are the
    /// same).
    pub(super) fn flush(
        &mut self,
        schema: &arrow_schema::SchemaRef,
        dim: usize,
        model_id: &str,
    ) -> anyhow::Result<()> {
        self.write_buffered(schema, dim, model_id)?;
        self.writer.flush()?;
        Ok(())
    }

    /// Writes what is buffered, closes the file and syncs it.
    pub(super) fn finish(
        mut self,
        schema: &arrow_schema::SchemaRef,
        dim: usize,
        model_id: &str,
    ) -> anyhow::Result<Finished> {
        self.write_buffered(schema, dim, model_id)?;
        let file = self.writer.into_inner()?;
        file.sync_all()?;
        drop(file);
        let bytes = std::fs::metadata(&self.tmp).map_or(0, |m| m.len());
        Ok(Finished {
            tmp: self.tmp,
            rel: self.rel,
            bytes,
            rows: self.rows,
            acks: self.acks,
            number: self.number,
        })
    }

    /// Drops the file unfinished: it is removed and its tokens fail.
    pub(super) fn abandon(self) {
        tracing::info!(file = %self.rel, rows = self.rows, "partition revoked: dropping its unfinished file");
        drop(self.writer);
        let _ = std::fs::remove_file(&self.tmp);
        for ack in self.acks {
            ack.failed();
        }
    }
}

/// This host's name, for the writer's id.
pub(super) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}
