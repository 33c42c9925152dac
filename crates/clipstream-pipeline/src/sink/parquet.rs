//! Parquet output: the Arrow schema of a result row and a writer that rolls
//! files by row count and size.
//!
//! Files are written as `.NAME.parquet.tmp` and renamed when complete (after
//! an fsync), so a reader never sees a partial file; only then are their
//! records acknowledged. Names come from the source position of the first
//! row, `<source>-<partition>-<first offset>.parquet` (Kafka Connect's S3
//! sink does the same), so a replay rewrites a file instead of adding one.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{FixedSizeListBuilder, Float32Builder};
use arrow_array::{
    ArrayRef, Float32Array, Int32Array, Int64Array, ListArray, RecordBatch, StringArray,
    StructArray, TimestampMillisecondArray,
};
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::ack::{AckToken, PartitionKey};
use crate::config::ParquetConfig;
use crate::record::OutputRow;
use crate::stats::Stats;

/// Suffix of files being written.
pub const TMP_SUFFIX: &str = ".parquet.tmp";

/// The Arrow schema of result rows for embeddings of width `dim`.
pub fn schema(dim: usize) -> SchemaRef {
    let embedding = DataType::FixedSizeList(
        Arc::new(Field::new("item", DataType::Float32, true)),
        dim as i32,
    );
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new("image_uri", DataType::Utf8, true),
        Field::new("image_etag", DataType::Utf8, true),
        Field::new("text", DataType::Utf8, true),
        Field::new("attributes", DataType::Utf8, true),
        Field::new("image_embedding", embedding.clone(), true),
        Field::new("text_embedding", embedding, true),
        Field::new(
            "labels",
            DataType::List(Arc::new(Field::new("item", label_type(), true))),
            true,
        ),
        Field::new("clip_score", DataType::Float32, true),
        Field::new("model_id", DataType::Utf8, false),
        Field::new("event_time", ts.clone(), true),
        Field::new("processed_at", ts, false),
    ]))
}

fn label_fields() -> Fields {
    Fields::from(vec![
        Field::new("label", DataType::Utf8, false),
        Field::new("score", DataType::Float32, false),
    ])
}

fn label_type() -> DataType {
    DataType::Struct(label_fields())
}

/// Builds a record batch of `rows`.
pub fn to_batch(
    schema: &SchemaRef,
    dim: usize,
    model_id: &str,
    rows: &[OutputRow],
) -> anyhow::Result<RecordBatch> {
    let strings = |f: &dyn Fn(&OutputRow) -> Option<&str>| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<StringArray>())
    };
    let embeddings = |f: &dyn Fn(&OutputRow) -> Option<&Vec<f32>>| -> anyhow::Result<ArrayRef> {
        let mut b = FixedSizeListBuilder::with_capacity(
            Float32Builder::with_capacity(rows.len() * dim),
            dim as i32,
            rows.len(),
        );
        for r in rows {
            match f(r) {
                Some(v) => {
                    anyhow::ensure!(
                        v.len() == dim,
                        "embedding of width {} in a file of width {dim}",
                        v.len()
                    );
                    b.values().append_slice(v);
                    b.append(true);
                }
                None => {
                    b.values().append_nulls(dim);
                    b.append(false);
                }
            }
        }
        Ok(Arc::new(b.finish()))
    };
    let mut offsets = vec![0i32];
    let mut names = Vec::new();
    let mut scores = Vec::new();
    let mut valid = Vec::with_capacity(rows.len());
    for r in rows {
        if let Some(labels) = &r.labels {
            for l in labels {
                names.push(l.label.as_str());
                scores.push(l.score);
            }
        }
        valid.push(r.labels.is_some());
        offsets.push(names.len() as i32);
    }
    let label_values = StructArray::new(
        label_fields(),
        vec![
            Arc::new(StringArray::from(names)) as ArrayRef,
            Arc::new(Float32Array::from(scores)),
        ],
        None,
    );
    let labels = ListArray::new(
        Arc::new(Field::new("item", label_type(), true)),
        arrow_buffer::OffsetBuffer::new(offsets.into()),
        Arc::new(label_values),
        Some(valid.into()),
    );
    let columns: Vec<ArrayRef> = vec![
        strings(&|r| Some(r.id.as_str())),
        strings(&|r| Some(&*r.source)),
        Arc::new(rows.iter().map(|r| r.partition).collect::<Int32Array>()),
        Arc::new(rows.iter().map(|r| r.offset).collect::<Int64Array>()),
        strings(&|r| r.image_uri.as_deref()),
        strings(&|r| r.image_etag.as_deref()),
        strings(&|r| r.text.as_deref()),
        strings(&|r| r.attributes.as_deref()),
        embeddings(&|r| r.image_embedding.as_ref())?,
        embeddings(&|r| r.text_embedding.as_ref())?,
        Arc::new(labels),
        Arc::new(rows.iter().map(|r| r.clip_score).collect::<Float32Array>()),
        Arc::new(StringArray::from(vec![model_id; rows.len()])),
        Arc::new(
            TimestampMillisecondArray::from(
                rows.iter().map(|r| r.event_time_ms).collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(
            TimestampMillisecondArray::from(
                rows.iter().map(|r| r.processed_at_ms).collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
    ];
    Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
}

/// Where complete files go.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A local directory.
    Local {
        /// The directory.
        dir: PathBuf,
        /// Replace a complete file of the same name (Kafka replays make the
        /// same files), instead of choosing a new name (`+1`) so that an
        /// earlier run's file is never lost (local inputs can change).
        overwrite: bool,
    },
    /// An S3 prefix: files are built in `spool`, then uploaded.
    S3 {
        /// The client.
        s3: crate::s3::S3,
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

impl Destination {
    fn build_dir(&self) -> &Path {
        match self {
            Destination::Local { dir, .. } => dir,
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

    /// Output files of `partition` whose first offset is `from` or later:
    /// left by a worker that wrote them but died before committing.
    /// Deleting them before the partition is read again keeps each record
    /// in exactly one file.
    pub fn remove_from(&self, partition: &PartitionKey, from: i64) -> anyhow::Result<usize> {
        let stem = format!("{}-{}-", sanitize(&partition.source), partition.partition);
        let matches =
            |name: &str| -> bool { first_offset_of(name, &stem).is_some_and(|o| o >= from) };
        let mut removed = 0;
        match self {
            Destination::Local { dir, .. } => {
                let mut stack = vec![dir.clone()];
                while let Some(d) = stack.pop() {
                    let Ok(entries) = std::fs::read_dir(&d) else {
                        continue;
                    };
                    for e in entries.flatten() {
                        let path = e.path();
                        if path.is_dir() {
                            stack.push(path);
                        } else if path
                            .file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(matches)
                        {
                            std::fs::remove_file(&path)?;
                            removed += 1;
                        }
                    }
                }
            }
            Destination::S3 {
                s3,
                bucket,
                prefix,
                handle,
                ..
            } => {
                let list_prefix = if prefix.is_empty() {
                    String::new()
                } else {
                    format!("{prefix}/")
                };
                let keys = handle.block_on(s3.list(bucket, &list_prefix))?;
                for key in keys {
                    let name = key.rsplit('/').next().unwrap_or(&key);
                    if matches(name) {
                        handle.block_on(s3.delete(bucket, &key))?;
                        removed += 1;
                    }
                }
            }
        }
        if removed > 0 {
            tracing::info!(partition = %format!("{}[{}]", partition.source, partition.partition), from, removed, "removed output files beyond the committed offset (left by an interrupted worker)");
        }
        Ok(removed)
    }
}

impl crate::sink::Cleanup for Destination {
    fn remove_from(&self, partition: &PartitionKey, from: i64) -> anyhow::Result<()> {
        Destination::remove_from(self, partition, from).map(|_| ())
    }
}

/// The first offset in a file name `<stem><offset>[+n].parquet`.
fn first_offset_of(name: &str, stem: &str) -> Option<i64> {
    let rest = name.strip_prefix(stem)?.strip_suffix(".parquet")?;
    let digits = rest.split('+').next()?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A file being written.
struct OpenFile {
    tmp: PathBuf,
    /// Path relative to the destination (`dt=.../name.parquet`).
    rel: String,
    writer: ArrowWriter<File>,
    buffered: Vec<OutputRow>,
    rows: usize,
    acks: Vec<AckToken>,
    /// Assignment epoch of the partition when the file was started.
    epoch: u64,
    /// Date folder, when partitioning by date.
    date: Option<String>,
    /// Event time of the first row.
    first_time_ms: Option<i64>,
}

/// Writes rows of every partition, each partition to its own rolling file.
pub struct ParquetWriter {
    config: ParquetConfig,
    dest: Destination,
    schema: SchemaRef,
    dim: usize,
    model_id: String,
    open: HashMap<PartitionKey, OpenFile>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for ParquetWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetWriter")
            .field("dest", &self.dest)
            .field("open", &self.open.len())
            .finish_non_exhaustive()
    }
}

impl ParquetWriter {
    /// A writer into `dest` (its local directory is created if missing).
    pub fn new(
        config: ParquetConfig,
        dest: Destination,
        dim: usize,
        model_id: String,
        stats: Arc<Stats>,
    ) -> anyhow::Result<Self> {
        let dir = dest.build_dir();
        std::fs::create_dir_all(dir).map_err(|e| {
            anyhow::anyhow!("cannot create output directory {}: {e}", dir.display())
        })?;
        Ok(ParquetWriter {
            schema: schema(dim),
            config,
            dest,
            dim,
            model_id,
            open: HashMap::new(),
            stats,
        })
    }

    /// Appends a row (rows of a partition must come in source order); the
    /// token is acknowledged when the row's file is complete.
    pub fn append(&mut self, row: OutputRow, ack: AckToken) -> anyhow::Result<()> {
        let key = ack.partition().clone();
        let date = self
            .config
            .partition_by_date
            .then(|| date_folder(row.event_time_ms));
        // Roll before this row: another assignment, another date, or the
        // file spans too much record time.
        if let Some(f) = self.open.get(&key) {
            let span_over = match (
                self.config.max_file_span_secs,
                f.first_time_ms,
                row.event_time_ms,
            ) {
                (Some(span), Some(first), Some(t)) => t.saturating_sub(first) >= span as i64 * 1000,
                _ => false,
            };
            if f.epoch != ack.epoch() {
                self.abort(&key);
            } else if f.date != date || span_over {
                self.close(&key)?;
            }
        }
        if !self.open.contains_key(&key) {
            let file = self.create(&key, row.offset, date, row.event_time_ms, ack.epoch())?;
            self.open.insert(key.clone(), file);
        }
        let f = self
            .open
            .get_mut(&key)
            .ok_or_else(|| anyhow::anyhow!("file vanished"))?;
        f.buffered.push(row);
        f.acks.push(ack);
        f.rows += 1;
        if f.buffered.len() >= self.config.row_group_rows {
            let batch = to_batch(&self.schema, self.dim, &self.model_id, &f.buffered)?;
            f.writer.write(&batch)?;
            f.buffered.clear();
        }
        let size = (f.writer.bytes_written() + f.writer.in_progress_size()) as u64;
        if f.rows >= self.config.max_rows_per_file || size >= self.config.max_bytes_per_file {
            self.close(&key)?;
        }
        Ok(())
    }

    /// Closes every open file (end of input, shutdown).
    pub fn close_all(&mut self) -> anyhow::Result<()> {
        let keys: Vec<PartitionKey> = self.open.keys().cloned().collect();
        for k in keys {
            self.close(&k)?;
        }
        Ok(())
    }

    fn create(
        &self,
        key: &PartitionKey,
        first_offset: i64,
        date: Option<String>,
        first_time_ms: Option<i64>,
        epoch: u64,
    ) -> anyhow::Result<OpenFile> {
        let stem = format!(
            "{}-{}-{first_offset:010}",
            sanitize(&key.source),
            key.partition
        );
        let folder = date
            .as_ref()
            .map(|d| format!("dt={d}/"))
            .unwrap_or_default();
        let mut rel = format!("{folder}{stem}.parquet");
        if let Destination::Local {
            dir,
            overwrite: false,
        } = &self.dest
        {
            // A complete file of that name from an earlier run holds other
            // rows (the input changed between runs): never overwrite it.
            let mut n = 1;
            while dir.join(&rel).exists() {
                rel = format!("{folder}{stem}+{n}.parquet");
                n += 1;
            }
        }
        let build = self.dest.build_dir().join(&folder);
        std::fs::create_dir_all(&build)?;
        let base = rel.rsplit('/').next().unwrap_or(&rel);
        let tmp = build.join(format!(
            ".{}{TMP_SUFFIX}",
            base.trim_end_matches(".parquet")
        ));
        let file = File::create(&tmp)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", tmp.display()))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(
                self.config.zstd_level,
            )?))
            .set_max_row_group_row_count(Some(self.config.row_group_rows))
            .build();
        let writer = ArrowWriter::try_new(file, Arc::clone(&self.schema), Some(props))?;
        Ok(OpenFile {
            tmp,
            rel,
            writer,
            buffered: Vec::new(),
            rows: 0,
            acks: Vec::new(),
            epoch,
            date,
            first_time_ms,
        })
    }

    /// Drops a partition's open file without publishing it (its partition
    /// was revoked: the next owner writes these rows).
    pub fn abort(&mut self, key: &PartitionKey) {
        if let Some(f) = self.open.remove(key) {
            tracing::info!(file = %f.rel, rows = f.rows, "partition revoked: dropping its unfinished file");
            drop(f.writer);
            let _ = std::fs::remove_file(&f.tmp);
            for ack in f.acks {
                ack.failed();
            }
        }
    }

    /// Completes a partition's open file, if any: the file is published
    /// (renamed, or uploaded) and its rows acknowledged.
    pub fn close(&mut self, key: &PartitionKey) -> anyhow::Result<()> {
        let Some(mut f) = self.open.remove(key) else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        if !f.buffered.is_empty() {
            let batch = to_batch(&self.schema, self.dim, &self.model_id, &f.buffered)?;
            f.writer.write(&batch)?;
        }
        let file = f.writer.into_inner()?;
        file.sync_all()?;
        drop(file);
        let bytes = std::fs::metadata(&f.tmp).map_or(0, |m| m.len());
        let current = |acks: &[AckToken]| acks.first().is_none_or(AckToken::is_current);
        match &self.dest {
            Destination::Local { dir, .. } => {
                if !current(&f.acks) {
                    let _ = std::fs::remove_file(&f.tmp);
                    return Ok(());
                }
                let path = dir.join(&f.rel);
                std::fs::rename(&f.tmp, &path)?;
                if let Some(parent) = path.parent() {
                    sync_dir(parent);
                }
            }
            Destination::S3 {
                s3,
                bucket,
                prefix,
                part_bytes,
                handle,
                ..
            } => {
                let key = Destination::s3_key(prefix, &f.rel);
                // Transient failures are retried until the upload succeeds
                // (the pipeline waits meanwhile) or the partition is revoked.
                let mut backoff = std::time::Duration::from_millis(200);
                loop {
                    if !current(&f.acks) {
                        let _ = std::fs::remove_file(&f.tmp);
                        return Ok(());
                    }
                    match handle.block_on(s3.upload_file(&f.tmp, bucket, &key, *part_bytes)) {
                        Ok(_) => break,
                        Err(e) => {
                            tracing::error!(object = %format!("s3://{bucket}/{key}"), error = %e, "Parquet upload failed; retrying");
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
                        }
                    }
                }
                let _ = std::fs::remove_file(&f.tmp);
            }
        }
        self.stats
            .write_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(file = %f.rel, rows = f.rows, "parquet file complete");
        Stats::add(&self.stats.rows, f.rows as u64);
        self.stats.file(f.rel, bytes);
        for ack in f.acks {
            ack.delivered();
        }
        Ok(())
    }
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

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
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
    }
}
