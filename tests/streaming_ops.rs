//! Kafka + S3 streaming, operations: a real Prometheus scraping two
//! workers (every dashboard panel has data), Kafka over TLS, and the
//! streaming benchmark.

#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::stack::{self, Stack};
use support::streaming::*;
use support::{model, scratch, write_pipeline};

#[test]
fn prometheus_scrapes_two_workers_and_every_dashboard_panel_has_data() {
    let _one = one_at_a_time();
    let (dir, stack, input, ev) = setup("stream-prometheus", 1500, 53);
    // A few S3 faults, so that the retry and error panels have something.
    let proxy = stack::FaultProxy::start(&dir, stack.s3_port, &["--slowdown-rate", "0.05"]);
    let brokers = stack.brokers();
    let pods = ["worker-a", "worker-b"];
    let addrs = pods.map(|_| format!("127.0.0.1:{}", stack::free_port()));
    let prom = stack::Prometheus::start(
        &dir,
        "clipstream",
        "test",
        &[(pods[0], addrs[0].clone()), (pods[1], addrs[1].clone())],
    );
    let workers: Vec<_> = pods
        .iter()
        .zip(&addrs)
        .map(|(pod, addr)| {
            let mut c = pipeline_config(&dir, &brokers, &proxy.endpoint(), pod);
            c.metrics.listen = Some(addr.clone());
            // Review routing, so that its panel and topic have data.
            c.model.review_min_score = Some(0.99);
            c.sink.kafka.as_mut().expect("[sink.kafka]").review_topic = Some("review".into());
            let p = write_pipeline(&dir, pod, &c);
            worker(&dir, &p, pod)
        })
        .collect();
    // Marked as a night's events, as `clipstream plan --publish` does (the
    // night's progress panels).
    let planned = ev.messages.len().to_string();
    let delivered = stack::produce_with_headers(
        &brokers,
        TOPIC,
        &ev.messages,
        &[
            ("clipstream.night", "2026-12-02"),
            ("clipstream.night.planned", &planned),
            ("clipstream.night.published", "1796169600"),
        ],
    );
    wait_committed(&brokers, &ends(&delivered), Duration::from_secs(240));

    // The live /metrics of a Kafka worker passes promtool's lint.
    for addr in &addrs {
        let (status, text) = support::http_get(addr, "/metrics");
        assert_eq!(status, 200);
        support::assert_metrics(
            &text,
            &[
                "clipstream_kafka_assigned_partitions",
                "clipstream_kafka_commit_duration_seconds_bucket",
                "clipstream_kafka_messages_produced_total",
                "clipstream_kafka_source_paused",
                "clipstream_kafka_source_pauses_total",
                "clipstream_night_planned",
                "clipstream_night_published_timestamp_seconds",
                "clipstream_s3_requests_total",
                "clipstream_s3_retries_total",
            ],
        );
        support::promtool_check(&text);
        assert_eq!(support::http_get(addr, "/readyz").0, 200);
    }

    // Every query of every dashboard panel, its variables substituted the
    // way Grafana would, returns data from this Prometheus.
    let json = dir.join("panels.json");
    let out = Command::new(support::python())
        .arg(support::root().join("tests/ops/dashboard_queries.py"))
        .args(["--prometheus", &prom.url()])
        .args(["--job", "clipstream", "--namespace", "test"])
        .args(["--rate-interval", "30s", "--range", "5m", "--wait", "30"])
        .args(["--fail-on-nan", "--json"])
        .arg(&json)
        .arg(support::root().join("dashboards/clipstream-overview.json"))
        .arg(support::root().join("dashboards/clipstream-fleet.json"))
        .output()
        .expect("dashboard_queries.py runs");
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "some dashboard panels have no data (see above)"
    );
    for w in workers {
        assert_eq!(terminate(w), Some(0));
    }
    let outcome = check(&brokers, &stack.s3_dir, &input, &ev, 0);
    // Every labels message carries the decision; the routed ones, and only
    // they, are on the review topic, with their labels and reason.
    let value = |m: &stack::Msg| -> Value { serde_json::from_slice(&m.value).expect("JSON") };
    let mut routed = std::collections::BTreeSet::new();
    for m in &outcome.labels {
        let v = value(m);
        let needs = v["needs_review"].as_bool().expect("needs_review");
        let top = v["labels"][0]["score"].as_f64().expect("score") as f32;
        assert_eq!(needs, top < 0.99, "{v}");
        if needs {
            routed.insert(v["id"].as_str().expect("id").to_string());
        }
    }
    let review = stack::read_topic(&brokers, "review", 2, Duration::from_secs(60), |m| {
        m.len() >= routed.len()
    });
    let listed: std::collections::BTreeSet<String> = review
        .iter()
        .map(|m| {
            let v = value(m);
            assert!(
                v["review_reason"].is_string() && v["labels"].is_array(),
                "{v}"
            );
            v["id"].as_str().expect("id").to_string()
        })
        .collect();
    assert_eq!(listed, routed);
}

#[test]
fn kafka_over_tls_end_to_end_and_an_untrusted_broker_is_a_clear_error() {
    let _one = one_at_a_time();
    // The broker is reachable over TLS only (a TLS-terminating proxy in
    // front of it, advertised in its metadata); the test's own clients
    // trust the test CA.
    let (dir, stack, input, ev) = setup_with("stream-tls", 600, 61, Stack::start_tls);
    let ca = stack.kafka_ca.clone().expect("CA");
    let brokers = stack.brokers();
    let delivered = stack::produce(&brokers, TOPIC, &ev.messages);

    // A worker that does not trust the broker's certificate stops with an
    // error that names the cause, and reads nothing.
    let with_tls = |name: &str, ca: Option<&Path>| {
        let mut c = pipeline_config(&dir, &brokers, &stack.s3_endpoint(), name);
        let mut options = std::collections::BTreeMap::new();
        options.insert("security.protocol".to_string(), "ssl".to_string());
        if let Some(ca) = ca {
            options.insert("ssl.ca.location".to_string(), ca.display().to_string());
        }
        kafka_source(&mut c).options = options.clone();
        c.sink.kafka.as_mut().expect("[sink.kafka]").options = options;
        write_pipeline(&dir, name, &c)
    };
    let untrusted = with_tls("untrusted", None);
    let started = Instant::now();
    let out = Command::new(support::bin())
        .args(["run", "--no-progress"])
        .arg(&untrusted)
        .env("AWS_ACCESS_KEY_ID", stack::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", stack::SECRET_KEY)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("worker runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "untrusted CA: exit {:?} after {:.1} s; stderr tail:\n{}",
        out.status.code(),
        started.elapsed().as_secs_f64(),
        stderr.lines().rev().take(3).collect::<Vec<_>>().join("\n")
    );
    assert!(
        !out.status.success(),
        "a worker that cannot verify the broker ran"
    );
    // The last line, the error itself, names the cause (librdkafka's
    // log lines before it say so too).
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error:") && last.contains("certificate verify failed"),
        "the error does not say that the certificate was not trusted:\n{stderr}"
    );
    assert!(
        stack::committed(&brokers, GROUP, TOPIC, PARTITIONS).is_empty(),
        "the untrusted worker committed offsets"
    );

    // Two workers with the CA: everything once, as over plaintext.
    let workers: Vec<_> = ["a", "b"]
        .iter()
        .map(|name| worker(&dir, &with_tls(name, Some(&ca)), name))
        .collect();
    wait_committed(&brokers, &ends(&delivered), Duration::from_secs(240));
    for w in workers {
        assert_eq!(terminate(w), Some(0));
    }
    let out = check(&brokers, &stack.s3_dir, &input, &ev, 0);
    let stats: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("tls-stats.json")).expect("TLS proxy stats"),
    )
    .expect("json");
    eprintln!(
        "over TLS: {} Parquet rows, {} embeddings, {} dead letters; TLS proxy: {stats}",
        out.parquet.len(),
        out.embeddings.len(),
        out.dead.len()
    );
    assert!(
        stats["failed_handshakes"].as_u64().unwrap_or(0) >= 1,
        "the untrusted worker's handshakes were not refused: {stats}"
    );
}

/// Benchmark, not a check (`--ignored`): the same image + caption events
/// through the local-files pipeline and through Kafka + S3 (one worker,
/// tansu + s3s-fs on loopback), same model and engine settings, rates
/// printed side by side. `CLIPSTREAM_BENCH_MODEL` (a model dir; default the
/// tiny test model), `CLIPSTREAM_BENCH_IMAGES` (a folder of images; default
/// the test images), `CLIPSTREAM_BENCH_RECORDS` (default 2000),
/// `CLIPSTREAM_BENCH_IN_FLIGHT` (`engine.max_in_flight` of both; default
/// 128) and `CLIPSTREAM_BENCH_FETCH_CONCURRENCY` (`fetch.concurrency` of the
/// Kafka + S3 run; default 16) change it.
///
///     cargo test --release -p clipstream --test streaming_ops -- --ignored --nocapture bench
#[test]
#[ignore = "benchmark: prints figures"]
fn bench_kafka_s3_pipeline_against_local_files() {
    let _one = one_at_a_time();
    let model_dir = std::env::var("CLIPSTREAM_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| model());
    let images_dir = std::env::var("CLIPSTREAM_BENCH_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| support::fixtures().join("shapes-eval"));
    let n: usize = std::env::var("CLIPSTREAM_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut images: Vec<PathBuf> = std::fs::read_dir(&images_dir)
        .expect("images")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("png" | "jpg" | "jpeg")
            )
        })
        .collect();
    images.sort();
    assert!(!images.is_empty(), "no images in {}", images_dir.display());

    let dir = scratch("stream-bench");
    let stack = Stack::start(
        &dir,
        &[(TOPIC, PARTITIONS as u32), ("embeddings", 4), ("labels", 4)],
        &["images", "output"],
    );
    let mut manifest = String::new();
    let mut messages = Vec::new();
    for path in &images {
        let name = path.file_name().expect("name").to_string_lossy();
        std::fs::copy(path, stack.s3_dir.join("images").join(&*name)).expect("copy");
    }
    for i in 0..n {
        let path = &images[i % images.len()];
        let name = path.file_name().expect("name").to_string_lossy();
        let id = format!("rec-{i:06}");
        let text = format!("a photo number {i}");
        manifest.push_str(
            &serde_json::json!({"id": id, "image": path.display().to_string(), "text": text})
                .to_string(),
        );
        manifest.push('\n');
        let ev =
            serde_json::json!({"id": id, "image": format!("s3://images/{name}"), "text": text});
        messages.push((id, ev.to_string().into_bytes()));
    }
    std::fs::write(dir.join("events.jsonl"), manifest).expect("manifest");
    let common = format!(
        r#"
[model]
dir = "{model}"
labels = "{labels}"
top_k = 3

[engine]
max_in_flight = {in_flight}
vision_batch = {{ max_size = 16, max_wait_ms = 10 }}
text_batch = {{ max_size = 32, max_wait_ms = 10 }}

[shutdown]
drain_deadline_secs = 30
"#,
        in_flight = std::env::var("CLIPSTREAM_BENCH_IN_FLIGHT").unwrap_or("128".into()),
        model = model_dir.display(),
        labels = support::fixtures().join("shapes-labels.toml").display(),
    );

    // Local files in, Parquet on disk out.
    let local = dir.join("local.toml");
    std::fs::write(
        &local,
        format!(
            "{common}\n[source]\nkind = \"files\"\nmanifest = \"{}\"\n\n[fetch]\nmax_object_bytes = 20000000\nroot = \"/\"\n\n[sink.parquet]\ndir = \"{}\"\nmax_rows_per_file = 1000\n",
            dir.join("events.jsonl").display(),
            dir.join("local-out").display()
        ),
    )
    .expect("pipeline");
    let started = Instant::now();
    let cpu = children_cpu_seconds();
    let out = Command::new(support::bin())
        .args(["run", "--no-progress"])
        .arg(&local)
        .output()
        .expect("run");
    let local_secs = started.elapsed().as_secs_f64();
    let local_cpu = children_cpu_seconds() - cpu;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Kafka in, S3 fetch, Parquet to S3 and two output topics.
    let delivered = stack::produce(&stack.brokers(), TOPIC, &messages);
    let metrics = format!("127.0.0.1:{}", stack::free_port());
    let kafka = dir.join("kafka.toml");
    std::fs::write(
        &kafka,
        format!(
            r#"{common}
[source]
kind = "kafka"
brokers = "{brokers}"
topics = ["{TOPIC}"]
group_id = "{GROUP}"
session_timeout_ms = 6000
drain_deadline_ms = 4000

[s3]
endpoint = "{endpoint}"
force_path_style = true

[fetch]
allowed_schemes = ["s3"]
allowed_buckets = ["images"]
max_object_bytes = 20000000
concurrency = {concurrency}

[sink.parquet]
url = "s3://output/embeddings/"
spool_dir = "{spool}"
max_rows_per_file = 1000

[sink.kafka]
embeddings_topic = "embeddings"
labels_topic = "labels"

[dead_letter]
path = "{dead}"

[metrics]
listen = "{metrics}"
"#,
            brokers = stack.brokers(),
            endpoint = stack.s3_endpoint(),
            spool = dir.join("spool").display(),
            dead = dir.join("dead.jsonl").display(),
            concurrency =
                std::env::var("CLIPSTREAM_BENCH_FETCH_CONCURRENCY").unwrap_or("16".into()),
        ),
    )
    .expect("pipeline");
    let cpu = children_cpu_seconds();
    let w = worker(&dir, &kafka, "bench");
    // Timed from the assignment (the group join is broker-specific: tansu
    // takes half the session timeout) to the last commit.
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(&metrics).is_err()
        || support::http_get(&metrics, "/readyz").0 != 200
    {
        assert!(Instant::now() < deadline, "the worker was never assigned");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    wait_committed(
        &stack.brokers(),
        &ends(&delivered),
        Duration::from_secs(3600),
    );
    let kafka_secs = started.elapsed().as_secs_f64();
    assert_eq!(terminate(w), Some(0));
    let kafka_cpu = children_cpu_seconds() - cpu;

    let local_rate = n as f64 / local_secs;
    let kafka_rate = n as f64 / kafka_secs;
    println!(
        "bench model={} records={n} (image + caption each, {} distinct images)",
        model_dir.display(),
        images.len()
    );
    println!("bench local-files seconds={local_secs:.2} records_per_s={local_rate:.1}");
    println!("bench kafka+s3 seconds={kafka_secs:.2} records_per_s={kafka_rate:.1}");
    println!(
        "bench kafka_s3_over_local ratio={:.3}",
        kafka_rate / local_rate
    );
    // Worker CPU (user + system) per record, whole process lives: model
    // loading, and for Kafka the group join and the drain, included.
    let (local_ms, kafka_ms) = (1000.0 * local_cpu / n as f64, 1000.0 * kafka_cpu / n as f64);
    println!("bench local-files worker_cpu_ms_per_record={local_ms:.3}");
    println!("bench kafka+s3 worker_cpu_ms_per_record={kafka_ms:.3}");
    println!(
        "bench kafka_s3_over_local cpu_ratio={:.3}",
        kafka_ms / local_ms
    );
}

/// CPU seconds (user + system) of this process's children that have ended
/// and been waited for.
#[allow(unsafe_code)]
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes one `rusage` into the zeroed value we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) },
        0
    );
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// `[sink.kafka] embeddings_format = "f32le"` on a real broker: each
/// record's message has the layout the README documents (read here by a
/// reader written from that description), its vectors are the Parquet
/// row's bit for bit, its other fields the row's, and the vectors take
/// less than half the bytes of the same vectors in JSON.
#[test]
fn compact_embeddings_messages_carry_the_parquet_rows_bit_for_bit() {
    use clipstream_pipeline::config::KafkaSinkConfig;
    use clipstream_pipeline::sink::kafka::config::EmbeddingsFormat;

    let _one = one_at_a_time();
    let dir = scratch("stream-f32le");
    let stack = Stack::start(&dir, &[("embeddings", 1)], &["unused"]);
    let input = support::build_input(&dir, 80, 11);
    let out = dir.join("out");
    let mut c = support::local_config(&dir, &input.manifest, &out, 1000);
    c.sink.kafka = Some(KafkaSinkConfig {
        brokers: Some(stack.brokers()),
        embeddings_topic: Some("embeddings".into()),
        embeddings_format: EmbeddingsFormat::F32le,
        ..KafkaSinkConfig::default()
    });
    let p = write_pipeline(&dir, "pipeline", &c);
    let run = support::clipstream(&["run", "--no-progress", support::s(&p)]);
    assert!(run.status.success(), "{}", support::stderr_of(&run, "run"));
    let rows = support::check_exactly_once(&input, &out);
    let msgs = stack::read_topic(
        &stack.brokers(),
        "embeddings",
        1,
        Duration::from_secs(60),
        |m| m.len() >= rows.len(),
    );
    assert_eq!(msgs.len(), rows.len(), "one message per row");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut json_bytes = 0usize;
    for m in &msgs {
        assert_eq!(
            m.headers.get("clipstream.format").map(String::as_str),
            Some("f32le")
        );
        let v = &m.value;
        assert_eq!(&v[..4], b"CSE1", "magic");
        let h = u32::from_le_bytes(v[4..8].try_into().expect("4 bytes")) as usize;
        let meta: Value = serde_json::from_slice(&v[8..8 + h]).expect("JSON header");
        let dim = meta["dim"].as_u64().expect("dim") as usize;
        let names: Vec<&str> = meta["vectors"]
            .as_array()
            .expect("vectors")
            .iter()
            .map(|n| n.as_str().expect("name"))
            .collect();
        let body = &v[8 + h..];
        assert_eq!(
            body.len(),
            names.len() * dim * 4,
            "nothing after the vectors"
        );
        let id = m.key.as_deref().expect("key");
        assert_eq!(meta["id"], id);
        let row = rows
            .iter()
            .find(|r| r["id"] == id)
            .expect("the Parquet row");
        assert_eq!(meta["source"]["offset"], row["offset"]);
        assert_eq!(meta["image_uri"], row["image_uri"]);
        assert_eq!(meta["text"], row["text"]);
        for (name, chunk) in names.iter().zip(body.chunks_exact(dim * 4)) {
            let got: Vec<f32> = chunk
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            assert_eq!(
                bits(&got),
                bits(&support::floats(&row[*name])),
                "{id} {name}"
            );
        }
        for name in ["image_embedding", "text_embedding"] {
            assert_eq!(
                names.contains(&name),
                !row[name].is_null(),
                "{id}: {name} listed iff the row has it"
            );
            json_bytes += row[name].to_string().len();
        }
    }
    // The tiny model's vectors are short, so the header weighs more than
    // with a real model (`clipstream bench --messages` measures 512-d); the
    // vectors themselves take 4 bytes a float against JSON's decimals.
    let vector_bytes: usize = msgs
        .iter()
        .map(|m| {
            m.value.len() - 8 - u32::from_le_bytes(m.value[4..8].try_into().expect("4")) as usize
        })
        .sum();
    assert!(
        vector_bytes * 2 < json_bytes,
        "{vector_bytes} bytes of vectors against {json_bytes} as JSON"
    );
}
