//! Parquet output: rows of each partition in *ranges* of records, each range
//! written as one file (or one per date folder), published whole.
//!
//! **The file rule.** A partition's records are cut into ranges: a range
//! starts at the first record after the previous range (or at the position
//! the partition was resumed from, a committed offset) and ends after
//! `max_rows_per_file` records — rows and dead letters alike — or once its
//! rows' estimated size reaches `max_bytes_per_file` (an estimate computed
//! from the rows' contents, so the same records always give the same
//! estimate). Both are functions of the records alone, so replaying from a
//! committed offset cuts the same ranges and writes the same files. A range
//! also ends early when its partition goes quiet (its records must get
//! committed), when the partition is handed over, or when the worker stops;
//! the commit that follows then records that boundary, and a replay starts
//! there. Within a range, a new file starts in another `dt=` folder when
//! the event date changes, or when `max_file_span_secs` of event time have
//! passed — again functions of the records.
//!
//! **Acknowledgements.** Nothing of a range is acknowledged before the whole
//! range is published: rows with their files, and dead letters too (they
//! are already durable elsewhere, but acknowledging them early would let a
//! commit land inside the range, and a replay from there would cut other
//! ranges). Files are written as `.NAME.parquet.tmp`, fsynced and published
//! by [`destination`] (never replacing another writer's file); a range
//! whose partition was revoked is dropped instead.
//!
//! **Memory.** A file's rows are buffered up to `row_group_rows` or 8 MiB,
//! then encoded into the file; the row group is flushed to disk once it
//! holds that many rows or bytes, so an open file holds at most one row
//! group in memory.
//!
//! Here: ranges and the writer; `file` one file's life (create, row
//! groups, publish or abandon); [`destination`] where files are published;
//! [`schema`](mod@schema) the columns; [`config`] and [`metrics`] its section and its
//! metrics.

pub mod config;
pub mod destination;
mod file;
pub mod metrics;
pub mod schema;

use std::collections::HashMap;
use std::sync::Arc;

pub use self::config::{ParquetConfig, ParquetOutput};
pub use self::destination::{Destination, PublishError, date_folder};
pub use self::file::{FINGERPRINT_KEY, MODEL_ID_KEY, TMP_SUFFIX};
use self::file::{OpenFile, ROW_GROUP_MAX_BYTES, hostname};
pub use self::schema::{schema, to_batch};
use crate::ack::{AckToken, PartitionKey};
use crate::record::OutputRow;
use crate::stats::Stats;

/// A partition's current range of records.
struct Range {
    /// Assignment epoch of the partition when the range started.
    epoch: u64,
    /// Records in the range so far (rows, dead letters, failures).
    records: usize,
    /// Estimated size of its rows.
    bytes: u64,
    /// Acknowledgements given when the range is published: the rows of
    /// files already published within the range...
    held_rows: Vec<AckToken>,
    /// ...and dead letters.
    held_dead: Vec<AckToken>,
    /// Files of the range already published (their rows are counted when
    /// the range completes).
    published: Vec<(String, u64, usize)>,
    /// The file being written.
    file: Option<OpenFile>,
}

/// Writes rows of every partition, each partition in its own ranges.
pub struct ParquetWriter {
    config: ParquetConfig,
    dest: Destination,
    schema: arrow_schema::SchemaRef,
    dim: usize,
    model_id: String,
    model_fingerprint: Option<String>,
    /// `_review.jsonl`, and whether it holds lines not yet synced.
    review: Option<(super::dead_letter_file::DeadLetterFile, bool)>,
    ranges: HashMap<PartitionKey, Range>,
    stats: Arc<Stats>,
    /// Tags uploads so that a retried completion recognises its own object.
    writer_id: String,
    files_started: u64,
}

impl std::fmt::Debug for ParquetWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetWriter")
            .field("dest", &self.dest)
            .field("ranges", &self.ranges.len())
            .finish_non_exhaustive()
    }
}

/// What a sink error means.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

impl From<std::io::Error> for SinkError {
    fn from(e: std::io::Error) -> Self {
        SinkError(e.to_string())
    }
}

impl From<parquet::errors::ParquetError> for SinkError {
    fn from(e: parquet::errors::ParquetError) -> Self {
        SinkError(e.to_string())
    }
}

impl From<anyhow::Error> for SinkError {
    fn from(e: anyhow::Error) -> Self {
        SinkError(format!("{e:#}"))
    }
}

impl ParquetWriter {
    /// Records `fingerprint` (`ClipModel::fingerprint`) in every file's
    /// metadata, under [`FINGERPRINT_KEY`].
    pub fn with_fingerprint(mut self, fingerprint: String) -> Self {
        self.model_fingerprint = Some(fingerprint);
        self
    }

    /// Lists the rows routed to review in `file` (`_review.jsonl`): each
    /// line is appended with its row and synced before the file holding
    /// the row is published (one sync per file, not per row). A row that
    /// is written again (after a crash, or by a partition's next owner) is
    /// listed again: at least once, dedupe by id.
    pub fn with_review(mut self, file: Option<super::dead_letter_file::DeadLetterFile>) -> Self {
        self.review = file.map(|f| (f, false));
        self
    }

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
        let writer_id = format!(
            "{}-{}-{:x}",
            hostname(),
            std::process::id(),
            (crate::retry::jitter() * (u64::MAX >> 11) as f64) as u64
        );
        Ok(ParquetWriter {
            schema: schema(dim),
            config,
            dest,
            dim,
            model_id,
            model_fingerprint: None,
            review: None,
            ranges: HashMap::new(),
            stats,
            writer_id,
            files_started: 0,
        })
    }

    /// The current range of `ack`'s partition, started if there is none;
    /// a range of an earlier assignment is dropped first.
    fn range(&mut self, ack: &AckToken) -> &mut Range {
        let key = ack.partition();
        if self.ranges.get(key).is_some_and(|r| r.epoch != ack.epoch()) {
            self.abort(key);
        }
        self.ranges.entry(key.clone()).or_insert_with(|| Range {
            epoch: ack.epoch(),
            records: 0,
            bytes: 0,
            held_rows: Vec::new(),
            held_dead: Vec::new(),
            published: Vec::new(),
            file: None,
        })
    }

    /// Appends a row (records of a partition must come in source order); its
    /// token is acknowledged when the row's range is published.
    pub fn append(&mut self, row: OutputRow, ack: AckToken) -> Result<(), SinkError> {
        let key = ack.partition().clone();
        if row.needs_review == Some(true)
            && let Some((file, dirty)) = self.review.as_mut()
        {
            file.append(&crate::review::line(&row))
                .map_err(|e| e.context("writing the review file"))?;
            *dirty = true;
        }
        let date = self
            .config
            .partition_by_date
            .then(|| date_folder(row.event_time_ms));
        let span = self.config.max_file_span_secs;
        // Another date, or too much event time in one file: a new file,
        // same range.
        let roll = self.range(&ack).file.as_ref().is_some_and(|f| {
            let span_over = match (span, f.first_time_ms, row.event_time_ms) {
                (Some(span), Some(first), Some(t)) => t.saturating_sub(first) >= span as i64 * 1000,
                _ => false,
            };
            f.date != date || span_over
        });
        if roll {
            self.publish_file(&key)?;
        }
        if self.range(&ack).file.is_none() {
            let file = self.create(&key, row.offset, date, row.event_time_ms)?;
            self.range(&ack).file = Some(file);
        }
        let estimate = estimated_bytes(&row, self.dim);
        let (row_group_rows, max_records, max_bytes) = (
            self.config.row_group_rows,
            self.config.max_rows_per_file,
            self.config.max_bytes_per_file,
        );
        self.range(&ack);
        let range = self
            .ranges
            .get_mut(&key)
            .ok_or_else(|| SinkError("the range vanished".into()))?;
        range.records += 1;
        range.bytes += estimate;
        let full = range.records >= max_records || range.bytes >= max_bytes;
        let Some(f) = range.file.as_mut() else {
            return Err(SinkError("the open file vanished".into()));
        };
        f.buffered.push(row);
        f.buffered_bytes += estimate;
        f.acks.push(ack);
        f.rows += 1;
        if f.buffered.len() >= row_group_rows || f.buffered_bytes >= ROW_GROUP_MAX_BYTES {
            f.write_buffered(&self.schema, self.dim, &self.model_id)?;
        }
        if full {
            self.complete(&key)?;
        }
        Ok(())
    }

    /// Counts a dead-lettered record in its range; its token is
    /// acknowledged with the range.
    pub fn dead_lettered(&mut self, ack: AckToken) -> Result<(), SinkError> {
        let key = ack.partition().clone();
        let max_records = self.config.max_rows_per_file;
        let range = self.range(&ack);
        range.records += 1;
        range.held_dead.push(ack);
        if range.records >= max_records {
            self.complete(&key)?;
        }
        Ok(())
    }

    /// A record that could not be processed: the range ends before it (what
    /// came before is published), and its token fails.
    pub fn failed(&mut self, ack: AckToken) -> Result<(), SinkError> {
        let key = ack.partition().clone();
        if self
            .ranges
            .get(&key)
            .is_some_and(|r| r.epoch == ack.epoch())
        {
            self.complete(&key)?;
        }
        ack.failed();
        Ok(())
    }

    /// Drops the range of `key` if it belongs to assignment `epoch` (its
    /// partition was revoked: the next owner writes these records).
    pub fn abort_epoch(&mut self, key: &PartitionKey, epoch: u64) {
        if self.ranges.get(key).is_some_and(|r| r.epoch == epoch) {
            self.abort(key);
        }
    }

    /// Publishes every open range (end of input, shutdown).
    pub fn complete_all(&mut self) -> Result<(), SinkError> {
        let keys: Vec<PartitionKey> = self.ranges.keys().cloned().collect();
        for k in keys {
            self.complete(&k)?;
        }
        Ok(())
    }

    /// Bytes buffered or encoded in memory by open files.
    pub fn buffered_bytes(&self) -> u64 {
        self.ranges
            .values()
            .filter_map(|r| r.file.as_ref())
            .map(OpenFile::in_memory)
            .sum()
    }

    /// Encodes and flushes the largest open file's rows, releasing their
    /// memory (its row group ends earlier; its rows are the same).
    pub fn flush_largest(&mut self) -> Result<(), SinkError> {
        let largest = self
            .ranges
            .iter_mut()
            .filter_map(|(_, r)| r.file.as_mut())
            .max_by_key(|f| f.in_memory());
        if let Some(f) = largest {
            f.flush(&self.schema, self.dim, &self.model_id)?;
        }
        Ok(())
    }

    /// Starts `key`'s next file at `first_offset`.
    fn create(
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
        self.files_started += 1;
        let props = file::properties(
            self.config.zstd_level,
            self.config.row_group_rows,
            &self.model_id,
            self.model_fingerprint.as_deref(),
        )?;
        Ok(OpenFile::create(
            self.dest.build_dir(),
            rel,
            self.files_started,
            date,
            first_time_ms,
            &self.schema,
            props,
        )?)
    }

    /// Drops a partition's range without publishing it: its tokens fail.
    fn abort(&mut self, key: &PartitionKey) {
        if let Some(r) = self.ranges.remove(key) {
            if let Some(f) = r.file {
                f.abandon();
            }
            for ack in r.held_rows.into_iter().chain(r.held_dead) {
                ack.failed();
            }
        }
    }

    /// Finishes and publishes the open file of `key`'s range, keeping its
    /// tokens with the range.
    fn publish_file(&mut self, key: &PartitionKey) -> Result<(), SinkError> {
        let Some(range) = self.ranges.get_mut(key) else {
            return Ok(());
        };
        let Some(f) = range.file.take() else {
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
        let f = f.finish(&self.schema, self.dim, &self.model_id)?;
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
        let _ = std::fs::remove_file(&f.tmp);
        match published {
            Ok(name) => {
                self.stats.parquet.published(started.elapsed());
                tracing::debug!(file = %name, rows = f.rows, "parquet file published");
                let range = self
                    .ranges
                    .get_mut(key)
                    .ok_or_else(|| SinkError("range vanished".into()))?;
                range.published.push((name, f.bytes, f.rows));
                range.held_rows.extend(f.acks);
                Ok(())
            }
            Err(PublishError::NotOwned) => {
                for ack in f.acks {
                    ack.failed();
                }
                self.abort(key);
                Ok(())
            }
            Err(PublishError::Failed(why)) => Err(SinkError(why)),
        }
    }

    /// Publishes `key`'s range: its file, then every token it holds.
    pub fn complete(&mut self, key: &PartitionKey) -> Result<(), SinkError> {
        self.publish_file(key)?;
        let Some(r) = self.ranges.remove(key) else {
            return Ok(());
        };
        for (name, bytes, rows) in r.published {
            self.stats.file(name, rows as u64, bytes);
        }
        for ack in r.held_rows {
            ack.delivered();
        }
        for ack in r.held_dead {
            ack.dead_lettered();
        }
        Ok(())
    }
}

/// A size estimate of a row that depends only on its contents.
pub fn estimated_bytes(row: &OutputRow, dim: usize) -> u64 {
    let s = |o: &Option<String>| o.as_ref().map_or(0, String::len);
    let embeddings = (usize::from(row.image_embedding.is_some())
        + usize::from(row.text_embedding.is_some()))
        * dim
        * 4;
    let labels = row
        .labels
        .as_ref()
        .map_or(0, |l| l.iter().map(|l| l.label.len() + 8).sum::<usize>())
        + s(&row.review_reason);
    (row.id.len()
        + row.source.len()
        + s(&row.image_uri)
        + s(&row.image_etag)
        + s(&row.text)
        + s(&row.attributes)
        + embeddings
        + labels
        + 48) as u64
}
