//! What an earlier run already wrote: the ids in the complete Parquet files
//! of the output directory and the ids and positions in the dead-letter
//! file. The files source skips them, so a rerun completes a job without
//! duplicating rows. Temporary files of an interrupted run are removed.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;

use arrow_array::{Array, StringArray};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::ack::PartitionKey;

/// Ids and positions already done.
#[derive(Debug, Default, Clone)]
pub struct DoneSet {
    ids: HashSet<String>,
    positions: HashSet<(String, i32, i64)>,
    /// Complete Parquet files found.
    pub files: usize,
}

impl DoneSet {
    /// True when a row or dead letter with this id exists.
    pub fn has_id(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// True when a dead letter at this position exists.
    pub fn has_position(&self, key: &PartitionKey, offset: i64) -> bool {
        !self.positions.is_empty()
            && self
                .positions
                .contains(&(key.source.to_string(), key.partition, offset))
    }

    /// Number of ids known.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when nothing is done yet.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.positions.is_empty()
    }

    /// Reads the output directory and the dead-letter file (either may not
    /// exist yet) and removes temporary files left by a crash.
    pub fn load(parquet_dir: &Path, dead_letters: &Path) -> anyhow::Result<DoneSet> {
        let mut done = DoneSet::default();
        if parquet_dir.is_dir() {
            for entry in std::fs::read_dir(parquet_dir)? {
                let path = entry?.path();
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if name.ends_with(super::parquet::TMP_SUFFIX) {
                    tracing::info!(file = %path.display(), "removing an incomplete file of an interrupted run");
                    std::fs::remove_file(&path)?;
                } else if name.ends_with(".parquet") {
                    done.read_ids(&path).map_err(|e| {
                        anyhow::anyhow!("cannot read {} to resume: {e}", path.display())
                    })?;
                    done.files += 1;
                }
            }
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

    fn read_ids(&mut self, path: &Path) -> anyhow::Result<()> {
        let file = std::fs::File::open(path)?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
        let mask = ProjectionMask::columns(builder.parquet_schema(), ["id"]);
        for batch in builder.with_projection(mask).build()? {
            let batch = batch?;
            let ids = batch
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| anyhow::anyhow!("`id` is not a string column"))?;
            for i in 0..ids.len() {
                if ids.is_valid(i) {
                    self.ids.insert(ids.value(i).to_string());
                }
            }
        }
        Ok(())
    }
}
