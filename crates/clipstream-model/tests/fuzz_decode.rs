//! Hostile image bytes: the decode + preprocess entry point
//! ([`ImagePreprocessor::preprocess`]) must answer every input with pixels
//! or an [`clipstream_model::ImageError`] — never a panic, an abort, a hang
//! or an allocation beyond the limits.
//!
//! - `corpus_found_by_fuzzing_is_answered`: every file in
//!   `tests/fixtures/fuzz/` (inputs that once made a decoder panic, or the
//!   preprocessing run away) gets an answer within a time limit.
//! - `mutated_fixture_images_are_answered`: mutations of the real fixture
//!   images (bit flips, "interesting" bytes, overwritten size fields,
//!   truncation, duplicated and inserted chunks), with a fixed seed and a
//!   budget that fits CI.
//! - `fuzz_for_a_while` (ignored): the same with a random seed for
//!   `CLIPSTREAM_FUZZ_SECS` seconds (default 60); inputs that panic inside a
//!   decoder (caught by the entry point, but still a decoder bug) or take
//!   too long are written to `target/fuzz-findings/` to be added to the
//!   corpus.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clipstream_model::preprocess::decode;
use clipstream_model::{DecodeLimits, ImagePreprocessor, PreprocessorConfig};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Limits small enough that a mutated size field cannot make a test
/// allocate much (each input may still claim up to this many pixels).
fn preprocessor() -> ImagePreprocessor {
    let mut pre = ImagePreprocessor::new(PreprocessorConfig::default());
    pre.limits = DecodeLimits {
        max_bytes: 8 << 20,
        max_pixels: 4_000_000,
    };
    pre
}

/// The longest one input may take (a debug build on a slow, shared core).
const PER_INPUT: Duration = Duration::from_secs(10);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One random mutation of `input`.
fn mutate(input: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        if b.is_empty() {
            b.push(rng.next() as u8);
        }
        let at = rng.below(b.len());
        match rng.below(8) {
            0 => b[at] ^= 1 << rng.below(8),
            1 => b[at] = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE][rng.below(6)],
            2 => {
                // A 16- or 32-bit field (sizes, lengths, counts) set large.
                let v: [u8; 4] = [
                    [0xFF; 4],
                    [0x7F, 0xFF, 0xFF, 0xFF],
                    [0, 0, 0xFF, 0xFF],
                    [0, 1, 0, 0],
                ][rng.below(4)];
                for (i, x) in v.iter().enumerate().take(2 + 2 * rng.below(2)) {
                    if let Some(slot) = b.get_mut(at + i) {
                        *slot = *x;
                    }
                }
            }
            3 => b.truncate(at.max(1)),
            4 => {
                let len = rng.below(64).min(b.len() - at);
                let chunk = b[at..at + len].to_vec();
                let to = rng.below(b.len());
                b.splice(to..to, chunk);
            }
            5 => {
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                b.splice(at..at, bytes);
            }
            6 => {
                let len = rng.below(32).min(b.len() - at);
                b.drain(at..at + len);
            }
            _ => {
                // Early header bytes are where the sizes live.
                let at = rng.below(b.len().min(64));
                b[at] = rng.next() as u8;
            }
        }
    }
    b
}

/// Small fixture images (fast to decode many times), every format.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let dir = fixtures().join("images");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixture images")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let bytes = std::fs::read(&path).expect("read");
        if bytes.len() <= 64 << 10 {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            out.push((name.unwrap_or_default(), bytes));
        }
    }
    assert!(out.len() >= 20, "too few seed images in {}", dir.display());
    out
}

/// What one input did.
enum Answer {
    Pixels,
    Error,
    /// The decoder or the preprocessing panicked (the entry point turns
    /// this into an error; the fuzzer reports it as a finding).
    Panicked(String),
}

/// Runs the entry point on `bytes`, and the inner steps without the panic
/// guard to see whether a decoder panicked.
fn answer(pre: &ImagePreprocessor, bytes: &[u8]) -> (Answer, Duration) {
    let started = Instant::now();
    let public = pre.preprocess(bytes);
    let took = started.elapsed();
    let inner = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let d = decode::decode(bytes, &pre.limits, pre.apply_exif_orientation)?;
        let mut out = vec![0f32; pre.pixels_len()];
        pre.pixel_values_into(&d.rgb, &mut out)
    }));
    let a = match (public, inner) {
        (_, Err(p)) => Answer::Panicked(decode::panic_message(p.as_ref())),
        (Ok(_), _) => Answer::Pixels,
        (Err(_), _) => Answer::Error,
    };
    (a, took)
}

#[test]
fn corpus_found_by_fuzzing_is_answered() {
    let pre = preprocessor();
    let dir = fixtures().join("fuzz");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("tests/fixtures/fuzz") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|x| x == "md") {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read");
        let started = Instant::now();
        // The entry point answers: pixels or an error, no panic escapes,
        // no abort, within the time limit.
        let r = pre.preprocess(&bytes);
        assert!(
            started.elapsed() < PER_INPUT,
            "{} took {:?}",
            path.display(),
            started.elapsed()
        );
        if let Err(e) = r {
            assert!(!e.to_string().is_empty());
        }
        n += 1;
    }
    assert!(n > 0, "the corpus in {} is empty", dir.display());
}

fn fuzz(seed: u64, budget: Budget) -> Vec<(String, Vec<u8>, String)> {
    let pre = preprocessor();
    let seeds = seeds();
    let mut rng = Rng(seed | 1);
    let mut findings = Vec::new();
    let (mut pixels, mut errors, mut inputs) = (0usize, 0usize, 0usize);
    let started = Instant::now();
    while budget.more(inputs, started) {
        let (name, seed_bytes) = &seeds[rng.below(seeds.len())];
        let bytes = mutate(seed_bytes, &mut rng);
        inputs += 1;
        let (a, took) = answer(&pre, &bytes);
        match a {
            Answer::Pixels => pixels += 1,
            Answer::Error => errors += 1,
            Answer::Panicked(why) => findings.push((name.clone(), bytes.clone(), why)),
        }
        if took >= PER_INPUT {
            findings.push((name.clone(), bytes, format!("took {took:?}")));
        }
    }
    eprintln!(
        "fuzz: {inputs} inputs in {:.1}s: {pixels} decoded, {errors} errors, {} findings",
        started.elapsed().as_secs_f64(),
        findings.len()
    );
    findings
}

enum Budget {
    Inputs(usize),
    Time(Duration),
}

impl Budget {
    fn more(&self, inputs: usize, started: Instant) -> bool {
        match self {
            Budget::Inputs(n) => inputs < *n,
            Budget::Time(t) => started.elapsed() < *t,
        }
    }
}

#[test]
fn mutated_fixture_images_are_answered() {
    let findings = fuzz(0x5eed_c11b, Budget::Inputs(1500));
    let summary: Vec<String> = findings
        .iter()
        .map(|(seed, bytes, why)| format!("{seed} ({} bytes): {why}", bytes.len()))
        .collect();
    assert!(
        summary.is_empty(),
        "decoders panicked or ran away:\n{}",
        summary.join("\n")
    );
}

#[test]
#[ignore = "fuzzing: runs for CLIPSTREAM_FUZZ_SECS (default 60) and writes findings"]
fn fuzz_for_a_while() {
    let secs: u64 = std::env::var("CLIPSTREAM_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    eprintln!("fuzz seed {seed}");
    let findings = fuzz(seed, Budget::Time(Duration::from_secs(secs)));
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-findings");
    std::fs::create_dir_all(&out).expect("findings dir");
    for (i, (name, bytes, why)) in findings.iter().enumerate() {
        let path = out.join(format!("{seed}-{i}-{name}"));
        std::fs::write(&path, bytes).expect("write finding");
        eprintln!("finding: {} ({why})", path.display());
    }
}
