//! One Parquet file's life: created under a temporary name in its range,
//! filled row group by row group, then published (never replacing a file)
//! or abandoned when its partition moved on.

use std::fs::File;
use std::path::PathBuf;

use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use super::*;
use crate::ack::{AckToken, PartitionKey};
use crate::record::OutputRow;

/// A file being written.
pub(super) struct OpenFile {
    pub(super) tmp: PathBuf,
    /// Path relative to the destination (`dt=.../name.parquet`).
    pub(super) rel: String,
    pub(super) writer: ArrowWriter<File>,
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

impl ParquetWriter {
    pub(super) fn create(
        &mut self,
        key: &PartitionKey,
        first_offset: i64,
        date: Option<String>,
        first_time_ms: Option<i64>,
    ) -> Result<OpenFile, SinkError> {
        let folder = date
            .as_ref()
            .map(|d| format!("dt={d}/"))
            .unwrap_or_default();
        let rel = format!(
            "{folder}{}{first_offset:010}.parquet",
            destination::stem(key)
        );
        let build = self.dest.build_dir().join(&folder);
        std::fs::create_dir_all(&build)
            .map_err(|e| SinkError(format!("cannot create {}: {e}", build.display())))?;
        self.files_started += 1;
        let base = rel.rsplit('/').next().unwrap_or(&rel);
        // Unique per writer: two writers (or two attempts) never share one.
        let tmp = build.join(format!(
            ".{}.{}-{}{TMP_SUFFIX}",
            base.trim_end_matches(".parquet"),
            std::process::id(),
            self.files_started
        ));
        let file = File::create(&tmp)
            .map_err(|e| SinkError(format!("cannot create {}: {e}", tmp.display())))?;
        let mut kv = vec![KeyValue::new(
            MODEL_ID_KEY.to_string(),
            Some(self.model_id.clone()),
        )];
        if let Some(fp) = &self.model_fingerprint {
            kv.push(KeyValue::new(FINGERPRINT_KEY.to_string(), Some(fp.clone())));
        }
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(
                self.config.zstd_level,
            )?))
            .set_max_row_group_row_count(Some(self.config.row_group_rows))
            .set_key_value_metadata(Some(kv))
            .build();
        let writer = ArrowWriter::try_new(file, Arc::clone(&self.schema), Some(props))?;
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
            number: self.files_started,
        })
    }

    /// Drops a partition's range without publishing it: its tokens fail.
    pub(super) fn abort(&mut self, key: &PartitionKey) {
        if let Some(r) = self.ranges.remove(key) {
            if let Some(f) = r.file {
                tracing::info!(file = %f.rel, rows = f.rows, "partition revoked: dropping its unfinished file");
                drop(f.writer);
                let _ = std::fs::remove_file(&f.tmp);
                for ack in f.acks {
                    ack.failed();
                }
            }
            for ack in r.held_rows.into_iter().chain(r.held_dead) {
                ack.failed();
            }
        }
    }

    /// Finishes and publishes the open file of `key`'s range, keeping its
    /// tokens with the range.
    pub(super) fn publish_file(&mut self, key: &PartitionKey) -> Result<(), SinkError> {
        let Some(range) = self.ranges.get_mut(key) else {
            return Ok(());
        };
        let Some(mut f) = range.file.take() else {
            return Ok(());
        };
        // The review lines of its rows are on disk before they count as
        // written.
        if let Some((review, dirty)) = self.review.as_mut()
            && *dirty
        {
            review
                .sync()
                .map_err(|e| e.context("syncing the review file"))?;
            *dirty = false;
        }
        let started = std::time::Instant::now();
        write_buffered(&mut f, &self.schema, self.dim, &self.model_id)?;
        let file = f.writer.into_inner()?;
        file.sync_all()?;
        drop(file);
        let bytes = std::fs::metadata(&f.tmp).map_or(0, |m| m.len());
        let current = f.acks.first().is_none_or(AckToken::is_current);
        let owned = {
            let first = f.acks.first();
            move || first.is_none_or(AckToken::is_current)
        };
        let tag = format!("{}-{}", self.writer_id, f.number);
        let published = if current {
            self.dest.publish(&f.tmp, &f.rel, &tag, &owned)
        } else {
            Err(PublishError::NotOwned)
        };
        match published {
            Ok(name) => {
                let _ = std::fs::remove_file(&f.tmp);
                self.stats.parquet.published(started.elapsed());
                tracing::debug!(file = %name, rows = f.rows, "parquet file published");
                let range = self
                    .ranges
                    .get_mut(key)
                    .ok_or_else(|| SinkError("range vanished".into()))?;
                range.published.push((name, bytes, f.rows));
                range.held_rows.extend(f.acks);
                Ok(())
            }
            Err(PublishError::NotOwned) => {
                let _ = std::fs::remove_file(&f.tmp);
                for ack in f.acks {
                    ack.failed();
                }
                self.abort(key);
                Ok(())
            }
            Err(PublishError::Failed(why)) => {
                let _ = std::fs::remove_file(&f.tmp);
                Err(SinkError(why))
            }
        }
    }
}

/// Encodes `f`'s buffered rows into its file (the writer ends a row group
/// by itself at `row_group_rows`); a row group that reaches 8 MiB is
/// flushed to disk early.
pub(super) fn write_buffered(
    f: &mut OpenFile,
    schema: &arrow_schema::SchemaRef,
    dim: usize,
    model_id: &str,
) -> Result<(), SinkError> {
    if !f.buffered.is_empty() {
        let batch = to_batch(schema, dim, model_id, &f.buffered)?;
        f.writer.write(&batch)?;
        f.buffered.clear();
        f.buffered_bytes = 0;
    }
    if f.writer.in_progress_size() as u64 >= ROW_GROUP_MAX_BYTES {
        f.writer.flush()?;
    }
    Ok(())
}

pub(super) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}
