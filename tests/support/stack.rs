//! A real Kafka-protocol broker (tansu) and a real S3 server (s3s-fs) on
//! free loopback ports, started for one test and stopped with it. The
//! binaries come from `scripts/stack.sh install`.

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::root;

pub const ACCESS_KEY: &str = "clipstream-test";
pub const SECRET_KEY: &str = "clipstream-test-secret";

fn tools() -> &'static (PathBuf, PathBuf) {
    static TOOLS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let out = Command::new("bash")
            .arg(root().join("scripts/stack.sh"))
            .arg("install")
            .output()
            .expect("scripts/stack.sh runs");
        assert!(
            out.status.success(),
            "scripts/stack.sh install failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = root().join(".cache/tools/bin");
        (bin.join("tansu"), bin.join("s3s-fs"))
    })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The broker and the S3 server.
pub struct Stack {
    pub kafka_port: u16,
    pub s3_port: u16,
    pub s3_dir: PathBuf,
    _kafka: Proc,
    _s3: Proc,
}

impl Stack {
    /// Starts both servers; `topics` are created with their partition
    /// counts, `buckets` as folders of the S3 server.
    pub fn start(dir: &Path, topics: &[(&str, u32)], buckets: &[&str]) -> Stack {
        let (tansu, s3s) = tools();
        let kafka_port = free_port();
        let url = format!("tcp://127.0.0.1:{kafka_port}");
        let log = |name: &str| {
            std::fs::File::create(dir.join(name))
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null())
        };
        let kafka = Proc(
            Command::new(tansu)
                .args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &url,
                ])
                .args(["--storage-engine", "memory://tansu/"])
                .stdout(log("tansu.log"))
                .stderr(log("tansu.err"))
                .spawn()
                .expect("tansu starts"),
        );
        let s3_port = free_port();
        let s3_dir = dir.join("s3");
        for b in buckets {
            std::fs::create_dir_all(s3_dir.join(b)).expect("bucket dir");
        }
        let s3 = Proc(
            Command::new(s3s)
                .args(["--host", "127.0.0.1", "--port", &s3_port.to_string()])
                .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                .arg(&s3_dir)
                .stdout(log("s3s.log"))
                .stderr(log("s3s.err"))
                .spawn()
                .expect("s3s-fs starts"),
        );
        wait_port(kafka_port, "tansu");
        wait_port(s3_port, "s3s-fs");
        for (t, n) in topics {
            let out = Command::new(tansu)
                .args([
                    "topic",
                    "create",
                    t,
                    "--partitions",
                    &n.to_string(),
                    "--broker",
                    &url,
                ])
                .output()
                .expect("tansu topic create");
            assert!(
                out.status.success(),
                "topic {t}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Stack {
            kafka_port,
            s3_port,
            s3_dir,
            _kafka: kafka,
            _s3: s3,
        }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.kafka_port)
    }

    pub fn s3_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }
}

/// Produces `(key, value)` pairs; returns (partition, offset) of each.
pub fn produce(brokers: &str, topic: &str, messages: &[(String, Vec<u8>)]) -> Vec<(i32, i64)> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let futures: Vec<_> = messages
            .iter()
            .map(|(k, v)| {
                producer.send(
                    FutureRecord::to(topic)
                        .key(k.as_bytes())
                        .payload(v.as_slice()),
                    Duration::from_secs(30),
                )
            })
            .collect();
        let mut out = Vec::new();
        for f in futures {
            let d = f.await.expect("delivered");
            out.push((d.partition, d.offset));
        }
        out
    })
}

/// A message read back by an independent consumer.
#[derive(Debug, Clone)]
pub struct Msg {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

/// Reads every message of `topic` from the beginning (no group): stops
/// when `done(messages so far)` or after `timeout`.
pub fn read_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
    timeout: Duration,
    done: impl Fn(&[Msg]) -> bool,
) -> Vec<Msg> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "clipstream-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("tpl");
    }
    c.assign(&tpl).expect("assign");
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while Instant::now() < deadline && !done(&out) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Msg {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                value: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
    out
}

/// The offsets a group has committed, per partition.
pub fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> HashMap<i32, i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    got.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}
