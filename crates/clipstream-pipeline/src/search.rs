//! Exact nearest-neighbour search over clipstream output: a scan.
//!
//! Each Parquet file is read in batches (only the id, image URI, text,
//! model id and the embedding column asked for), each batch's embeddings
//! are scored against every query (one pass over the data answers them
//! all), and a bounded heap per query keeps the best. Memory is one batch
//! and the heaps, whatever the output's size. Embeddings are unit vectors,
//! so the score is a dot product (the cosine).
//!
//! Why no index: a scan of decoded vectors runs at memory speed (see
//! `clipstream bench --search`), so a million 512-d embeddings take a
//! fraction of a second once decoded; decoding the Parquet pages costs
//! more than scoring them. An ANN index (HNSW, IVF) would save the scan
//! but not the decoding unless it kept its own copy of the vectors, at the
//! price of a build step, a second artefact to keep in step with the
//! output, and recall below 1.

use std::cmp::Ordering;
use std::collections::{BTreeSet, BinaryHeap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use arrow_array::{Array, FixedSizeListArray, Float32Array, StringArray};
use serde::Serialize;

/// Which embedding column a query is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `image_embedding`: find images.
    Image,
    /// `text_embedding`: find texts.
    Text,
}

impl Target {
    /// The column's name.
    pub fn column(self) -> &'static str {
        match self {
            Target::Image => "image_embedding",
            Target::Text => "text_embedding",
        }
    }
}

/// One result.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Hit {
    /// The record's id.
    pub id: String,
    /// Cosine to the query.
    pub score: f32,
    /// Its image.
    pub image_uri: Option<String>,
    /// Its text.
    pub text: Option<String>,
}

/// What a scan read and how long it took.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Scanned {
    /// Files read.
    pub files: usize,
    /// Rows with an embedding in the column.
    pub rows: u64,
    /// Embedding bytes scored.
    pub bytes: u64,
    /// Seconds reading and decoding Parquet.
    pub decode_secs: f64,
    /// Seconds scoring.
    pub score_secs: f64,
    /// The `model_id`s of the rows.
    pub model_ids: BTreeSet<String>,
    /// The model fingerprints of the files (those that carry one).
    pub fingerprints: BTreeSet<String>,
}

/// The model a query comes from, to check the output against.
#[derive(Debug, Clone)]
pub struct QueryModel {
    /// Its `model_id`.
    pub id: String,
    /// Its fingerprint ([`clipstream_model::ModelDir::fingerprint`]).
    pub fingerprint: String,
    /// Its embedding width.
    pub dim: usize,
}

/// Dot product, in 16 independent lanes (vectorised by the compiler).
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Sum of all values, in the same lanes: the "plain read" the scan is
/// compared with.
#[inline(always)]
fn sum_lanes(a: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let c = a.chunks_exact(16);
    let r = c.remainder();
    for x in c {
        for l in 0..16 {
            acc[l] += x[l];
        }
    }
    acc.iter().sum::<f32>() + r.iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_avx2(a: &[f32]) -> f32 {
    sum_lanes(a)
}

fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `a · b` (AVX2 where the CPU has it).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 (checked above).
        #[allow(unsafe_code)]
        return unsafe { dot_avx2(a, b) };
    }
    dot_lanes(a, b)
}

/// The sum of `a`'s values (AVX2 where the CPU has it).
pub fn sum(a: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 (checked above).
        #[allow(unsafe_code)]
        return unsafe { sum_avx2(a) };
    }
    sum_lanes(a)
}

/// A candidate in a heap: ordered so that the heap's top is the worst.
#[derive(Debug)]
struct Entry(f32, u64, Hit);

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> Ordering {
        // Worst on top: lower score, then later position.
        o.0.total_cmp(&self.0).then(self.1.cmp(&o.1))
    }
}

/// The best `keep` rows of one query.
#[derive(Debug)]
pub struct Top {
    keep: usize,
    heap: BinaryHeap<Entry>,
}

impl Top {
    /// Keeps `keep` candidates.
    pub fn new(keep: usize) -> Top {
        Top {
            keep: keep.max(1),
            // Grown as candidates come: a large k costs only what it finds.
            heap: BinaryHeap::with_capacity(keep.min(1024) + 1),
        }
    }

    /// Whether `score` would enter.
    #[inline]
    pub fn admits(&self, score: f32) -> bool {
        self.heap.len() < self.keep || self.heap.peek().is_some_and(|w| score > w.0)
    }

    /// Adds a row that [`Top::admits`].
    pub fn push(&mut self, score: f32, position: u64, hit: impl FnOnce() -> Hit) {
        self.heap.push(Entry(score, position, hit()));
        if self.heap.len() > self.keep {
            self.heap.pop();
        }
    }

    /// The best `k`, best first, one per id (an output may hold an id
    /// more than once: a rerun, a replay).
    pub fn finish(self, k: usize) -> Vec<Hit> {
        let mut all: Vec<Entry> = self.heap.into_vec();
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut seen = HashSet::new();
        all.into_iter()
            .filter(|e| seen.insert(e.2.id.clone()))
            .take(k)
            .map(|e| e.2)
            .collect()
    }
}

/// Scores a block of `dim`-wide rows (row `base + r` of the scan) against
/// every query; `hit(r)` describes row `r` when it enters a heap.
pub fn score_block(
    block: &[f32],
    dim: usize,
    valid: impl Fn(usize) -> bool,
    queries: &[Vec<f32>],
    tops: &mut [Top],
    base: u64,
    hit: impl Fn(usize, f32) -> Hit,
) {
    for (r, row) in block.chunks_exact(dim).enumerate() {
        if !valid(r) {
            continue;
        }
        for (q, top) in queries.iter().zip(tops.iter_mut()) {
            let s = dot(row, q);
            // A vector of NaNs (a hostile file) scores nothing.
            if s.is_finite() && top.admits(s) {
                top.push(s, base + r as u64, || hit(r, s));
            }
        }
    }
}

/// Searches the output under `dirs` for each query (unit vectors of the
/// query model's width): the best `k` per query. The output must be the
/// query model's: its files' fingerprints (or, in files without one, its
/// rows' model ids) must match, and its embeddings be as wide.
pub fn search(
    dirs: &[PathBuf],
    target: Target,
    queries: &[Vec<f32>],
    k: usize,
    model: &QueryModel,
) -> anyhow::Result<(Vec<Vec<Hit>>, Scanned)> {
    let mut files = Vec::new();
    for d in dirs {
        anyhow::ensure!(
            d.is_dir(),
            "{}: not a directory of clipstream output",
            d.display()
        );
        files.extend(crate::catalog::parquet_files(d)?);
    }
    anyhow::ensure!(
        !files.is_empty(),
        "{}: no Parquet files to search",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Candidates beyond k, so that ids written twice still leave k.
    let keep = k.saturating_mul(4).max(k.saturating_add(32));
    let mut tops: Vec<Top> = queries.iter().map(|_| Top::new(keep)).collect();
    let mut scanned = Scanned::default();
    let mut base = 0u64;
    for path in &files {
        scan_file(
            path,
            target,
            queries,
            model,
            &mut tops,
            &mut base,
            &mut scanned,
        )?;
        scanned.files += 1;
    }
    Ok((tops.into_iter().map(|t| t.finish(k)).collect(), scanned))
}

fn scan_file(
    path: &Path,
    target: Target,
    queries: &[Vec<f32>],
    model: &QueryModel,
    tops: &mut [Top],
    base: &mut u64,
    scanned: &mut Scanned,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let columns = ["id", "image_uri", "text", "model_id", target.column()];
    let file = crate::catalog::open_output(path, &columns, Some(&columns))?;
    let fingerprint = file.fingerprint;
    // Another model's file (the image mode's suffix, `+fast`, does not
    // change what a query is compared with): refused at its first batch,
    // naming the model id its rows carry.
    let other = fingerprint.as_deref().and_then(|fp| {
        let base = fp.split('+').next().unwrap_or(fp);
        (base != model.fingerprint).then(|| short(base).to_string())
    });
    if let Some(fp) = &fingerprint {
        scanned.fingerprints.insert(fp.clone());
    }
    let mut decode = started.elapsed().as_secs_f64();
    let mut t = Instant::now();
    for batch in file.batches {
        let batch = batch.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let text = |name: &str| crate::catalog::text_column(&batch, name, path);
        let (ids, uris, texts, models) = (
            text("id")?,
            text("image_uri")?,
            text("text")?,
            text("model_id")?,
        );
        let (list, block, dim) = embeddings(&batch, target, path)?;
        anyhow::ensure!(
            dim == model.dim,
            "{}: embeddings of width {dim}, the query model's are {} wide: \
             search with the model that wrote the output",
            path.display(),
            model.dim
        );
        if let Some(theirs) = &other {
            let writer = (0..models.len())
                .find(|&i| !models.is_null(i))
                .map_or("?", |i| models.value(i));
            anyhow::bail!(
                "{} was written by another model, {writer:?} (fingerprint {theirs}), than the \
                 query's {:?} (fingerprint {}): search with the model that wrote the output",
                path.display(),
                model.id,
                short(&model.fingerprint)
            );
        }
        if fingerprint.is_none() {
            for i in 0..models.len() {
                if !models.is_null(i) && models.value(i) != model.id {
                    anyhow::bail!(
                        "{} was written by the model {:?}, the query's is {:?}: search with \
                         the model that wrote the output",
                        path.display(),
                        models.value(i),
                        model.id
                    );
                }
            }
        }
        if let Some(i) = (0..models.len()).find(|&i| !models.is_null(i)) {
            scanned.model_ids.insert(models.value(i).to_string());
        }
        decode += t.elapsed().as_secs_f64();
        t = Instant::now();
        let get = |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_string());
        let valid = |r: usize| list.is_valid(r) && !ids.is_null(r);
        let rows = (0..list.len()).filter(|&r| valid(r)).count() as u64;
        score_block(block, dim, valid, queries, tops, *base, |r, score| Hit {
            id: ids.value(r).to_string(),
            score,
            image_uri: get(uris, r),
            text: get(texts, r),
        });
        scanned.rows += rows;
        scanned.bytes += rows * (dim * 4) as u64;
        *base += list.len() as u64;
        scanned.score_secs += t.elapsed().as_secs_f64();
        t = Instant::now();
    }
    scanned.decode_secs += decode + t.elapsed().as_secs_f64();
    Ok(())
}

/// Every embedding of the `target` column under `dirs`, decoded into one
/// row-major matrix (rows without one are left out): what a search that
/// answers many queries could keep in memory. Returns the matrix and the
/// width.
pub fn decode_all(dirs: &[PathBuf], target: Target) -> anyhow::Result<(Vec<f32>, usize)> {
    let mut files = Vec::new();
    for d in dirs {
        files.extend(crate::catalog::parquet_files(d)?);
    }
    let column = [target.column()];
    // Sized once from the files' row counts: growing a vector of gigabytes
    // copies it again and again.
    let mut rows = 0u64;
    for path in &files {
        rows += crate::catalog::open_output(path, &column, Some(&column))?.rows;
    }
    let mut out: Vec<f32> = Vec::new();
    let mut width = 0;
    for path in &files {
        let file = crate::catalog::open_output(path, &column, Some(&column))?;
        for batch in file.batches {
            let batch = batch.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let (list, block, dim) = embeddings(&batch, target, path)?;
            anyhow::ensure!(
                width == 0 || width == dim,
                "{}: embeddings of width {dim} after {width}",
                path.display()
            );
            if width == 0 {
                out.reserve_exact(usize::try_from(rows).unwrap_or(0).saturating_mul(dim));
            }
            width = dim;
            for (r, row) in block.chunks_exact(dim).enumerate() {
                if list.is_valid(r) {
                    out.extend_from_slice(row);
                }
            }
        }
    }
    Ok((out, width))
}

/// The `target` embeddings of a batch of the file `path`: the column, its
/// rows' floats (row-major, the column's own slice: a batch may be a slice
/// of a larger array) and their width.
fn embeddings<'a>(
    batch: &'a arrow_array::RecordBatch,
    target: Target,
    path: &Path,
) -> anyhow::Result<(&'a FixedSizeListArray, &'a [f32], usize)> {
    let name = target.column();
    let list = batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>())
        .with_context(|| {
            format!(
                "{}: column {name:?} is not a fixed-size list",
                path.display()
            )
        })?;
    let dim = list.value_length() as usize;
    let values = list
        .values()
        .as_any()
        .downcast_ref::<Float32Array>()
        .with_context(|| format!("{}: column {name:?} does not hold floats", path.display()))?;
    let start = list.offset() * dim;
    Ok((list, &values.values()[start..start + list.len() * dim], dim))
}

fn short(fp: &str) -> &str {
    &fp[..fp.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_and_sum_agree_with_plain_loops() {
        for n in [0usize, 1, 15, 16, 17, 512, 515] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(x * y)).sum();
            assert!((f64::from(dot(&a, &b)) - want).abs() < 1e-3, "{n}");
            let want: f64 = a.iter().map(|x| f64::from(*x)).sum();
            assert!((f64::from(sum(&a)) - want).abs() < 1e-3, "{n}");
        }
    }

    #[test]
    fn the_heap_keeps_the_best_once_per_id() {
        let mut top = Top::new(4);
        let hit = |id: &str, s: f32| Hit {
            id: id.into(),
            score: s,
            image_uri: None,
            text: None,
        };
        for (p, (id, s)) in [
            ("a", 0.1),
            ("b", 0.9),
            ("a", 0.8),
            ("c", 0.5),
            ("d", 0.2),
            ("b", 0.3),
        ]
        .into_iter()
        .enumerate()
        {
            if top.admits(s) {
                top.push(s, p as u64, || hit(id, s));
            }
        }
        let got: Vec<(String, f32)> = top.finish(3).into_iter().map(|h| (h.id, h.score)).collect();
        assert_eq!(
            got,
            [("b".into(), 0.9), ("a".into(), 0.8), ("c".into(), 0.5)]
        );
    }
}
