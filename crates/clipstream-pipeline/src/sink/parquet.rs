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

/// A file being written.
struct OpenFile {
    tmp: PathBuf,
    name: String,
    writer: ArrowWriter<File>,
    buffered: Vec<OutputRow>,
    rows: usize,
    acks: Vec<AckToken>,
}

/// Writes rows of every partition, each partition to its own rolling file.
pub struct ParquetWriter {
    config: ParquetConfig,
    schema: SchemaRef,
    dim: usize,
    model_id: String,
    open: HashMap<PartitionKey, OpenFile>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for ParquetWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetWriter")
            .field("dir", &self.config.dir)
            .field("open", &self.open.len())
            .finish_non_exhaustive()
    }
}

impl ParquetWriter {
    /// A writer into `config.dir` (created if missing).
    pub fn new(
        config: ParquetConfig,
        dim: usize,
        model_id: String,
        stats: Arc<Stats>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create output directory {}: {e}",
                config.dir.display()
            )
        })?;
        Ok(ParquetWriter {
            schema: schema(dim),
            config,
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
        if !self.open.contains_key(&key) {
            let file = self.create(&key, row.offset)?;
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

    fn create(&self, key: &PartitionKey, first_offset: i64) -> anyhow::Result<OpenFile> {
        let stem = format!(
            "{}-{}-{first_offset:010}",
            sanitize(&key.source),
            key.partition
        );
        // A complete file of that name from an earlier run holds other rows
        // (the input changed between runs): never overwrite it.
        let mut name = format!("{stem}.parquet");
        let mut n = 1;
        while self.config.dir.join(&name).exists() {
            name = format!("{stem}+{n}.parquet");
            n += 1;
        }
        let tmp = self.config.dir.join(format!(
            ".{}{TMP_SUFFIX}",
            name.trim_end_matches(".parquet")
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
            name,
            writer,
            buffered: Vec::new(),
            rows: 0,
            acks: Vec::new(),
        })
    }

    fn close(&mut self, key: &PartitionKey) -> anyhow::Result<()> {
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
        let path = self.config.dir.join(&f.name);
        std::fs::rename(&f.tmp, &path)?;
        sync_dir(&self.config.dir);
        self.stats
            .write_seconds
            .observe(started.elapsed().as_secs_f64());
        let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        tracing::debug!(file = %path.display(), rows = f.rows, "parquet file complete");
        Stats::add(&self.stats.rows, f.rows as u64);
        self.stats.file(f.name, bytes);
        for ack in f.acks {
            ack.delivered();
        }
        Ok(())
    }
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
