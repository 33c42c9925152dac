//! Nightly re-embedding of a catalog: embed only what changed, publish a
//! complete table.
//!
//! A night is three steps, each rerunnable:
//! 1. [`plan`]: tonight's catalog against what earlier runs wrote → the
//!    events to embed (new products, a changed image, a changed text, or a
//!    different model), the deletions, and the list of tonight's ids.
//! 2. `clipstream run` embeds the planned events, as any other run.
//! 3. [`snapshot`]: one row per product of tonight's catalog: tonight's rows
//!    where there are some, the previous snapshot's otherwise; and
//!    [`tombstones`] for the removed products on the embeddings topic.
//!
//! "Changed" is decided without downloading an image: by a change-token
//! column of the catalog (a checksum or `updated_at`), or for local files
//! by their size and modification time, against the token the planned
//! event carried into the row's `attributes` (`clipstream.image_token`);
//! texts are compared as written; the model by its fingerprint
//! (`ClipModel::fingerprint`, kept in each Parquet file's metadata).

pub mod plan;
pub mod previous;
pub mod progress;
pub mod s3_folder;
pub mod snapshot;
pub mod tombstones;

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The attribute a planned event carries its image's change token in.
pub const TOKEN_ATTRIBUTE: &str = "clipstream.image_token";

/// Which catalog columns hold what.
#[derive(Debug, Clone)]
pub struct Columns {
    /// The product id (required in every row).
    pub id: String,
    /// The image URI (`s3://`, `file://` or a local path).
    pub image: Option<String>,
    /// The text (a title, a caption).
    pub text: Option<String>,
    /// A value that changes whenever the image does (a checksum,
    /// `updated_at`): when set, images are never looked at.
    pub change: Option<String>,
}

/// One product of the catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct Product {
    /// Where it is in the catalog (1-based line or row).
    pub line: u64,
    /// Its id.
    pub id: String,
    /// Its image URI.
    pub image: Option<String>,
    /// Its text.
    pub text: Option<String>,
    /// The change-token column's value.
    pub change: Option<String>,
}

/// What was wrong with catalog rows (counted, never fatal).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RowProblems {
    /// Rows without an id.
    pub no_id: u64,
    /// Rows with neither an image nor a text.
    pub nothing_to_embed: u64,
    /// Rows that could not be parsed.
    pub unreadable: u64,
    /// A few of them, with their line, for the report.
    pub examples: Vec<String>,
}

impl RowProblems {
    fn note(&mut self, line: u64, what: &str) {
        if self.examples.len() < 10 {
            self.examples.push(format!("line {line}: {what}"));
        }
    }

    /// Rows skipped in all.
    pub fn total(&self) -> u64 {
        self.no_id + self.nothing_to_embed + self.unreadable
    }
}

/// Reads a JSON Lines (`.jsonl`, `.ndjson`, `.json`) or CSV (`.csv`)
/// catalog export, calling `each` for every usable row. A missing file, an
/// unknown format or a CSV header without a configured column is an error
/// naming the file; a bad row is counted and skipped.
pub fn read_catalog(
    path: &Path,
    columns: &Columns,
    mut each: impl FnMut(Product),
) -> anyhow::Result<RowProblems> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot read the catalog {}", path.display()))?;
    let mut problems = RowProblems::default();
    let mut usable = 0u64;
    let mut keep = |p: Product, problems: &mut RowProblems| {
        if p.id.is_empty() {
            problems.no_id += 1;
            problems.note(p.line, "no id");
        } else if p.image.is_none() && p.text.is_none() {
            problems.nothing_to_embed += 1;
            problems.note(p.line, "neither an image nor a text");
        } else {
            usable += 1;
            each(p);
        }
    };
    match ext.as_str() {
        "jsonl" | "ndjson" | "json" => {
            use std::io::BufRead;
            let mut reader = std::io::BufReader::new(file);
            let mut raw = Vec::new();
            let mut n = 0u64;
            loop {
                raw.clear();
                let read = reader
                    .read_until(b'\n', &mut raw)
                    .with_context(|| format!("reading {} at line {}", path.display(), n + 1))?;
                if read == 0 {
                    break;
                }
                n += 1;
                // A byte-order mark on the first line is not part of it.
                let bytes = if n == 1 {
                    raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&raw)
                } else {
                    &raw
                };
                let Ok(line) = std::str::from_utf8(bytes) else {
                    problems.unreadable += 1;
                    problems.note(n, "not UTF-8");
                    continue;
                };
                if line.trim().is_empty() {
                    continue;
                }
                let value: serde_json::Value = match serde_json::from_str(line) {
                    Ok(v @ serde_json::Value::Object(_)) => v,
                    Ok(_) => {
                        problems.unreadable += 1;
                        problems.note(n, "not a JSON object");
                        continue;
                    }
                    Err(e) => {
                        problems.unreadable += 1;
                        problems.note(n, &format!("not JSON: {e}"));
                        continue;
                    }
                };
                let field = |name: &Option<String>| {
                    name.as_ref()
                        .and_then(|c| value.get(c))
                        .and_then(scalar_text)
                };
                let product = Product {
                    line: n,
                    id: field(&Some(columns.id.clone())).unwrap_or_default(),
                    image: field(&columns.image),
                    text: field(&columns.text),
                    change: field(&columns.change),
                };
                keep(product, &mut problems);
            }
        }
        "csv" => {
            let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(file);
            let header = reader
                .headers()
                .with_context(|| format!("reading the header of {}", path.display()))?
                .clone();
            let index = |name: &Option<String>| -> anyhow::Result<Option<usize>> {
                match name {
                    None => Ok(None),
                    Some(c) => header
                        .iter()
                        .position(|h| h == c)
                        .map(Some)
                        .with_context(|| {
                            format!(
                                "the catalog {} has no column {c:?} (its columns: {})",
                                path.display(),
                                header.iter().collect::<Vec<_>>().join(", ")
                            )
                        }),
                }
            };
            let id = index(&Some(columns.id.clone()))?.unwrap_or(0);
            let (image, text, change) = (
                index(&columns.image)?,
                index(&columns.text)?,
                index(&columns.change)?,
            );
            for (i, rec) in reader.records().enumerate() {
                let n = i as u64 + 2; // the header is line 1
                let rec = match rec {
                    Ok(r) => r,
                    Err(e) => {
                        problems.unreadable += 1;
                        problems.note(n, &e.to_string());
                        continue;
                    }
                };
                let get = |k: Option<usize>| {
                    k.and_then(|k| rec.get(k))
                        .map(str::trim)
                        .filter(|v| !v.is_empty())
                        .map(str::to_string)
                };
                let product = Product {
                    line: n,
                    id: get(Some(id)).unwrap_or_default(),
                    image: get(image),
                    text: get(text),
                    change: get(change),
                };
                keep(product, &mut problems);
            }
        }
        "parquet" => read_parquet_catalog(path, file, columns, &mut problems, &mut keep)?,
        other => anyhow::bail!(
            "the catalog {}: unknown format {other:?} (use .jsonl, .csv or .parquet)",
            path.display()
        ),
    }
    if usable == 0 {
        anyhow::bail!(
            "the catalog {} has no usable row ({} without an id in column {:?}, {} unreadable): \
             an empty or broken export is not an empty catalog",
            path.display(),
            problems.no_id,
            columns.id,
            problems.unreadable
        );
    }
    Ok(problems)
}

/// One column's value of a row, as text.
type TextColumn<'a> = Box<dyn Fn(usize) -> Option<String> + 'a>;

/// A Parquet catalog: the configured columns, as text (strings, integers);
/// a row's line is its 1-based row number.
fn read_parquet_catalog(
    path: &Path,
    file: std::fs::File,
    columns: &Columns,
    problems: &mut RowProblems,
    keep: &mut impl FnMut(Product, &mut RowProblems),
) -> anyhow::Result<()> {
    use arrow_array::{Array, Int32Array, Int64Array, LargeStringArray, StringArray, UInt64Array};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let bad = |what: String| anyhow::anyhow!("the catalog {}: {what}", path.display());
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| bad(format!("not a readable Parquet file ({e})")))?;
    let schema = builder.schema().clone();
    let wanted: Vec<&String> = [
        Some(&columns.id),
        columns.image.as_ref(),
        columns.text.as_ref(),
        columns.change.as_ref(),
    ]
    .into_iter()
    .flatten()
    .collect();
    for c in &wanted {
        if schema.field_with_name(c).is_err() {
            return Err(bad(format!(
                "no column {c:?} (its columns: {})",
                schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let reader = builder
        .with_batch_size(8192)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let mut line = 0u64;
    for batch in reader {
        let batch = batch.map_err(|e| bad(e.to_string()))?;
        // Each configured column as a text getter.
        let getter = |name: &Option<String>| -> anyhow::Result<Option<TextColumn<'_>>> {
            let Some(name) = name else { return Ok(None) };
            let col = batch
                .column_by_name(name)
                .ok_or_else(|| bad(format!("no column {name:?}")))?;
            let any = col.as_any();
            let f: Box<dyn Fn(usize) -> Option<String>> =
                if let Some(a) = any.downcast_ref::<StringArray>() {
                    Box::new(move |i| (!a.is_null(i)).then(|| a.value(i).trim().to_string()))
                } else if let Some(a) = any.downcast_ref::<LargeStringArray>() {
                    Box::new(move |i| (!a.is_null(i)).then(|| a.value(i).trim().to_string()))
                } else if let Some(a) = any.downcast_ref::<Int64Array>() {
                    Box::new(move |i| (!a.is_null(i)).then(|| a.value(i).to_string()))
                } else if let Some(a) = any.downcast_ref::<Int32Array>() {
                    Box::new(move |i| (!a.is_null(i)).then(|| a.value(i).to_string()))
                } else if let Some(a) = any.downcast_ref::<UInt64Array>() {
                    Box::new(move |i| (!a.is_null(i)).then(|| a.value(i).to_string()))
                } else {
                    return Err(bad(format!(
                        "column {name:?} is {}; text or integers expected",
                        col.data_type()
                    )));
                };
            Ok(Some(f))
        };
        let (id, image, text, change) = (
            getter(&Some(columns.id.clone()))?,
            getter(&columns.image)?,
            getter(&columns.text)?,
            getter(&columns.change)?,
        );
        let get = |g: &Option<TextColumn<'_>>, i: usize| {
            g.as_ref().and_then(|g| g(i)).filter(|v| !v.is_empty())
        };
        for i in 0..batch.num_rows() {
            line += 1;
            let product = Product {
                line,
                id: get(&id, i).unwrap_or_default(),
                image: get(&image, i),
                text: get(&text, i),
                change: get(&change, i),
            };
            keep(product, problems);
        }
    }
    Ok(())
}

/// A JSON scalar as text (`null` and empty strings are absent).
fn scalar_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The model fingerprint a clipstream Parquet file records in its
/// metadata (`None`: written before fingerprints were kept).
pub fn file_fingerprint(meta: &parquet::file::metadata::ParquetMetaData) -> Option<String> {
    meta.file_metadata()
        .key_value_metadata()
        .and_then(|kv| {
            kv.iter()
                .find(|k| k.key == crate::sink::parquet::FINGERPRINT_KEY)
        })
        .and_then(|k| k.value.clone())
}

/// A clipstream output file, opened for reading.
pub struct OutputFile {
    /// Its rows, in batches of 8,192, of the columns asked for.
    pub batches: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    /// The model fingerprint in its metadata ([`file_fingerprint`]).
    pub fingerprint: Option<String>,
    /// Rows in the file.
    pub rows: u64,
}

impl std::fmt::Debug for OutputFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputFile")
            .field("fingerprint", &self.fingerprint)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

/// Opens the clipstream output file `path`: an error naming it when it is
/// not Parquet or lacks one of the `required` columns; reads only the
/// columns of `project` (all of them: `None`).
pub fn open_output(
    path: &Path,
    required: &[&str],
    project: Option<&[&str]>,
) -> anyhow::Result<OutputFile> {
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let bad = |what: String| anyhow::anyhow!("{}: {what}", path.display());
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| bad(format!("not a readable Parquet file ({e})")))?;
    for c in required {
        if builder.schema().field_with_name(c).is_err() {
            return Err(bad(format!(
                "no column {c:?}: not clipstream output (or written by a different schema)"
            )));
        }
    }
    let fingerprint = file_fingerprint(builder.metadata());
    let rows = u64::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0);
    let builder = match project {
        Some(columns) => {
            let mask = ProjectionMask::columns(builder.parquet_schema(), columns.iter().copied());
            builder.with_projection(mask)
        }
        None => builder,
    };
    let batches = builder
        .with_batch_size(8192)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    Ok(OutputFile {
        batches,
        fingerprint,
        rows,
    })
}

/// The text column `name` of a batch of the file `path`.
pub fn text_column<'a>(
    batch: &'a arrow_array::RecordBatch,
    name: &str,
    path: &Path,
) -> anyhow::Result<&'a arrow_array::StringArray> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<arrow_array::StringArray>())
        .with_context(|| format!("{}: column {name:?} is not text", path.display()))
}

/// The timestamp column `name` (milliseconds) of a batch of the file `path`.
pub fn time_column<'a>(
    batch: &'a arrow_array::RecordBatch,
    name: &str,
    path: &Path,
) -> anyhow::Result<&'a arrow_array::TimestampMillisecondArray> {
    batch
        .column_by_name(name)
        .and_then(|c| {
            c.as_any()
                .downcast_ref::<arrow_array::TimestampMillisecondArray>()
        })
        .with_context(|| format!("{}: column {name:?} is not a timestamp", path.display()))
}

/// The Parquet files under `dir`, recursively, in name order (files being
/// written, `.tmp` and names starting with `.` or `_`, are left out).
pub fn parquet_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))?;
        for e in entries {
            let e = e.with_context(|| format!("cannot list {}", d.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.starts_with('_') {
                continue;
            }
            let path = e.path();
            if e.file_type()?.is_dir() {
                stack.push(path);
            } else if name.ends_with(".parquet") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns() -> Columns {
        Columns {
            id: "sku".into(),
            image: Some("img".into()),
            text: Some("title".into()),
            change: Some("sum".into()),
        }
    }

    fn read(name: &str, text: &str) -> anyhow::Result<(Vec<Product>, RowProblems)> {
        let dir = std::env::temp_dir().join(format!("clipstream-catalog-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        let mut rows = Vec::new();
        let problems = read_catalog(&path, &columns(), |p| rows.push(p))?;
        Ok((rows, problems))
    }

    #[test]
    fn jsonl_rows_are_read_and_bad_ones_counted() {
        let (rows, problems) = read(
            "c.jsonl",
            "{\"sku\": 7, \"img\": \"a.jpg\", \"title\": \" t \", \"sum\": \"x\"}\n\
             \n\
             {\"img\": \"b.jpg\"}\n\
             not json\n\
             [1, 2]\n\
             {\"sku\": \"s2\", \"title\": null}\n\
             {\"sku\": \"s3\", \"title\": \"only text\"}\n",
        )
        .expect("reads");
        assert_eq!(
            rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["7", "s3"]
        );
        assert_eq!(rows[0].text.as_deref(), Some("t"));
        assert_eq!(rows[0].change.as_deref(), Some("x"));
        assert_eq!(rows[1].line, 7);
        assert_eq!(
            (
                problems.no_id,
                problems.unreadable,
                problems.nothing_to_embed
            ),
            (1, 2, 1)
        );
    }

    #[test]
    fn parquet_catalogs_are_read_by_column_name() {
        use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
        use std::sync::Arc;
        let dir =
            std::env::temp_dir().join(format!("clipstream-catalog-pq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("c.parquet");
        let batch = RecordBatch::try_from_iter([
            (
                "sku",
                Arc::new(Int64Array::from(vec![Some(7), None, Some(9)])) as ArrayRef,
            ),
            (
                "img",
                Arc::new(StringArray::from(vec![Some("a.jpg"), Some("b.jpg"), None])) as ArrayRef,
            ),
            (
                "title",
                Arc::new(StringArray::from(vec![
                    Some(" t "),
                    Some("x"),
                    Some("only text"),
                ])) as ArrayRef,
            ),
            (
                "sum",
                Arc::new(StringArray::from(vec![Some("s1"), Some("s2"), None])) as ArrayRef,
            ),
        ])
        .expect("batch");
        let f = std::fs::File::create(&path).expect("file");
        let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).expect("writer");
        w.write(&batch).expect("write");
        w.close().expect("close");
        let mut rows = Vec::new();
        let problems = read_catalog(&path, &columns(), |p| rows.push(p)).expect("reads");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].id, "7");
        assert_eq!(rows[0].text.as_deref(), Some("t"));
        assert_eq!(rows[1].image, None);
        assert_eq!(rows[1].line, 3);
        assert_eq!(problems.no_id, 1);
        let mut c = columns();
        c.text = Some("nope".into());
        let err = read_catalog(&path, &c, |_| {}).expect_err("missing column");
        assert!(err.to_string().contains("no column \"nope\""), "{err}");
    }

    #[test]
    fn csv_needs_its_columns_and_handles_quotes() {
        let (rows, problems) = read(
            "c.csv",
            "sku,img,title,sum\n1,a.jpg,\"a, quoted \"\"title\"\"\",s\n,b.jpg,x,y\n",
        )
        .expect("reads");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].text.as_deref(), Some("a, quoted \"title\""));
        assert_eq!(problems.no_id, 1);
        let err = read("d.csv", "sku,img,title\n1,a,b\n").expect_err("no `sum`");
        assert!(err.to_string().contains("no column \"sum\""), "{err}");
        let err = read("e.txt", "x").expect_err("format");
        assert!(err.to_string().contains("unknown format"), "{err}");
    }
}
