//! What an earlier run already wrote, so that a rerun of a local job
//! completes it exactly: nothing skipped that was not written, nothing
//! written twice.
//!
//! - **By position.** A manifest's records are skipped by their line
//!   (`offset`), read from the complete Parquet files of the output
//!   directory (`dt=` folders included) and from the dead-letter file — not
//!   by id: a manifest may hold the same id twice, and each line is its own
//!   record. A directory source has no stable positions (adding an image
//!   shifts them) but unique ids (paths), so it resumes by id.
//! - **One input per directory.** `_clipstream_input.json` in the output
//!   directory names the input that writes there (its kind, its absolute
//!   path and, for a manifest, its size and SHA-256). A run over another
//!   input, or over a manifest that changed other than by lines appended at
//!   its end, is refused with a clear error: its positions would not mean
//!   the same records. An output directory from before this file existed is
//!   adopted when every file in it is named after this input.
//! - Temporary files of an interrupted run are removed.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use arrow_array::{Array, Int32Array, Int64Array, StringArray};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use crate::ack::PartitionKey;

/// The marker file naming the input of an output directory.
pub const INPUT_MARKER: &str = "_clipstream_input.json";

/// Which input writes an output directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputIdentity {
    /// `manifest` or `dir`.
    pub kind: String,
    /// The input's absolute path.
    pub path: PathBuf,
    /// A manifest's size in bytes when last run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// The SHA-256 of those bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl InputIdentity {
    /// The identity of a manifest (hashed as it is now).
    pub fn manifest(path: &Path) -> anyhow::Result<InputIdentity> {
        let path = std::fs::canonicalize(path)
            .map_err(|e| anyhow::anyhow!("cannot open manifest {}: {e}", path.display()))?;
        let (bytes, sha256) = hash_prefix(&path, None)?;
        Ok(InputIdentity {
            kind: "manifest".into(),
            path,
            bytes: Some(bytes),
            sha256: Some(sha256),
        })
    }

    /// The identity of an images directory.
    pub fn dir(path: &Path) -> anyhow::Result<InputIdentity> {
        let path = std::fs::canonicalize(path)
            .map_err(|e| anyhow::anyhow!("cannot open directory {}: {e}", path.display()))?;
        Ok(InputIdentity {
            kind: "dir".into(),
            path,
            bytes: None,
            sha256: None,
        })
    }
}

/// The size and SHA-256 of a file's first `limit` bytes (all of it when
/// `None`).
fn hash_prefix(path: &Path, limit: Option<u64>) -> anyhow::Result<(u64, String)> {
    use sha2::Digest as _;
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let mut reader = BufReader::new(file.take(limit.unwrap_or(u64::MAX)));
    let mut hasher = sha2::Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let k = reader
            .read(&mut buf)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        if k == 0 {
            break;
        }
        hasher.update(&buf[..k]);
        n += k as u64;
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((n, hex))
}

/// Records already done.
#[derive(Debug, Default, Clone)]
pub struct DoneSet {
    ids: HashSet<String>,
    positions: HashSet<(String, i32, i64)>,
    /// Resume by id (a directory source) rather than by position.
    by_id: bool,
    /// Complete Parquet files found.
    pub files: usize,
}

impl DoneSet {
    /// True when the record at this position (or, for a directory source,
    /// with this id) was written or dead-lettered.
    pub fn is_done(&self, key: &PartitionKey, offset: i64, id: Option<&str>) -> bool {
        if self.by_id {
            id.is_some_and(|id| self.ids.contains(id))
        } else {
            self.positions
                .contains(&(key.source.to_string(), key.partition, offset))
        }
    }

    /// Records known done.
    pub fn len(&self) -> usize {
        if self.by_id {
            self.ids.len()
        } else {
            self.positions.len()
        }
    }

    /// True when nothing is done yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that `out` belongs to `input` (claiming it when new), then
    /// reads what is done: the complete Parquet files (and `dt=` folders)
    /// and the dead-letter file; removes temporary files left by a crash.
    /// `stem` is how this input's file names start (`<name>-0-`).
    pub fn load(
        out: &Path,
        dead_letters: &Path,
        input: &InputIdentity,
        stem: &str,
    ) -> anyhow::Result<DoneSet> {
        let mut done = DoneSet {
            by_id: input.kind == "dir",
            ..DoneSet::default()
        };
        let parquet = parquet_files(out)?;
        claim(out, input, stem, &parquet)?;
        for path in parquet {
            done.read(&path)
                .map_err(|e| anyhow::anyhow!("cannot read {} to resume: {e}", path.display()))?;
            done.files += 1;
        }
        if let Ok(file) = std::fs::File::open(dead_letters) {
            for line in BufReader::new(file).lines() {
                let line = line?;
                // A torn last line is cut off when the file is reopened.
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if let Some(id) = v["id"].as_str() {
                    done.ids.insert(id.to_string());
                }
                if let (Some(s), Some(p), Some(o)) = (
                    v["source"].as_str(),
                    v["partition"].as_i64(),
                    v["offset"].as_i64(),
                ) {
                    done.positions.insert((s.to_string(), p as i32, o));
                }
            }
        }
        Ok(done)
    }

    fn read(&mut self, path: &Path) -> anyhow::Result<()> {
        let file = std::fs::File::open(path)?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
        let mask = ProjectionMask::columns(
            builder.parquet_schema(),
            ["id", "source", "partition", "offset"],
        );
        for batch in builder.with_projection(mask).build()? {
            let batch = batch?;
            let column = |name: &str| {
                batch.column_by_name(name).ok_or_else(|| {
                    anyhow::anyhow!("no `{name}` column: not a clipstream output file")
                })
            };
            let ids = column("id")?
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| anyhow::anyhow!("`id` is not a string column"))?;
            let sources = column("source")?
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| anyhow::anyhow!("`source` is not a string column"))?;
            let partitions = column("partition")?
                .as_any()
                .downcast_ref::<Int32Array>()
                .ok_or_else(|| anyhow::anyhow!("`partition` is not an int32 column"))?;
            let offsets = column("offset")?
                .as_any()
                .downcast_ref::<Int64Array>()
                .ok_or_else(|| anyhow::anyhow!("`offset` is not an int64 column"))?;
            for i in 0..batch.num_rows() {
                if ids.is_valid(i) {
                    self.ids.insert(ids.value(i).to_string());
                }
                self.positions.insert((
                    sources.value(i).to_string(),
                    partitions.value(i),
                    offsets.value(i),
                ));
            }
        }
        Ok(())
    }
}

/// The complete Parquet files of `out` and its `dt=` folders; temporary
/// files left by a crash are removed.
fn parquet_files(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    if !out.is_dir() {
        return Ok(files);
    }
    let mut folders = vec![out.to_path_buf()];
    while let Some(d) = folders.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type()?.is_dir() && name.starts_with("dt=") && d == out {
                folders.push(path);
            } else if name.ends_with(crate::sink::parquet::TMP_SUFFIX) {
                tracing::info!(file = %path.display(), "removing an incomplete file of an interrupted run");
                std::fs::remove_file(&path)?;
            } else if name.ends_with(".parquet") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Makes sure `out` is `input`'s: writes the marker into a new directory,
/// checks it in a used one, adopts an unmarked one whose files all carry
/// `stem`; refuses anything else.
fn claim(out: &Path, input: &InputIdentity, stem: &str, parquet: &[PathBuf]) -> anyhow::Result<()> {
    let marker = out.join(INPUT_MARKER);
    let refuse = |why: String| {
        anyhow::anyhow!(
            "{} cannot be resumed by this run: {why}. Write to another output directory (sink.parquet.dir), or remove this one to start over.",
            out.display()
        )
    };
    match std::fs::read(&marker) {
        Ok(bytes) => {
            let theirs: InputIdentity = serde_json::from_slice(&bytes)
                .map_err(|e| refuse(format!("its {INPUT_MARKER} is unreadable ({e})")))?;
            if theirs.kind != input.kind || theirs.path != input.path {
                return Err(refuse(format!(
                    "it holds the output of {} {}, not of {} {}",
                    theirs.kind,
                    theirs.path.display(),
                    input.kind,
                    input.path.display()
                )));
            }
            if let (Some(n), Some(sha)) = (theirs.bytes, &theirs.sha256) {
                let (now, now_sha) = hash_prefix(&input.path, Some(n))?;
                if now < n || &now_sha != sha {
                    return Err(refuse(format!(
                        "the manifest {} changed since that output was written (only lines added at its end keep the positions of the others)",
                        input.path.display()
                    )));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let foreign: Vec<&PathBuf> = parquet
                .iter()
                .filter(|p| {
                    !p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(stem))
                })
                .collect();
            if let Some(f) = foreign.first() {
                return Err(refuse(format!(
                    "it holds files of another input ({} and {} more)",
                    f.display(),
                    foreign.len() - 1
                )));
            }
        }
        Err(e) => return Err(refuse(format!("its {INPUT_MARKER} cannot be read ({e})"))),
    }
    std::fs::create_dir_all(out)?;
    let tmp = out.join(format!(".{INPUT_MARKER}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(input)?)?;
    std::fs::rename(&tmp, &marker)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::OutputRow;
    use std::sync::Arc;

    fn write_rows(path: &Path, source: &str, rows: &[(&str, i64)]) {
        let rows: Vec<OutputRow> = rows
            .iter()
            .map(|(id, offset)| OutputRow {
                id: id.to_string(),
                source: Arc::from(source),
                partition: 0,
                offset: *offset,
                image_uri: None,
                image_etag: None,
                text: Some("t".into()),
                attributes: None,
                image_embedding: None,
                text_embedding: Some(vec![1.0, 0.0]),
                labels: None,
                clip_score: None,
                needs_review: None,
                review_reason: None,
                event_time_ms: None,
                processed_at_ms: 0,
            })
            .collect();
        let schema = crate::sink::parquet::schema(2);
        let batch = crate::sink::parquet::to_batch(&schema, 2, "m", &rows).expect("batch");
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(path).expect("file"),
            schema,
            None,
        )
        .expect("writer");
        w.write(&batch).expect("write");
        w.close().expect("close");
    }

    fn key() -> PartitionKey {
        PartitionKey {
            source: "events".into(),
            partition: 0,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("clipstream-resume-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    /// A manifest with the same id on two lines: only the line that was
    /// written is done; files in `dt=` folders count.
    #[test]
    fn resume_is_by_position_and_sees_date_folders() {
        let d = scratch("positions");
        let manifest = d.join("events.jsonl");
        std::fs::write(
            &manifest,
            "{\"id\": \"a\"}\n{\"id\": \"b\"}\n{\"id\": \"a\"}\n",
        )
        .expect("m");
        let out = d.join("out");
        write_rows(
            &out.join("events-0-0000000000.parquet"),
            "events",
            &[("a", 0)],
        );
        write_rows(
            &out.join("dt=2026-01-01/events-0-0000000001.parquet"),
            "events",
            &[("b", 1)],
        );
        let input = InputIdentity::manifest(&manifest).expect("id");
        let done = DoneSet::load(&out, &out.join("_dead_letters.jsonl"), &input, "events-0-")
            .expect("load");
        assert!(done.is_done(&key(), 0, Some("a")));
        assert!(done.is_done(&key(), 1, Some("b")));
        assert!(
            !done.is_done(&key(), 2, Some("a")),
            "the second line with id a was never written"
        );
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn another_input_or_a_changed_manifest_is_refused_and_appending_is_fine() {
        let d = scratch("claim");
        let out = d.join("out");
        let m1 = d.join("one/events.jsonl");
        let m2 = d.join("two/events.jsonl");
        for m in [&m1, &m2] {
            std::fs::create_dir_all(m.parent().expect("p")).expect("dir");
            std::fs::write(m, "{\"id\": \"a\"}\n").expect("m");
        }
        let dead = out.join("_dead_letters.jsonl");
        let load = |m: &Path| {
            let input = InputIdentity::manifest(m).expect("id");
            DoneSet::load(&out, &dead, &input, "events-0-")
        };
        load(&m1).expect("a new directory is claimed");
        let e = load(&m2).expect_err("same file name, another manifest");
        assert!(
            e.to_string().contains("holds the output of manifest"),
            "{e}"
        );
        std::fs::write(&m1, "{\"id\": \"a\"}\n{\"id\": \"b\"}\n").expect("append");
        load(&m1).expect("lines appended keep positions");
        std::fs::write(&m1, "{\"id\": \"z\"}\n{\"id\": \"b\"}\n").expect("edit");
        let e = load(&m1).expect_err("an edited manifest");
        assert!(e.to_string().contains("changed"), "{e}");

        // An unmarked directory: adopted if every file is this input's.
        let legacy = d.join("legacy");
        write_rows(
            &legacy.join("events-0-0000000000.parquet"),
            "events",
            &[("a", 0)],
        );
        let input = InputIdentity::manifest(&m2).expect("id");
        DoneSet::load(&legacy, &legacy.join("x"), &input, "events-0-").expect("adopted");
        let other = d.join("other");
        write_rows(
            &other.join("photos-0-0000000000.parquet"),
            "photos",
            &[("a", 0)],
        );
        let e = DoneSet::load(&other, &other.join("x"), &input, "events-0-").expect_err("foreign");
        assert!(e.to_string().contains("another input"), "{e}");
        std::fs::remove_dir_all(&d).ok();
    }
}
