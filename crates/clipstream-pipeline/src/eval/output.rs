//! The labels a run wrote, read back from its Parquet output (no
//! re-encoding): per record its id, attributes, top-k labels and the model
//! that wrote them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arrow_array::{Array, Float32Array, ListArray, StringArray, StructArray};

/// One record of the output.
#[derive(Debug, Clone)]
pub struct Labelled {
    /// The record's id.
    pub id: String,
    /// Its attributes (a JSON object; `Null` when none or unreadable).
    pub attributes: serde_json::Value,
    /// Its labels, best first (empty: none were written).
    pub labels: Vec<(String, f64)>,
    /// The model that wrote it.
    pub model_id: String,
    processed_at: i64,
}

const COLUMNS: [&str; 5] = ["id", "attributes", "labels", "model_id", "processed_at"];

/// Every record of the clipstream output under `dir` (its newest row per
/// id). An empty folder, a file of another schema or one that is not
/// Parquet is an error naming it.
pub fn read(dir: &Path) -> anyhow::Result<Vec<Labelled>> {
    anyhow::ensure!(
        dir.is_dir(),
        "{}: not a directory of clipstream output",
        dir.display()
    );
    let files: Vec<PathBuf> = crate::catalog::parquet_files(dir)?;
    anyhow::ensure!(
        !files.is_empty(),
        "{}: no Parquet files (is this the run's [sink.parquet] dir?)",
        dir.display()
    );
    let mut by_id: HashMap<String, Labelled> = HashMap::new();
    for path in &files {
        for r in read_file(path)? {
            if by_id
                .get(&r.id)
                .is_none_or(|old| old.processed_at <= r.processed_at)
            {
                by_id.insert(r.id.clone(), r);
            }
        }
    }
    let mut out: Vec<Labelled> = by_id.into_values().collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

fn read_file(path: &Path) -> anyhow::Result<Vec<Labelled>> {
    let bad = |what: String| anyhow::anyhow!("{}: {what}", path.display());
    let file = crate::catalog::open_output(path, &COLUMNS, Some(&COLUMNS))?;
    let mut out = Vec::new();
    for batch in file.batches {
        let batch = batch.map_err(|e| bad(e.to_string()))?;
        let text = |name: &str| crate::catalog::text_column(&batch, name, path);
        let (ids, attrs, models) = (text("id")?, text("attributes")?, text("model_id")?);
        let times = crate::catalog::time_column(&batch, "processed_at", path)?;
        let labels = batch
            .column_by_name("labels")
            .and_then(|c| c.as_any().downcast_ref::<ListArray>())
            .ok_or_else(|| bad("column \"labels\" is not a list".into()))?;
        let items = labels
            .values()
            .as_any()
            .downcast_ref::<StructArray>()
            .ok_or_else(|| bad("column \"labels\" does not hold (label, score)".into()))?;
        let names = items
            .column_by_name("label")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| bad("labels without a text `label`".into()))?;
        let scores = items
            .column_by_name("score")
            .and_then(|c| c.as_any().downcast_ref::<Float32Array>())
            .ok_or_else(|| bad("labels without a float `score`".into()))?;
        let offsets = labels.value_offsets();
        for i in 0..batch.num_rows() {
            if ids.is_null(i) {
                continue;
            }
            let mut ranked = Vec::new();
            if !labels.is_null(i) {
                for j in offsets[i] as usize..offsets[i + 1] as usize {
                    if !names.is_null(j) && !scores.is_null(j) {
                        ranked.push((names.value(j).to_string(), f64::from(scores.value(j))));
                    }
                }
            }
            out.push(Labelled {
                id: ids.value(i).to_string(),
                attributes: if attrs.is_null(i) {
                    serde_json::Value::Null
                } else {
                    serde_json::from_str(attrs.value(i)).unwrap_or(serde_json::Value::Null)
                },
                labels: ranked,
                model_id: if models.is_null(i) {
                    String::new()
                } else {
                    models.value(i).to_string()
                },
                processed_at: if times.is_null(i) { 0 } else { times.value(i) },
            });
        }
    }
    Ok(out)
}
