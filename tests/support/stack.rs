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
        super::run_ok(
            Command::new("bash")
                .arg(root().join("scripts/stack.sh"))
                .arg("install"),
            "scripts/stack.sh install",
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

/// A log file in `dir` for a child's output.
pub fn log(dir: &Path, name: &str) -> Stdio {
    std::fs::File::create(dir.join(name))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Proc {
    /// Its exit code if it has exited (on its own, or killed), else `None`.
    pub fn exited(&mut self) -> Option<Option<i32>> {
        self.0.try_wait().ok().flatten().map(|s| s.code())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What Kafka clients talk to.
#[derive(Debug, Clone, PartialEq)]
enum Front {
    /// The broker itself.
    Plain,
    /// A TLS-terminating proxy.
    Tls,
    /// A proxy that holds requests (its arguments).
    Faults(Vec<String>),
}

/// The broker and the S3 server.
pub struct Stack {
    /// The port Kafka clients use (the TLS proxy's, with TLS).
    pub kafka_port: u16,
    pub s3_port: u16,
    pub s3_dir: PathBuf,
    /// With TLS: the CA certificate that signed the broker's.
    pub kafka_ca: Option<PathBuf>,
    _kafka: Option<Proc>,
    _tls: Option<Proc>,
    /// `tests/helpers/kafka_fault_proxy.py`, when the test holds requests.
    _kafka_faults: Option<Proc>,
    _s3: Proc,
}

/// Extra client properties for a bootstrap address (TLS), applied by every
/// client these helpers make for it.
static CLIENT_OPTIONS: std::sync::Mutex<BTreeMap<String, Vec<(String, String)>>> =
    std::sync::Mutex::new(BTreeMap::new());

/// A client config for `brokers`, with the properties its stack registered.
pub fn client(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    let options = CLIENT_OPTIONS.lock().unwrap_or_else(|e| e.into_inner());
    for (k, v) in options.get(brokers).into_iter().flatten() {
        c.set(k, v);
    }
    c
}

/// A CA and a server certificate for 127.0.0.1 (openssl CLI), in `dir`:
/// (ca.crt, server.crt, server.key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        super::run_ok(
            Command::new("openssl").args(args).current_dir(dir),
            &format!("openssl {args:?}"),
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=clipstream test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.crt",
    ]);
    (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

impl Stack {
    /// Starts both servers; `topics` are created with their partition
    /// counts, `buckets` as folders of the S3 server.
    pub fn start(dir: &Path, topics: &[(&str, u32)], buckets: &[&str]) -> Stack {
        Stack::start_with(dir, topics, buckets, Front::Plain)
    }

    /// The same, with Kafka reached over TLS only: the broker speaks
    /// plaintext, so a TLS-terminating proxy (`tests/helpers/tls_proxy.py`)
    /// sits in front of it and the broker advertises the proxy. Clients made
    /// by these helpers for `brokers()` use TLS and trust `kafka_ca`.
    pub fn start_tls(dir: &Path, topics: &[(&str, u32)], buckets: &[&str]) -> Stack {
        Stack::start_with(dir, topics, buckets, Front::Tls)
    }

    /// The same, with Kafka reached through `tests/helpers/kafka_fault_proxy.py`
    /// (given `args`), which the broker advertises: requests of chosen kinds
    /// can be held. Its counters are in `kafka-proxy-stats.json`.
    pub fn start_with_kafka_faults(
        dir: &Path,
        topics: &[(&str, u32)],
        buckets: &[&str],
        args: &[&str],
    ) -> Stack {
        let args = args.iter().map(|a| a.to_string()).collect();
        Stack::start_with(dir, topics, buckets, Front::Faults(args))
    }

    fn start_with(dir: &Path, topics: &[(&str, u32)], buckets: &[&str], front: Front) -> Stack {
        let (tansu, _) = tools();
        let kafka_port = free_port();
        let client_port = match front {
            Front::Plain => kafka_port,
            Front::Tls | Front::Faults(_) => free_port(),
        };
        let url = format!("tcp://127.0.0.1:{kafka_port}");
        let advertised = format!("tcp://127.0.0.1:{client_port}");
        let kafka = Proc(
            Command::new(tansu)
                .args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &advertised,
                ])
                .args(["--storage-engine", "memory://tansu/"])
                .stdout(log(dir, "tansu.log"))
                .stderr(log(dir, "tansu.err"))
                .spawn()
                .expect("tansu starts"),
        );
        let mut stack = Stack::s3_only(dir, buckets);
        wait_port(kafka_port, "tansu");
        stack.kafka_port = client_port;
        stack._kafka = Some(kafka);
        if let Front::Faults(args) = &front {
            stack._kafka_faults = Some(Proc(
                Command::new(super::python())
                    .arg(root().join("tests/helpers/kafka_fault_proxy.py"))
                    .args(["--listen", &format!("127.0.0.1:{client_port}")])
                    .args(["--upstream", &format!("127.0.0.1:{kafka_port}")])
                    .arg("--stats-file")
                    .arg(dir.join("kafka-proxy-stats.json"))
                    .args(args)
                    .stdout(log(dir, "kafka-proxy.log"))
                    .stderr(log(dir, "kafka-proxy.err"))
                    .spawn()
                    .expect("kafka_fault_proxy.py starts"),
            ));
            wait_port(client_port, "the Kafka fault proxy");
        }
        if front == Front::Tls {
            let certs = dir.join("tls");
            std::fs::create_dir_all(&certs).expect("tls dir");
            let (ca, cert, key) = certificates(&certs);
            stack._tls = Some(Proc(
                Command::new(super::python())
                    .arg(root().join("tests/helpers/tls_proxy.py"))
                    .args(["--listen", &format!("127.0.0.1:{client_port}")])
                    .args(["--upstream", &format!("127.0.0.1:{kafka_port}")])
                    .arg("--cert")
                    .arg(&cert)
                    .arg("--key")
                    .arg(&key)
                    .arg("--stats-file")
                    .arg(dir.join("tls-stats.json"))
                    .stdout(log(dir, "tls.log"))
                    .stderr(log(dir, "tls.err"))
                    .spawn()
                    .expect("tls_proxy.py starts"),
            ));
            wait_port(client_port, "the TLS proxy");
            CLIENT_OPTIONS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(
                    stack.brokers(),
                    vec![
                        ("security.protocol".into(), "ssl".into()),
                        ("ssl.ca.location".into(), ca.display().to_string()),
                    ],
                );
            stack.kafka_ca = Some(ca);
        }
        for (t, n) in topics {
            super::run_ok(
                Command::new(tansu).args([
                    "topic",
                    "create",
                    t,
                    "--partitions",
                    &n.to_string(),
                    "--broker",
                    &url,
                ]),
                &format!("tansu topic create {t}"),
            );
        }
        stack
    }

    /// Only the S3 server (for tests that bring their own Kafka).
    pub fn s3_only(dir: &Path, buckets: &[&str]) -> Stack {
        let (_, s3s) = tools();
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
                .stdout(log(dir, "s3s.log"))
                .stderr(log(dir, "s3s.err"))
                .spawn()
                .expect("s3s-fs starts"),
        );
        wait_port(s3_port, "s3s-fs");
        Stack {
            kafka_port: 0,
            s3_port,
            s3_dir,
            kafka_ca: None,
            _kafka: None,
            _tls: None,
            _kafka_faults: None,
            _s3: s3,
        }
    }

    /// The Kafka fault proxy's counters (`connections`, `frames`, `held`,
    /// `held_by_client`).
    pub fn kafka_proxy_stats(&self, dir: &Path) -> serde_json::Value {
        std::fs::read(dir.join("kafka-proxy-stats.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
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
    produce_with_headers(brokers, topic, messages, &[])
}

/// [`produce`], every message with `headers`.
pub fn produce_with_headers(
    brokers: &str,
    topic: &str,
    messages: &[(String, Vec<u8>)],
    headers: &[(&str, &str)],
) -> Vec<(i32, i64)> {
    use rdkafka::message::{Header, OwnedHeaders};
    let hs = headers.iter().fold(OwnedHeaders::new(), |hs, (k, v)| {
        hs.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        })
    });
    let producer: FutureProducer = client(brokers)
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
                        .payload(v.as_slice())
                        .headers(hs.clone()),
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
    /// No value at all (a tombstone), as opposed to an empty one.
    pub null: bool,
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
    let c: BaseConsumer = client(brokers)
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
                null: m.payload().is_none(),
                headers,
            });
        }
    }
    out
}

/// The offsets a group has committed, per partition.
pub fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> HashMap<i32, i64> {
    let c: BaseConsumer = client(brokers)
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

/// The fault-injecting proxy (`tests/helpers/s3_fault_proxy.py`) in front
/// of the S3 server: 503 SlowDown, held requests, 403 on chosen keys.
pub struct FaultProxy {
    pub port: u16,
    stats: PathBuf,
    _proc: Proc,
}

impl FaultProxy {
    pub fn start(dir: &Path, upstream_port: u16, args: &[&str]) -> FaultProxy {
        FaultProxy::start_named(dir, "proxy", upstream_port, args)
    }

    /// Another proxy in the same directory (`NAME-stats.json`, `NAME.err`).
    pub fn start_named(dir: &Path, name: &str, upstream_port: u16, args: &[&str]) -> FaultProxy {
        use std::io::BufRead;
        let stats = if name == "proxy" {
            dir.join("proxy-stats.json")
        } else {
            dir.join(format!("{name}-stats.json"))
        };
        let mut child = Command::new(super::python())
            .arg(root().join("tests/helpers/s3_fault_proxy.py"))
            .args(["--upstream", &format!("127.0.0.1:{upstream_port}")])
            .args(["--seed", "7", "--stats-file"])
            .arg(&stats)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(log(dir, &format!("{name}.err")))
            .spawn()
            .expect("the fault proxy starts");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("proxy output");
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the fault proxy said {line:?}, not LISTENING host:port"));
        FaultProxy {
            port,
            stats,
            _proc: Proc(child),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The proxy's counters (requests, forwarded, injected_503, ...).
    pub fn stats(&self) -> serde_json::Value {
        std::fs::read(&self.stats)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

/// A real Prometheus scraping `targets` (`(pod, host:port)`) every second,
/// with the labels a Kubernetes scrape gives (`job`, `namespace`, `pod`).
pub struct Prometheus {
    pub port: u16,
    _proc: Proc,
}

impl Prometheus {
    pub fn start(dir: &Path, job: &str, namespace: &str, targets: &[(&str, String)]) -> Prometheus {
        let bin = std::env::var("PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into());
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: {job}\n    static_configs:\n"
        );
        for (pod, addr) in targets {
            config.push_str(&format!(
                "      - targets: ['{addr}']\n        labels: {{namespace: {namespace}, pod: {pod}}}\n"
            ));
        }
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config).expect("prometheus.yml");
        let port = free_port();
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log(dir, "prometheus.log"))
            .stderr(log(dir, "prometheus.err"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{bin} does not start ({e}): run scripts/install-prometheus.sh")
            });
        let p = Prometheus {
            port,
            _proc: Proc(child),
        };
        wait_port(port, "prometheus");
        p
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
