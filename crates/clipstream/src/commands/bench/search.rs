//! `clipstream bench --search N`: an exact search over N rows of 512-d
//! embeddings, and what bounds it.
//!
//! Writes N rows as clipstream output (Parquet, zstd, files of 100,000
//! rows), then measures side by side: the whole `search` from the files
//! (reading and decoding Parquet, then scoring), the decoding alone into
//! one matrix in memory, a plain read of that matrix (a sum of every
//! value: the memory's speed), and the scan of the matrix for 1 and 8
//! queries (dot products and a top-10 heap). The scan's bytes per second
//! over the plain read's is the figure that says whether scoring runs at
//! memory speed.

use std::time::Instant;

use clipstream_model::ModelDir;
use clipstream_pipeline::search::{self, QueryModel, Target, Top};

use super::common::BenchArgs;

const DIM: usize = 512;

/// The best of `runs` timings of `f`, in seconds.
fn best(runs: usize, mut f: impl FnMut() -> f32) -> (f64, f32) {
    let mut t_best = f64::INFINITY;
    let mut keep = 0.0;
    for _ in 0..runs {
        let t = Instant::now();
        keep += std::hint::black_box(f());
        t_best = t_best.min(t.elapsed().as_secs_f64());
    }
    (t_best, keep)
}

fn query(salt: u64) -> Vec<f32> {
    let mut v: Vec<f32> = (0..DIM)
        .map(|d| {
            let x = (d as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt;
            ((x >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

pub fn run(args: &BenchArgs, n: usize) -> anyhow::Result<()> {
    let root = args.nightly_dir.join("search");
    let _ = std::fs::remove_dir_all(&root);
    let fingerprint = ModelDir::open(&args.model.model)?.fingerprint(&args.model.variant)?;
    eprintln!("writing {n} rows of {DIM}-d embeddings ...");
    let out = root.join("output");
    super::nightly::write_rows(
        &out,
        &fingerprint,
        (0..n).map(|k| super::nightly::row(k, "col:v1", &format!("product number {k}"), 1)),
    )?;
    let on_disk: u64 = clipstream_pipeline::catalog::parquet_files(&out)?
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let model = QueryModel {
        id: "bench".into(),
        fingerprint,
        dim: DIM,
    };
    let dirs = [out.clone()];

    // 1. The command's path: Parquet → scores, one query.
    let t = Instant::now();
    let (hits, scanned) = search::search(&dirs, Target::Image, &[query(1)], 10, &model)?;
    let whole = t.elapsed().as_secs_f64();
    anyhow::ensure!(hits[0].len() == 10, "the search found {}", hits[0].len());

    // 2. Decoding alone, into memory.
    let t = Instant::now();
    let (matrix, dim) = search::decode_all(&dirs, Target::Image)?;
    let decode = t.elapsed().as_secs_f64();
    let bytes = (matrix.len() * 4) as f64;
    anyhow::ensure!(
        dim == DIM && matrix.len() == n * DIM,
        "decoded {} values",
        matrix.len()
    );

    // 3. A plain read of the same bytes, and 4. the scan, side by side.
    let (read, _) = best(5, || search::sum(&matrix));
    let scan = |q: &[Vec<f32>]| {
        best(5, || {
            let mut tops: Vec<Top> = q.iter().map(|_| Top::new(10)).collect();
            search::score_block(
                &matrix,
                dim,
                |_| true,
                q,
                &mut tops,
                0,
                |r, s| search::Hit {
                    id: r.to_string(),
                    score: s,
                    image_uri: None,
                    text: None,
                },
            );
            tops.into_iter().map(|t| t.finish(1)[0].score).sum()
        })
    };
    let one = [query(1)];
    let eight: Vec<Vec<f32>> = (1..=8).map(query).collect();
    let (scan1, _) = scan(&one);
    let (scan8, _) = scan(&eight);
    let gbs = |secs: f64| bytes / secs / 1e9;

    println!(
        "search over {n} rows of {DIM}-d image embeddings ({:.2} GB as floats; {:.2} GB of Parquet with the rest of the rows, zstd)",
        bytes / 1e9,
        on_disk as f64 / 1e9
    );
    println!(
        "  clipstream search (Parquet -> top 10), 1 query   {:>8.3} s   (reading and decoding {:.3} s, scoring {:.3} s)",
        whole, scanned.decode_secs, scanned.score_secs
    );
    println!(
        "  decoding into one matrix in memory (a cache)     {:>8.3} s   {:>6.2} GB/s of floats",
        decode,
        gbs(decode)
    );
    println!(
        "  plain read of the decoded floats (a sum)         {:>8.3} s   {:>6.2} GB/s",
        read,
        gbs(read)
    );
    println!(
        "  scan of the decoded floats, 1 query (top 10)     {:>8.3} s   {:>6.2} GB/s   = {:.2} x the plain read",
        scan1,
        gbs(scan1),
        read / scan1
    );
    println!(
        "  scan of the decoded floats, 8 queries            {:>8.3} s   {:>6.2} GB/s   ({:.3} s per query)",
        scan8,
        gbs(scan8),
        scan8 / 8.0
    );
    if !args.keep_nightly {
        let _ = std::fs::remove_dir_all(&root);
    }
    Ok(())
}
