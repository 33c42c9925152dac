//! What earlier runs wrote, per product: the newest row's image token, text
//! and model fingerprint, read from their Parquet output without loading
//! embeddings.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array, StringArray};

/// The newest row written for a product.
#[derive(Debug, Clone, PartialEq)]
pub struct Prior {
    /// Its image's change token (`clipstream.image_token` of its
    /// attributes; else `etag:` and the fetched object's ETag).
    pub token: Option<String>,
    /// A hash of its text ([`text_hash`]).
    pub text: u64,
    /// A hash of its image URI ([`text_hash`]): an image that moved is
    /// another image, whatever its token says.
    pub image: u64,
    /// The fingerprint of the model that wrote it (from the file's
    /// metadata; `None` for files written before fingerprints were kept).
    pub fingerprint: Option<Arc<str>>,
    /// When it was written (ms since the epoch).
    pub processed_at: i64,
}

/// A hash of a text (or of its absence), to compare texts without keeping
/// them: stable within a process.
pub fn text_hash(text: Option<&str>) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// The columns a clipstream output file must have to be read here.
const COLUMNS: [&str; 6] = [
    "id",
    "image_uri",
    "image_etag",
    "text",
    "attributes",
    "processed_at",
];

/// Reads every Parquet file under `dirs` (missing directories are
/// skipped: a first night has no previous output) and keeps, per id, the
/// newest row. `progress` is called after each file with (done, total).
pub fn read(
    dirs: &[PathBuf],
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<HashMap<String, Prior>> {
    let mut files = Vec::new();
    for d in dirs {
        if d.is_dir() {
            files.extend(super::parquet_files(d)?);
        } else if d.exists() {
            anyhow::bail!("{} is not a directory of clipstream output", d.display());
        }
    }
    let mut out: HashMap<String, Prior> = HashMap::new();
    for (k, path) in files.iter().enumerate() {
        read_file(path, &mut out)?;
        progress(k + 1, files.len());
    }
    Ok(out)
}

fn read_file(path: &Path, out: &mut HashMap<String, Prior>) -> anyhow::Result<()> {
    let file = super::open_output(path, &COLUMNS, Some(&COLUMNS))?;
    let fingerprint: Option<Arc<str>> = file.fingerprint.map(Arc::from);
    for batch in file.batches {
        let batch = batch.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let text_col = |name: &str| super::text_column(&batch, name, path);
        let (ids, uris, etags, texts, attrs) = (
            text_col("id")?,
            text_col("image_uri")?,
            text_col("image_etag")?,
            text_col("text")?,
            text_col("attributes")?,
        );
        let times = super::time_column(&batch, "processed_at", path)?;
        for i in 0..batch.num_rows() {
            let Some(id) = get(ids, i) else { continue };
            let at = if times.is_null(i) { 0 } else { times.value(i) };
            if out.get(id).is_some_and(|p| p.processed_at > at) {
                continue;
            }
            let token = get(attrs, i)
                .and_then(|a| serde_json::from_str::<serde_json::Value>(a).ok())
                .and_then(|a| {
                    a.get(super::TOKEN_ATTRIBUTE)
                        .and_then(|t| t.as_str())
                        .map(str::to_string)
                })
                .or_else(|| get(etags, i).map(|e| format!("etag:{e}")));
            out.insert(
                id.to_string(),
                Prior {
                    token,
                    text: text_hash(get(texts, i)),
                    image: text_hash(get(uris, i)),
                    fingerprint: fingerprint.clone(),
                    processed_at: at,
                },
            );
        }
    }
    Ok(())
}

fn get(a: &StringArray, i: usize) -> Option<&str> {
    (!a.is_null(i)).then(|| a.value(i))
}
