//! Kafka + S3 streaming, end to end through the binary, against a real
//! Kafka-protocol broker (tansu) and a real S3 server (s3s-fs) that the
//! project's scripts install: workers in one consumer group, bad input of
//! every kind, outputs read back by independent readers, committed offsets
//! checked; then workers killed at random moments and restarted.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::stack::{self, Msg, Proc, Stack};
use support::{Input, build_input, model, read_parquet, scratch};

const TOPIC: &str = "events";
const PARTITIONS: i32 = 4;
const GROUP: &str = "workers";

/// The events of `input` as Kafka messages (key = id) with images moved to
/// S3, and the expected dead-letter kind by key.
struct Events {
    messages: Vec<(String, Vec<u8>)>,
    bad: BTreeMap<String, &'static str>,
    images: HashMap<String, PathBuf>,
}

fn to_kafka(input: &Input, s3_dir: &Path) -> Events {
    let text = std::fs::read(&input.manifest).expect("manifest");
    let mut messages = Vec::new();
    let mut bad = BTreeMap::new();
    for (i, line) in text.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let id = format!("rec-{i:05}");
        let mut kind = input.bad.get(&(i as i64)).copied();
        let mut value = line.to_vec();
        if let Ok(mut ev) = serde_json::from_slice::<Value>(line)
            && let Some(img) = ev["image"].as_str().map(String::from)
        {
            let uri = if img.starts_with("http://") {
                img
            } else if kind == Some("object_not_found") {
                if i % 20 < 10 {
                    kind = Some("bucket_not_allowed");
                    "s3://private/secret.png".to_string()
                } else {
                    "s3://images/does-not-exist.png".to_string()
                }
            } else {
                let path = Path::new(&img);
                let name = path.file_name().expect("name").to_string_lossy();
                let dest = s3_dir.join("images").join(&*name);
                if !dest.exists() {
                    std::fs::copy(path, &dest).expect("copy image to S3");
                }
                format!("s3://images/{name}")
            };
            ev["image"] = Value::String(uri);
            value = ev.to_string().into_bytes();
        }
        if let Some(k) = kind {
            bad.insert(id.clone(), k);
        }
        messages.push((id, value));
    }
    Events {
        messages,
        bad,
        images: input.images.clone(),
    }
}

fn pipeline(dir: &Path, stack: &Stack, name: &str) -> PathBuf {
    let text = format!(
        r#"
{model}
[source]
kind = "kafka"
brokers = "{brokers}"
topics = ["{TOPIC}"]
group_id = "{GROUP}"
commit_interval_ms = 300
session_timeout_ms = 6000
drain_deadline_ms = 4000
max_event_bytes = 4096

[s3]
endpoint = "{endpoint}"
force_path_style = true
request_timeout_ms = 2000
backoff_ms = 20

[fetch]
allowed_schemes = ["s3"]
allowed_buckets = ["images"]
max_object_bytes = 300000

[engine]
max_in_flight = 64
vision_batch = {{ max_size = 16, max_wait_ms = 10 }}
text_batch = {{ max_size = 32, max_wait_ms = 10 }}

[sink.parquet]
url = "s3://output/embeddings/"
spool_dir = "{spool}"
max_rows_per_file = 150
row_group_rows = 64

[sink.kafka]
embeddings_topic = "embeddings"
labels_topic = "labels"

[dead_letter]
topic = "dead-letters"

[shutdown]
drain_deadline_secs = 8
"#,
        model = support::model_section(),
        brokers = stack.brokers(),
        endpoint = stack.s3_endpoint(),
        spool = dir.join(format!("spool-{name}")).display(),
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).expect("pipeline");
    p
}

fn worker(dir: &Path, pipeline: &Path, name: &str) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .expect("log");
    Proc(
        Command::new(support::bin())
            .args(["run", "--no-progress"])
            .arg(pipeline)
            .env("AWS_ACCESS_KEY_ID", stack::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", stack::SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("CLIPSTREAM_LOG", "clipstream_pipeline=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("worker starts"),
    )
}

fn signal(p: &Proc, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &p.0.id().to_string()])
        .status();
}

/// Stops a worker with SIGTERM; returns its exit code.
fn terminate(mut p: Proc) -> Option<i32> {
    signal(&p, "-TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = p.0.try_wait() {
            return status.code();
        }
        assert!(
            Instant::now() < deadline,
            "worker did not stop within 20 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ids(msgs: &[Msg]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for x in msgs {
        *m.entry(x.key.clone().unwrap_or_default()).or_default() += 1;
    }
    m
}

/// Waits until the group has committed every partition to its end.
fn wait_committed(stack: &Stack, ends: &HashMap<i32, i64>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let c = stack::committed(&stack.brokers(), GROUP, TOPIC, PARTITIONS);
        if ends.iter().all(|(p, end)| c.get(p) == Some(end)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "committed offsets {c:?} did not reach the ends {ends:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

struct Outcome {
    parquet: Vec<Value>,
    embeddings: Vec<Msg>,
    labels: Vec<Msg>,
    dead: Vec<Msg>,
}

/// Reads every output back and checks: each good id exactly once in
/// Parquet, at least once on the topics (`max_dup` more at most), each bad
/// id once on the dead-letter topic with its kind.
fn check(stack: &Stack, input: &Input, ev: &Events, max_dup: usize) -> Outcome {
    let brokers = stack.brokers();
    let good: Vec<&String> = input.good.keys().collect();
    let with_image = input.good.values().filter(|(i, _)| *i).count();
    let wait = Duration::from_secs(60);
    let embeddings = stack::read_topic(&brokers, "embeddings", PARTITIONS, wait, |m| {
        ids(m).len() >= good.len()
    });
    let labels = stack::read_topic(&brokers, "labels", PARTITIONS, wait, |m| {
        ids(m).len() >= with_image
    });
    let dead = stack::read_topic(&brokers, "dead-letters", 1, wait, |m| {
        ids(m).len() >= ev.bad.len()
    });
    // Parquet objects, read straight from the S3 server's disk by pyarrow.
    let parquet = read_parquet(&stack.s3_dir.join("output/embeddings"));
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &parquet {
        *seen
            .entry(r["id"].as_str().expect("id").into())
            .or_default() += 1;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "ids twice in Parquet: {dups:?}");
    for id in &good {
        assert_eq!(seen.get(*id), Some(&1), "{id} missing from Parquet");
    }
    assert_eq!(seen.len(), good.len(), "unexpected ids in Parquet");

    for (name, msgs, expected) in [
        ("embeddings", &embeddings, good.len()),
        ("labels", &labels, with_image),
    ] {
        let got = ids(msgs);
        let missing = input
            .good
            .iter()
            .filter(|(id, (img, _))| (name == "embeddings" || *img) && !got.contains_key(*id))
            .count();
        assert_eq!(missing, 0, "{missing} good ids missing from {name}");
        assert_eq!(got.len(), expected, "{name}: unexpected ids");
        assert!(
            msgs.len() <= expected + max_dup,
            "{name}: {} duplicates, more than the {max_dup} allowed",
            msgs.len() - expected
        );
    }
    let got = ids(&dead);
    for (id, kind) in &ev.bad {
        let n = got.get(id).copied().unwrap_or(0);
        assert!(
            n == 1 || (max_dup > 0 && n > 1),
            "{id} ({kind}) is {n} times on the dead-letter topic"
        );
    }
    assert_eq!(got.len(), ev.bad.len(), "dead letters for good ids?");
    assert!(
        dead.len() <= ev.bad.len() + max_dup,
        "too many duplicate dead letters"
    );
    for d in &dead {
        let id = d.key.as_deref().unwrap_or_default();
        assert_eq!(
            d.headers.get("clipstream.kind").map(String::as_str),
            Some(ev.bad[id]),
            "{id}: {:?}",
            d.headers
        );
        assert!(!d.headers["clipstream.reason"].is_empty());
        assert_eq!(d.headers["clipstream.source.topic"], TOPIC);
        let original = &ev.messages.iter().find(|(k, _)| k == id).expect("sent").1;
        assert_eq!(&d.value, original, "{id}: the original bytes");
    }
    Outcome {
        parquet,
        embeddings,
        labels,
        dead,
    }
}

fn ends(delivered: &[(i32, i64)]) -> HashMap<i32, i64> {
    let mut ends = HashMap::new();
    for (p, o) in delivered {
        let e = ends.entry(*p).or_insert(0);
        *e = (*e).max(o + 1);
    }
    ends
}

/// A scratch directory, the servers with the input topic (4 partitions),
/// the output topics and the buckets (`private` is not on the allow-list),
/// and `n` events with their images in S3.
fn setup(name: &str, n: usize, seed: u64) -> (PathBuf, Stack, Input, Events) {
    let dir = scratch(name);
    let stack = Stack::start(
        &dir,
        &[
            (TOPIC, PARTITIONS as u32),
            ("embeddings", 4),
            ("labels", 4),
            ("dead-letters", 1),
        ],
        &["images", "output", "private"],
    );
    let input = build_input(&dir, n, seed);
    let ev = to_kafka(&input, &stack.s3_dir);
    (dir, stack, input, ev)
}

#[test]
fn two_workers_in_a_group_write_everything_once() {
    let (dir, stack, input, ev) = setup("stream-two", 3000, 11);
    let delivered = stack::produce(&stack.brokers(), TOPIC, &ev.messages);
    let ends = ends(&delivered);
    assert_eq!(ends.len(), 4, "every partition has events");

    let p = pipeline(&dir, &stack, "w");
    let a = worker(&dir, &p, "a");
    let b = worker(&dir, &p, "b");
    wait_committed(&stack, &ends, Duration::from_secs(240));
    assert_eq!(terminate(a), Some(0), "worker a exits cleanly");
    assert_eq!(terminate(b), Some(0), "worker b exits cleanly");

    let out = check(&stack, &input, &ev, 0);
    // Both workers took part.
    let logs = ["a", "b"]
        .map(|n| std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default());
    for (n, l) in ["a", "b"].iter().zip(&logs) {
        assert!(
            l.contains("partitions assigned"),
            "worker {n} got no partitions:\n{l}"
        );
    }
    // Image embeddings equal `clipstream embed` on the same files.
    let sample: Vec<&String> = ev.images.keys().take(12).collect();
    let mut args = vec![
        "embed".to_string(),
        "--model".into(),
        model().display().to_string(),
    ];
    for id in &sample {
        args.push("--image".into());
        args.push(ev.images[*id].display().to_string());
    }
    let emb = support::clipstream(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        emb.status.success(),
        "{}",
        String::from_utf8_lossy(&emb.stderr)
    );
    let reference: Vec<Vec<f32>> = String::from_utf8_lossy(&emb.stdout)
        .lines()
        .map(|l| support::floats(&serde_json::from_str::<Value>(l).expect("json")["embedding"]))
        .collect();
    for (id, want) in sample.iter().zip(&reference) {
        let m = out
            .embeddings
            .iter()
            .find(|m| m.key.as_deref() == Some(id.as_str()))
            .expect("on the topic");
        let v: Value = serde_json::from_slice(&m.value).expect("json");
        let got = support::floats(&v["image_embedding"]);
        let worst = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "{id}: embedding differs by {worst}");
        assert!(
            v["image_etag"].as_str().is_some_and(|e| !e.is_empty()),
            "ETag in {v}"
        );
    }
    let row = &out.parquet[0];
    assert!(row["source"] == TOPIC && row["offset"].as_i64().is_some());
    eprintln!(
        "parquet rows {}, embeddings {}, labels {}, dead letters {}",
        out.parquet.len(),
        out.embeddings.len(),
        out.labels.len(),
        out.dead.len()
    );
}

#[test]
fn sigkill_at_random_moments_loses_nothing_and_parquet_stays_exactly_once() {
    let (dir, stack, input, ev) = setup("stream-kill", 2000, 23);
    let p = pipeline(&dir, &stack, "w");
    let a = worker(&dir, &p, "a");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("random seed {seed}");
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Five waves of events; worker b is killed at a random moment of each.
    let mut delivered = Vec::new();
    for wave in ev.messages.chunks(ev.messages.len().div_ceil(5)) {
        delivered.extend(stack::produce(&stack.brokers(), TOPIC, wave));
        let b = worker(&dir, &p, "b");
        std::thread::sleep(Duration::from_millis(1500 + next() % 4000));
        signal(&b, "-KILL");
        drop(b);
    }
    let b = worker(&dir, &p, "b");
    wait_committed(&stack, &ends(&delivered), Duration::from_secs(300));
    assert_eq!(terminate(a), Some(0));
    assert_eq!(terminate(b), Some(0));
    // Duplicates on the topics are bounded by what was in flight when a
    // worker died: at most max_in_flight (64) records per kill, plus the
    // records of partitions moved while their worker was busy.
    let out = check(&stack, &input, &ev, 5 * 64 * 2);
    eprintln!(
        "after 5 kills: parquet rows {} (each id once), embeddings {} for {} ids, labels {} for {} ids, dead letters {}",
        out.parquet.len(),
        out.embeddings.len(),
        input.good.len(),
        out.labels.len(),
        input.good.values().filter(|(i, _)| *i).count(),
        out.dead.len()
    );
}
