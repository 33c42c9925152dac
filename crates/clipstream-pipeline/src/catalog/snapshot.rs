//! `clipstream snapshot`: the complete table of a night, one row per
//! product of tonight's catalog: tonight's newest row where the night's
//! output has one, else the previous snapshot's row (copied, not
//! re-encoded); products that left the catalog are gone.
//!
//! The snapshot is written into a hidden folder beside its place and
//! renamed into place when complete, with `_snapshot.json` (its summary)
//! inside: a folder of that name is a finished snapshot, and snapshotting
//! the night again leaves it as it is. Files are `part-<model>-<n>.parquet`
//! (one model fingerprint per file, so that `plan` can read it back), in a
//! fixed order: the same inputs give the same rows in the same files.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use arrow_array::{Array, BooleanArray, RecordBatch};
use arrow_schema::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::sink::parquet::FINGERPRINT_KEY;

/// The columns every file a snapshot reads must have.
const REQUIRED: [&str; 2] = ["id", "processed_at"];

/// Rows per snapshot file.
pub const ROWS_PER_FILE: usize = 100_000;

/// What to snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotInput {
    /// The night's folder (`clipstream plan`'s output: its catalog ids).
    pub night: PathBuf,
    /// Tonight's run output folders.
    pub outputs: Vec<PathBuf>,
    /// The previous snapshot (none on the first night).
    pub previous: Option<PathBuf>,
    /// Where the snapshot goes (must not exist, or be a finished snapshot).
    pub out: PathBuf,
}

/// `_snapshot.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SnapshotSummary {
    /// Rows in the snapshot (one per product).
    pub rows: u64,
    /// Of which from tonight's output.
    pub from_tonight: u64,
    /// Of which carried over from the previous snapshot.
    pub carried_over: u64,
    /// Products of the catalog with no row anywhere (their image and text
    /// failed tonight and they were never embedded before).
    pub missing: u64,
    /// Files written.
    pub files: u64,
    /// Products planned tonight that have no row from tonight (their image
    /// or text failed: see the run's dead letters); those with an earlier
    /// row keep it, stale.
    #[serde(default)]
    pub planned_not_done: u64,
}

fn summary_path(out: &Path) -> PathBuf {
    out.join("_snapshot.json")
}

/// Writes the snapshot (or returns the one already in `input.out`, with
/// false). `before_publish` runs once the files are complete and before
/// they are renamed into place. `progress` gets (done, total) input files.
pub fn snapshot(
    input: &SnapshotInput,
    before_publish: &mut dyn FnMut() -> anyhow::Result<()>,
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<(SnapshotSummary, bool)> {
    if input.out.exists() {
        let p = summary_path(&input.out);
        let bytes = std::fs::read(&p).with_context(|| {
            format!(
                "{} exists and is not a finished snapshot (no _snapshot.json): refusing to \
                 write over it",
                input.out.display()
            )
        })?;
        let summary =
            serde_json::from_slice(&bytes).with_context(|| format!("reading {}", p.display()))?;
        return Ok((summary, false));
    }
    let ids = super::plan::read_ids(&input.night)?;
    let mut tonight = Vec::new();
    for d in &input.outputs {
        tonight.extend(super::parquet_files(d)?);
    }
    let previous = match &input.previous {
        Some(d) => super::parquet_files(d)?,
        None => Vec::new(),
    };
    let total = tonight.len() + previous.len();

    // Tonight's newest row per product: (file, row) by processed_at; and
    // the previous snapshot's newest row of every other product (the row
    // `plan` compared with, should that folder hold an id twice).
    let best = newest_rows(&tonight, &ids, &HashMap::new())?;
    let carried = newest_rows(&previous, &ids, &best)?;

    let parent = input
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = input
        .out
        .file_name()
        .context("the snapshot folder needs a name")?
        .to_string_lossy()
        .into_owned();
    remove_abandoned(parent, &name);
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;

    let mut out = Writers {
        dir: tmp.clone(),
        schema: None,
        open: HashMap::new(),
        next: HashMap::new(),
        files: 0,
    };
    let mut summary = SnapshotSummary::default();
    let mut done = 0;
    // The previous snapshot's rows of products that tonight did not touch,
    // then tonight's chosen rows.
    for (files, chosen, is_tonight) in [(&previous, &carried, false), (&tonight, &best, true)] {
        for (f, path) in files.iter().enumerate() {
            let super::OutputFile {
                batches: file,
                fingerprint: fp,
                ..
            } = super::open_output(path, &REQUIRED, None)?;
            let mut row = 0;
            for batch in file {
                let batch = batch.with_context(|| format!("reading {}", path.display()))?;
                let idc = super::text_column(&batch, "id", path)?;
                let keep: BooleanArray = (0..batch.num_rows())
                    .map(|i| {
                        Some(
                            !idc.is_null(i)
                                && chosen
                                    .get(idc.value(i))
                                    .is_some_and(|&(bf, br, _)| bf == f && br == row + i),
                        )
                    })
                    .collect();
                let n = out.write(&batch, &keep, fp.as_deref(), path)?;
                if is_tonight {
                    summary.from_tonight += n;
                } else {
                    summary.carried_over += n;
                }
                row += batch.num_rows();
            }
            done += 1;
            progress(done, total);
        }
    }
    summary.files = out.finish()?;
    summary.rows = summary.from_tonight + summary.carried_over;
    summary.missing = ids.len() as u64 - summary.rows;
    summary.planned_not_done = planned_ids(&input.night)?
        .iter()
        .filter(|id| ids.contains(*id) && !best.contains_key(*id))
        .count() as u64;
    super::plan::write_atomic(&summary_path(&tmp), |f| {
        serde_json::to_writer_pretty(&mut *f, &summary)?;
        Ok(())
    })?;
    // What must happen before the snapshot counts as finished (the
    // tombstones): if it fails, or the process dies here, a rerun does it
    // again, since the snapshot is not in place yet.
    before_publish()?;
    std::fs::rename(&tmp, &input.out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), input.out.display()))?;
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok((summary, true))
}

/// The ids of the night's planned events.
fn planned_ids(night: &Path) -> anyhow::Result<Vec<String>> {
    use std::io::BufRead;
    let path = super::plan::events_path(night);
    let f = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut ids = Vec::new();
    for line in std::io::BufReader::new(f).lines() {
        let v: serde_json::Value = serde_json::from_str(&line?)
            .with_context(|| format!("{}: not JSON lines", path.display()))?;
        if let Some(id) = v["id"].as_str() {
            ids.push(id.to_string());
        }
    }
    Ok(ids)
}

/// Per id of `ids` not in `except`: the (file, row, processed_at) of its
/// newest row in `files` (ties: the first).
fn newest_rows(
    files: &[PathBuf],
    ids: &HashSet<String>,
    except: &HashMap<String, (usize, usize, i64)>,
) -> anyhow::Result<HashMap<String, (usize, usize, i64)>> {
    let mut best: HashMap<String, (usize, usize, i64)> = HashMap::new();
    for (f, path) in files.iter().enumerate() {
        let file = super::open_output(path, &REQUIRED, Some(&REQUIRED))?.batches;
        let mut row = 0;
        for batch in file {
            let batch = batch.with_context(|| format!("reading {}", path.display()))?;
            let (idc, at) = (
                super::text_column(&batch, "id", path)?,
                super::time_column(&batch, "processed_at", path)?,
            );
            for i in 0..batch.num_rows() {
                if idc.is_null(i) {
                    continue;
                }
                let id = idc.value(i);
                if !ids.contains(id) || except.contains_key(id) {
                    continue;
                }
                let t = if at.is_null(i) { 0 } else { at.value(i) };
                match best.get_mut(id) {
                    Some(e) if t > e.2 => *e = (f, row + i, t),
                    Some(_) => {}
                    None => {
                        best.insert(id.to_string(), (f, row + i, t));
                    }
                }
            }
            row += batch.num_rows();
        }
    }
    Ok(best)
}

/// Removes `.<name>.partial-<pid>` folders of processes that are gone (a
/// snapshot killed part way); those of a running process are left alone.
fn remove_abandoned(parent: &Path, name: &str) {
    let prefix = format!(".{name}.partial-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file.strip_prefix(&prefix) else {
            continue;
        };
        let alive = pid.parse::<u32>().is_ok_and(|pid| {
            pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
        });
        if !alive {
            tracing::info!(folder = %e.path().display(), "removing an abandoned partial snapshot");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Columns added to the output after its first release, at the end: rows of
/// older files get them as nulls, so that one snapshot holds old and new
/// rows alike.
fn upgrade(batch: &RecordBatch) -> anyhow::Result<RecordBatch> {
    use arrow_schema::{DataType, Field, Schema};
    let later = [
        ("needs_review", DataType::Boolean),
        ("review_reason", DataType::Utf8),
    ];
    let schema = batch.schema();
    let missing: Vec<&(&str, DataType)> = later
        .iter()
        .filter(|(name, _)| schema.field_with_name(name).is_err())
        .collect();
    if missing.is_empty() {
        return Ok(batch.clone());
    }
    let mut fields: Vec<arrow_schema::FieldRef> = schema.fields().iter().cloned().collect();
    let mut columns = batch.columns().to_vec();
    for (name, kind) in missing {
        fields.push(Arc::new(Field::new(*name, kind.clone(), true)));
        columns.push(arrow_array::new_null_array(kind, batch.num_rows()));
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone())),
        columns,
    )?)
}

/// The snapshot's files: one open file per model fingerprint.
struct Writers {
    dir: PathBuf,
    schema: Option<SchemaRef>,
    open: HashMap<Option<String>, (ArrowWriter<std::fs::File>, usize)>,
    next: HashMap<Option<String>, usize>,
    files: u64,
}

impl Writers {
    /// Writes the rows of `batch` that `keep` selects; returns how many.
    fn write(
        &mut self,
        batch: &RecordBatch,
        keep: &BooleanArray,
        fp: Option<&str>,
        from: &Path,
    ) -> anyhow::Result<u64> {
        let batch = &upgrade(batch)?;
        let schema = self.schema.get_or_insert_with(|| batch.schema()).clone();
        if batch.schema().fields() != schema.fields() {
            anyhow::bail!(
                "{}: its columns differ from the other files' (another embedding width or \
                 another clipstream version): one snapshot cannot hold both",
                from.display()
            );
        }
        let rows = arrow_select::filter::filter_record_batch(batch, keep)?;
        let n = rows.num_rows();
        let key = fp.map(str::to_string);
        let mut offset = 0;
        while offset < n {
            if !self.open.contains_key(&key) {
                let seq = self.next.entry(key.clone()).or_insert(0);
                let w = create(&self.dir, &schema, fp, *seq)?;
                *seq += 1;
                self.open.insert(key.clone(), (w, 0));
            }
            let Some((w, in_file)) = self.open.get_mut(&key) else {
                unreachable!("opened above")
            };
            let take = (ROWS_PER_FILE - *in_file).min(n - offset);
            w.write(&rows.slice(offset, take))?;
            *in_file += take;
            offset += take;
            if *in_file == ROWS_PER_FILE
                && let Some((full, _)) = self.open.remove(&key)
            {
                full.into_inner()?.sync_all()?;
                self.files += 1;
            }
        }
        Ok(n as u64)
    }

    /// Closes every file; returns how many were written.
    fn finish(self) -> anyhow::Result<u64> {
        let mut files = self.files;
        for (_, (w, _)) in self.open {
            w.into_inner()?.sync_all()?;
            files += 1;
        }
        Ok(files)
    }
}

fn create(
    dir: &Path,
    schema: &SchemaRef,
    fp: Option<&str>,
    seq: usize,
) -> anyhow::Result<ArrowWriter<std::fs::File>> {
    let tag = fp.map_or_else(|| "unknown".to_string(), file_tag);
    let path = dir.join(format!("part-{tag}-{seq:05}.parquet"));
    let mut kv = Vec::new();
    if let Some(f) = fp {
        kv.push(KeyValue::new(
            FINGERPRINT_KEY.to_string(),
            Some(f.to_string()),
        ));
    }
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .set_key_value_metadata(Some(kv))
        .build();
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(ArrowWriter::try_new(file, Arc::clone(schema), Some(props))?)
}

/// A file-name tag for a fingerprint: 12 hex digits of its hash, and its
/// mode (`sha256:ab..+fast` → `ab..-fast`), so that two fingerprints never
/// share a file.
fn file_tag(fp: &str) -> String {
    let (hash, mode) = fp.split_once('+').unwrap_or((fp, ""));
    let clean = |s: &str, n: usize| -> String {
        s.chars()
            .filter(char::is_ascii_alphanumeric)
            .take(n)
            .collect()
    };
    let mut tag = clean(hash.trim_start_matches("sha256:"), 12);
    if !mode.is_empty() {
        tag.push('-');
        tag.push_str(&clean(mode, 16));
    }
    tag
}

#[cfg(test)]
mod tests {
    use super::{file_tag, upgrade};

    #[test]
    fn rows_of_files_without_the_review_columns_get_them_as_nulls() {
        use crate::record::OutputRow;
        use crate::sink::parquet::schema::{schema, to_batch};
        let row = OutputRow {
            id: "a".into(),
            source: "s".into(),
            partition: 0,
            offset: 0,
            image_uri: None,
            image_etag: None,
            text: Some("t".into()),
            attributes: None,
            image_embedding: None,
            text_embedding: Some(vec![0.6, 0.8]),
            labels: None,
            clip_score: None,
            needs_review: Some(true),
            review_reason: Some("why".into()),
            event_time_ms: None,
            processed_at_ms: 1,
        };
        let new = to_batch(&schema(2), 2, "m", &[row]).expect("batch");
        // A file of the first release: the same, without the last two.
        let old = new
            .project(&(0..new.num_columns() - 2).collect::<Vec<_>>())
            .expect("old");
        let up = upgrade(&old).expect("upgrade");
        assert_eq!(up.schema().fields(), new.schema().fields());
        assert!(up.column(up.num_columns() - 1).is_null(0));
        assert_eq!(upgrade(&new).expect("same").schema(), new.schema());
    }

    #[test]
    fn exact_and_fast_mode_never_share_a_file() {
        let a = file_tag("sha256:0123456789abcdef0123");
        let b = file_tag("sha256:0123456789abcdef0123+fast");
        assert_eq!(a, "0123456789ab");
        assert_eq!(b, "0123456789ab-fast");
    }
}
