//! What the benchmarks share: their arguments, CPU time, timing parts in
//! turn, and the generated images.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use crate::args::{ImageArgs, ModelArgs};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub images: ImageArgs,
    /// Directory of images to use. If it holds no images, 64 synthetic
    /// 640x480 JPEGs are written there first.
    #[arg(long, value_name = "DIR", default_value = ".cache/bench-images")]
    pub image_dir: PathBuf,
    /// Batch size for the sessions.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub batch_size: usize,
    /// Seconds to spend on each measurement (after one warm-up batch).
    #[arg(long, default_value_t = 5.0, value_name = "S", value_parser = crate::args::positive_seconds)]
    pub seconds: f64,
    /// Only measure these parts (repeatable): preprocess, vision, text,
    /// embed, pipeline.
    #[arg(long = "only", value_name = "PART")]
    pub only: Vec<String>,
    /// Records for the `pipeline` part (`clipstream run` on the images,
    /// round robin, with the same batch size).
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub pipeline_records: usize,
    /// When both `vision` and `pipeline` are measured, take them in turn
    /// this many times and report medians and the median of each round's
    /// ratio (a shared machine's speed drifts between two measurements).
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Print the host CPU cost per record instead: the decode floor, exact
    /// and fast preprocessing (timed item by item in turn, so their ratios
    /// hold on a machine whose speed drifts), the scalar resize before, the
    /// local job on a catalog-like corpus, and the Python peers with
    /// `--python`.
    #[arg(long)]
    pub host_cost: bool,
    /// The `--host-cost` corpus: 640x480 and 1600x1200 JPEGs and a few PNGs,
    /// written there first if missing.
    #[arg(long, value_name = "DIR", default_value = ".cache/bench-corpus")]
    pub corpus: PathBuf,
    /// Records for the `--host-cost` local job.
    #[arg(long, default_value_t = 2000, value_name = "N")]
    pub host_cost_records: usize,
    /// A Python with Pillow and transformers (and torchvision for the fast
    /// processor): `--host-cost` then times transformers' preprocessing and
    /// Pillow's decode on the same files (scripts/bench_hf_preprocess.py,
    /// run from the checkout).
    #[arg(long, value_name = "PATH", env = "CLIPSTREAM_BENCH_PYTHON")]
    pub python: Option<PathBuf>,
    /// Time `clipstream plan` and `clipstream snapshot` on a catalog of N
    /// products (5% changed, 1% removed) against a previous snapshot of N
    /// rows of 512-d embeddings, beside copying that snapshot's files.
    #[arg(long, value_name = "N")]
    pub nightly: Option<usize>,
    /// Where `--nightly` writes its data (removed afterwards unless
    /// --keep-nightly; about 4.5 GB per million rows at the peak).
    #[arg(long, value_name = "DIR", default_value = ".cache/bench-nightly")]
    pub nightly_dir: PathBuf,
    /// Keep `--nightly`'s data.
    #[arg(long)]
    pub keep_nightly: bool,
    /// Time an exact `clipstream search` over N rows of 512-d embeddings:
    /// Parquet decoding, a plain read of the decoded floats, and the scan,
    /// side by side (the data goes under --nightly-dir).
    #[arg(long, value_name = "N")]
    pub search: Option<usize>,
    /// Compare the embeddings topic's two message formats (json, f32le):
    /// bytes and CPU per message, side by side (--model is not loaded).
    #[arg(long)]
    pub messages: bool,
}

/// CPU seconds (user + system) used so far by `who` (`RUSAGE_SELF`,
/// `RUSAGE_CHILDREN`, ...), and its peak RSS in KiB.
#[allow(unsafe_code)]
pub(super) fn usage(who: libc::c_int) -> (f64, i64) {
    // SAFETY: getrusage writes one `rusage` into the zeroed value we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return (f64::NAN, 0);
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (t(ru.ru_utime) + t(ru.ru_stime), ru.ru_maxrss)
}

pub(super) const COLOURS: [&str; 6] = ["red", "green", "blue", "yellow", "purple", "orange"];

pub(super) const SHAPES: [&str; 4] = ["circle", "square", "triangle", "star"];

pub(super) fn list_images(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        matches!(
                            e.to_ascii_lowercase().as_str(),
                            "jpg" | "jpeg" | "png" | "webp"
                        )
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// A xorshift64 generator (deterministic corpora and orders, no
/// dependency).
pub(super) fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// One part's figures: items per second of its own time, CPU-ms per item,
/// items.
pub(super) type Part = (f64, f64, usize);

/// Runs `steps` on this thread item by item in turn, one call (one item,
/// given its number) of each per round in an order shuffled every round,
/// until `seconds` times the number of steps have passed (after one
/// warm-up call each), and returns each step's [`Part`]. Taken in turn, a
/// drift in the machine's speed (a shared machine's drifts by 15-25% from
/// one measurement to the next) slows every step alike, so their ratios
/// hold where figures taken one after the other do not; shuffled, no step
/// mostly runs after the same other one (whose caches it would inherit).
/// Each call is timed by this thread's CPU clock and the wall clock.
pub(super) fn interleaved<const K: usize>(
    seconds: f64,
    steps: &mut [&mut dyn FnMut(usize) -> anyhow::Result<()>; K],
) -> anyhow::Result<[Part; K]> {
    let thread_cpu = || {
        clipstream_model::cpu::thread_time()
            .context("this system cannot read a thread's CPU clock (CLOCK_THREAD_CPUTIME_ID)")
    };
    thread_cpu()?;
    for step in steps.iter_mut() {
        step(0)?;
    }
    let budget = Duration::from_secs_f64(seconds * K as f64);
    let (mut wall, mut cpu, mut n) = ([Duration::ZERO; K], [Duration::ZERO; K], [0usize; K]);
    let mut rand = xorshift(0x2545_F491_4F6C_DD1D);
    let mut order: [usize; K] = std::array::from_fn(|k| k);
    let started = Instant::now();
    // At least one round, however short the budget.
    while n[0] == 0 || started.elapsed() < budget {
        for j in (1..K).rev() {
            order.swap(j, (rand() % (j as u64 + 1)) as usize);
        }
        for k in order {
            let (t, c) = (Instant::now(), thread_cpu()?);
            steps[k](n[k] + 1)?;
            cpu[k] += thread_cpu()?.saturating_sub(c);
            wall[k] += t.elapsed();
            n[k] += 1;
        }
    }
    Ok(std::array::from_fn(|k| {
        let items = n[k] as f64;
        (
            items / wall[k].as_secs_f64().max(1e-9),
            1000.0 * cpu[k].as_secs_f64() / items,
            n[k],
        )
    }))
}
