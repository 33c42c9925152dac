//! Helpers of the streaming tests: the topics and buckets every test uses,
//! events of a generated input as Kafka messages, the test pipeline (built
//! from the config types, edited through them), workers as child processes,
//! and the checks that read every output back.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clipstream_pipeline::config::PipelineConfig;
use serde_json::Value;

use super::stack::{self, Msg, Proc, Stack};
use super::{Input, build_input, read_parquet, scratch, write_pipeline};

pub const TOPIC: &str = "events";
pub const PARTITIONS: i32 = 4;
pub const GROUP: &str = "workers";

/// The events of `input` as Kafka messages (key = id) with images moved to
/// S3, and the expected dead-letter kind by key.
pub struct Events {
    pub messages: Vec<(String, Vec<u8>)>,
    pub bad: BTreeMap<String, &'static str>,
    pub images: HashMap<String, PathBuf>,
}

pub fn to_kafka(input: &Input, s3_dir: &Path) -> Events {
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

/// One test's servers and workers at a time: the tests time drains and
/// outages, which two cores shared by several tests would blur.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn worker(dir: &Path, pipeline: &Path, name: &str) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .expect("log");
    Proc(
        Command::new(super::bin())
            .args(["run", "--no-progress"])
            .arg(pipeline)
            .env("AWS_ACCESS_KEY_ID", stack::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", stack::SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env(
                "CLIPSTREAM_LOG",
                std::env::var("CLIPSTREAM_TEST_WORKER_LOG")
                    .unwrap_or_else(|_| "clipstream_pipeline=info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("worker starts"),
    )
}

pub fn signal(p: &Proc, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &p.0.id().to_string()])
        .status();
}

/// Stops a worker with SIGTERM; returns its exit code.
pub fn terminate(mut p: Proc) -> Option<i32> {
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

pub fn ids(msgs: &[Msg]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for x in msgs {
        *m.entry(x.key.clone().unwrap_or_default()).or_default() += 1;
    }
    m
}

/// Polls the group's committed offsets every `every` until `done` holds;
/// fails with `what` and the offsets after `timeout`.
pub fn poll_committed(
    brokers: &str,
    timeout: Duration,
    every: Duration,
    what: &str,
    done: impl Fn(&HashMap<i32, i64>) -> bool,
) -> HashMap<i32, i64> {
    let deadline = Instant::now() + timeout;
    loop {
        let c = stack::committed(brokers, GROUP, TOPIC, PARTITIONS);
        if done(&c) {
            return c;
        }
        assert!(Instant::now() < deadline, "{what}: committed {c:?}");
        std::thread::sleep(every);
    }
}

/// Waits until the group has committed every partition to its end.
pub fn wait_committed(brokers: &str, ends: &HashMap<i32, i64>, timeout: Duration) {
    poll_committed(
        brokers,
        timeout,
        Duration::from_millis(500),
        &format!("the ends {ends:?} not reached"),
        |c| ends.iter().all(|(p, end)| c.get(p) == Some(end)),
    );
}

pub struct Outcome {
    pub parquet: Vec<Value>,
    pub embeddings: Vec<Msg>,
    pub labels: Vec<Msg>,
    pub dead: Vec<Msg>,
}

/// Reads every output back and checks: each good id exactly once in
/// Parquet, at least once on the topics (`max_dup` more at most), each bad
/// id once on the dead-letter topic with its kind.
pub fn check(brokers: &str, s3_dir: &Path, input: &Input, ev: &Events, max_dup: usize) -> Outcome {
    let good: Vec<&String> = input.good.keys().collect();
    let with_image = input.good.values().filter(|(i, _)| *i).count();
    let wait = Duration::from_secs(60);
    let embeddings = stack::read_topic(brokers, "embeddings", PARTITIONS, wait, |m| {
        ids(m).len() >= good.len()
    });
    let labels = stack::read_topic(brokers, "labels", PARTITIONS, wait, |m| {
        ids(m).len() >= with_image
    });
    let dead = stack::read_topic(brokers, "dead-letters", 1, wait, |m| {
        ids(m).len() >= ev.bad.len()
    });
    // Parquet objects, read straight from the S3 server's disk by pyarrow.
    let parquet = read_parquet(&s3_dir.join("output/embeddings"));
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
    let unexpected: Vec<&String> = seen
        .keys()
        .filter(|id| !input.good.contains_key(*id))
        .collect();
    assert!(
        unexpected.is_empty(),
        "unexpected ids in Parquet: {unexpected:?}"
    );

    for (name, msgs, expected) in [
        ("embeddings", &embeddings, good.len()),
        ("labels", &labels, with_image),
    ] {
        let got = ids(msgs);
        let missing: Vec<&String> = input
            .good
            .iter()
            .filter(|(id, (img, _))| (name == "embeddings" || *img) && !got.contains_key(*id))
            .map(|(id, _)| id)
            .collect();
        assert!(
            missing.is_empty(),
            "{} good ids missing from {name}: {missing:?}",
            missing.len()
        );
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
        if d.headers
            .get("clipstream.original.truncated")
            .map(String::as_str)
            == Some("true")
        {
            // Cut to fit the topic: a prefix, with the whole one's size.
            assert!(
                original.starts_with(&d.value),
                "{id}: a prefix of the original"
            );
            assert_eq!(
                d.headers["clipstream.original.bytes"],
                original.len().to_string(),
                "{id}: the original's size"
            );
        } else {
            assert_eq!(&d.value, original, "{id}: the original bytes");
        }
    }
    Outcome {
        parquet,
        embeddings,
        labels,
        dead,
    }
}

pub fn ends(delivered: &[(i32, i64)]) -> HashMap<i32, i64> {
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
pub fn setup(name: &str, n: usize, seed: u64) -> (PathBuf, Stack, Input, Events) {
    setup_with(name, n, seed, Stack::start)
}

/// The input and output topics of every streaming test.
pub const TOPICS: [(&str, u32); 5] = [
    (TOPIC, PARTITIONS as u32),
    ("embeddings", 4),
    ("labels", 4),
    ("review", 2),
    ("dead-letters", 1),
];
/// The buckets: `private` is not on the allow-list.
pub const BUCKETS: [&str; 3] = ["images", "output", "private"];

/// How a test's servers start: `Stack::start`, or `Stack::start_tls` for
/// Kafka over TLS.
pub type StartStack = fn(&Path, &[(&str, u32)], &[&str]) -> Stack;

/// `setup`, with the servers started by `start`.
pub fn setup_with(
    name: &str,
    n: usize,
    seed: u64,
    start: StartStack,
) -> (PathBuf, Stack, Input, Events) {
    let dir = scratch(name);
    let stack = start(&dir, &TOPICS, &BUCKETS);
    let input = build_input(&dir, n, seed);
    let ev = to_kafka(&input, &stack.s3_dir);
    (dir, stack, input, ev)
}

/// How many times a worker's log says it was given partitions.
pub fn assignments(dir: &Path, name: &str) -> usize {
    std::fs::read_to_string(dir.join(format!("{name}.log")))
        .unwrap_or_default()
        .matches("partitions assigned")
        .count()
}

/// Waits until the group has committed at least `share` of `total` records.
pub fn wait_progress(brokers: &str, total: i64, share: f64) {
    poll_committed(
        brokers,
        Duration::from_secs(120),
        Duration::from_millis(100),
        "no progress",
        |c| c.values().sum::<i64>() as f64 >= total as f64 * share,
    );
}

/// What a worker looked like while it ran: its peak resident memory and
/// whether its Kafka source paused for backpressure.
#[derive(Debug, Default)]
pub struct Watched {
    pub peak_rss_mib: f64,
    pub paused_seen: bool,
    pub pauses: f64,
}

/// Samples `p`'s resident memory (every 100 ms) and its `/metrics` at `addr`
/// (every 500 ms) until `done` holds, at most `max`.
pub fn watch(p: &Proc, addr: &str, max: Duration, done: impl Fn() -> bool) -> Watched {
    let status = format!("/proc/{}/status", p.0.id());
    let mut w = Watched::default();
    let started = Instant::now();
    let mut last_scrape = Instant::now() - Duration::from_secs(1);
    while started.elapsed() < max {
        if let Some(kib) = std::fs::read_to_string(&status).ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        }) {
            w.peak_rss_mib = w.peak_rss_mib.max(kib / 1024.0);
        }
        if last_scrape.elapsed() >= Duration::from_millis(500) {
            last_scrape = Instant::now();
            if std::net::TcpStream::connect(addr).is_ok() {
                let (_, text) = super::http_get(addr, "/metrics");
                w.paused_seen |= super::metric(&text, "clipstream_kafka_source_paused") == 1.0;
                w.pauses = super::metric(&text, "clipstream_kafka_source_pauses_total");
            }
            if done() {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    w
}

/// The test pipeline of worker `name` against `brokers` and the S3 server at
/// `s3`, as config values: a test changes what it needs through the types,
/// then [`write_pipeline`] writes it.
pub fn pipeline_config(dir: &Path, brokers: &str, s3: &str, name: &str) -> PipelineConfig {
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
        model = super::model_section(),
        endpoint = s3,
        spool = dir.join(format!("spool-{name}")).display(),
    );
    super::parse_pipeline(&text, dir)
}

/// The test pipeline, unchanged, written.
pub fn pipeline(dir: &Path, brokers: &str, s3: &str, name: &str) -> PathBuf {
    write_pipeline(dir, name, &pipeline_config(dir, brokers, s3, name))
}

/// The Kafka source of a pipeline.
pub fn kafka_source(
    cfg: &mut PipelineConfig,
) -> &mut clipstream_pipeline::config::KafkaSourceConfig {
    match &mut cfg.source {
        clipstream_pipeline::config::SourceConfig::Kafka(k) => k,
        other => panic!("not a Kafka pipeline: {other:?}"),
    }
}
