//! Kafka + S3 streaming, end to end through the binary, against a real
//! Kafka-protocol broker (tansu) and a real S3 server (s3s-fs) that the
//! project's scripts install — delivery: workers in one consumer group,
//! bad input of every kind, outputs read back by independent readers,
//! committed offsets checked; workers killed at random moments, stopped
//! mid-run, held back by a slow S3; a mock cluster's broker faults.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::stack::{self, Stack};
use support::streaming::*;
use support::{build_input, clock_seeded, model, read_parquet, scratch, write_pipeline};

/// Events of 40 kB (the base pipeline takes 4 kB).
const BIG_EVENTS: usize = 65536;

#[test]
fn two_workers_in_a_group_write_everything_once() {
    let _one = one_at_a_time();
    let (dir, stack, input, ev) = setup("stream-two", 3000, 11);
    let delivered = stack::produce(&stack.brokers(), TOPIC, &ev.messages);
    let ends = ends(&delivered);
    assert_eq!(ends.len(), 4, "every partition has events");

    let p = pipeline(&dir, &stack.brokers(), &stack.s3_endpoint(), "w");
    let a = worker(&dir, &p, "a");
    let b = worker(&dir, &p, "b");
    wait_committed(&stack.brokers(), &ends, Duration::from_secs(240));
    assert_eq!(terminate(a), Some(0), "worker a exits cleanly");
    assert_eq!(terminate(b), Some(0), "worker b exits cleanly");

    let out = check(&stack.brokers(), &stack.s3_dir, &input, &ev, 0);
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
    let _one = one_at_a_time();
    let (dir, stack, input, ev) = setup("stream-kill", 2000, 23);
    let p = pipeline(&dir, &stack.brokers(), &stack.s3_endpoint(), "w");
    let a = worker(&dir, &p, "a");
    let mut next = clock_seeded("random");
    // Five waves of events; worker b is killed at a random moment of each.
    let mut delivered = Vec::new();
    for wave in ev.messages.chunks(ev.messages.len().div_ceil(5)) {
        delivered.extend(stack::produce(&stack.brokers(), TOPIC, wave));
        let assigned = assignments(&dir, "b");
        let b = worker(&dir, &p, "b");
        // Killed while it holds partitions: a random moment after the
        // group gave it some.
        let deadline = Instant::now() + Duration::from_secs(30);
        while assignments(&dir, "b") == assigned {
            assert!(Instant::now() < deadline, "worker b got no partitions");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100 + next() % 2000));
        signal(&b, "-KILL");
        drop(b);
    }
    let b = worker(&dir, &p, "b");
    wait_committed(
        &stack.brokers(),
        &ends(&delivered),
        Duration::from_secs(300),
    );
    assert_eq!(terminate(a), Some(0));
    assert_eq!(terminate(b), Some(0));
    // Duplicates on the topics are bounded by what a killed worker had sent
    // but not committed: a record is committed once its Parquet file is
    // complete, so per kill at most the records in flight (64) plus an open
    // file (150 rows) on each of its 2 partitions.
    let out = check(
        &stack.brokers(),
        &stack.s3_dir,
        &input,
        &ev,
        5 * (64 + 2 * 150),
    );
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

#[test]
fn sigterm_drains_and_commits_then_a_restart_adds_no_duplicates() {
    let _one = one_at_a_time();
    let (dir, stack, input, ev) = setup("stream-term", 1500, 31);
    let brokers = stack.brokers();
    let delivered = stack::produce(&brokers, TOPIC, &ev.messages);
    let ends = ends(&delivered);
    let total: i64 = ends.values().sum();
    let p = pipeline(&dir, &brokers, &stack.s3_endpoint(), "w");
    let a = worker(&dir, &p, "a");
    wait_progress(&brokers, total, 0.2);

    // SIGTERM mid-run: the worker stops reading, finishes what it holds,
    // writes it, commits it and exits within the drain deadline (8 s).
    let started = Instant::now();
    assert_eq!(terminate(a), Some(0), "exit status after SIGTERM");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8 + 4),
        "SIGTERM to exit took {took:?}, more than the 8 s drain deadline"
    );
    let committed = stack::committed(&brokers, GROUP, TOPIC, PARTITIONS);
    let done: i64 = committed.values().sum();
    assert!(
        done < total,
        "the run had finished before SIGTERM, so nothing was in flight"
    );
    // What was committed is exactly what is in Parquet: every good record
    // below its partition's committed offset, and none at or above it.
    let position: HashMap<&str, (i32, i64)> = ev
        .messages
        .iter()
        .zip(&delivered)
        .map(|((id, _), at)| (id.as_str(), *at))
        .collect();
    let mut want: Vec<&str> = input
        .good
        .keys()
        .map(String::as_str)
        .filter(|id| {
            let (p, o) = position[id];
            o < committed.get(&p).copied().unwrap_or(0)
        })
        .collect();
    let rows = read_parquet(&stack.s3_dir.join("output/embeddings"));
    let mut got: Vec<&str> = rows.iter().filter_map(|r| r["id"].as_str()).collect();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(
        got.len(),
        want.len(),
        "Parquet after SIGTERM holds {} rows, the committed offsets {committed:?} cover {}",
        got.len(),
        want.len()
    );
    assert!(
        got == want,
        "Parquet after SIGTERM is not the committed records"
    );
    eprintln!(
        "SIGTERM: exited in {:.2} s, {done} of {total} records committed, {} Parquet rows",
        took.as_secs_f64(),
        got.len()
    );

    // A restart resumes at the committed offsets: no record twice anywhere.
    let b = worker(&dir, &p, "b");
    wait_committed(&brokers, &ends, Duration::from_secs(240));
    assert_eq!(terminate(b), Some(0));
    let out = check(&brokers, &stack.s3_dir, &input, &ev, 0);
    assert_eq!(out.embeddings.len(), input.good.len(), "embeddings twice");
    assert_eq!(out.dead.len(), ev.bad.len(), "dead letters twice");
}

#[test]
fn backpressure_pauses_the_source_and_memory_stays_flat_under_a_backlog() {
    let _one = one_at_a_time();
    let dir = scratch("stream-backpressure");
    let topics: Vec<(&str, u32)> = [("small", PARTITIONS as u32)]
        .into_iter()
        .chain(TOPICS)
        .collect();
    let stack = Stack::start(&dir, &topics, &BUCKETS);
    let brokers = stack.brokers();
    // Images in S3 (those of a few generated events), and events of 40 kB
    // each (padded with a field the worker ignores): a backlog of 1,500 is
    // 60 MB, against 150 (6 MB) for the small one.
    let input = build_input(&dir, 80, 71);
    let ev = to_kafka(&input, &stack.s3_dir);
    let mut uris: Vec<String> = ev
        .messages
        .iter()
        .filter(|(id, _)| !ev.bad.contains_key(id))
        .filter_map(|(_, v)| {
            let v: Value = serde_json::from_slice(v).ok()?;
            Some(v["image"].as_str()?.to_string())
        })
        .filter(|u| u.starts_with("s3://images/"))
        .collect();
    uris.sort();
    uris.dedup();
    assert!(uris.len() >= 10, "only {} images", uris.len());
    let pad = "x".repeat(40_000);
    let events = |prefix: &str, n: usize| -> Vec<(String, Vec<u8>)> {
        (0..n)
            .map(|i| {
                let id = format!("{prefix}-{i:05}");
                let v = serde_json::json!({"id": id, "image": uris[i % uris.len()], "pad": pad});
                (id, v.to_string().into_bytes())
            })
            .collect()
    };
    let small = events("small", 150);
    let big = events("big", 1500);
    let small_ends = ends(&stack::produce(&brokers, "small", &small));
    let big_ends = ends(&stack::produce(&brokers, TOPIC, &big));

    // A slow S3 (every object GET held 1 s) and 16 records in flight: the
    // pipeline stays full, so the source must pause.
    let proxy = stack::FaultProxy::start(
        &dir,
        stack.s3_port,
        &["--slowdown-rate", "0", "--delay-secs", "1"],
    );
    let slow = |name: &str, topic: &str, addr: &str| {
        let mut c = pipeline_config(&dir, &brokers, &proxy.endpoint(), name);
        c.metrics.listen = Some(addr.to_string());
        c.engine.max_in_flight = 16;
        c.engine.text_batch.max_size = 16;
        let k = kafka_source(&mut c);
        k.max_event_bytes = BIG_EVENTS;
        k.topics = vec![topic.to_string()];
        write_pipeline(&dir, name, &c)
    };
    let reached = |topic: &str, ends: &HashMap<i32, i64>| {
        let c = stack::committed(&brokers, GROUP, topic, PARTITIONS);
        ends.iter().all(|(p, e)| c.get(p) == Some(e))
    };

    // The small backlog, to the end.
    let addr = format!("127.0.0.1:{}", stack::free_port());
    let w = worker(&dir, &slow("small", "small", &addr), "small");
    let s = watch(&w, &addr, Duration::from_secs(120), || {
        reached("small", &small_ends)
    });
    assert!(
        reached("small", &small_ends),
        "the small backlog was not finished in 120 s"
    );
    assert_eq!(terminate(w), Some(0));

    // The big one, for 30 s.
    let addr = format!("127.0.0.1:{}", stack::free_port());
    let w = worker(&dir, &slow("big", TOPIC, &addr), "big");
    let b = watch(&w, &addr, Duration::from_secs(30), || false);
    assert_eq!(terminate(w), Some(0));
    let done: i64 = stack::committed(&brokers, GROUP, TOPIC, PARTITIONS)
        .values()
        .sum();
    eprintln!(
        "backpressure: peak RSS {:.0} MiB with a 6 MB backlog, {:.0} MiB with a 60 MB one \
         ({done} of 1500 committed in 30 s, {} pauses); proxy: {}",
        s.peak_rss_mib,
        b.peak_rss_mib,
        b.pauses,
        proxy.stats()
    );
    assert!(
        b.paused_seen && b.pauses >= 1.0,
        "the source never paused: {b:?}"
    );
    assert!(
        done < 1500,
        "the big backlog was finished: no backlog to hold"
    );
    // A backlog held in memory would add its 54 extra MB. The small run's
    // own peak varies by about 10 MiB from run to run on the 2-core CI
    // machine (158 and 167 MiB measured against 183 for the big one), so
    // the bound leaves room for that and no more.
    assert!(
        b.peak_rss_mib - s.peak_rss_mib < 32.0,
        "memory grew with the backlog: {:.0} MiB (6 MB backlog) vs {:.0} MiB (60 MB)",
        s.peak_rss_mib,
        b.peak_rss_mib
    );

    // The rest at full speed, straight to S3: nothing lost, Parquet exactly
    // once for both topics.
    let mut c = pipeline_config(&dir, &brokers, &stack.s3_endpoint(), "rest");
    kafka_source(&mut c).max_event_bytes = BIG_EVENTS;
    let p = write_pipeline(&dir, "rest", &c);
    let w = worker(&dir, &p, "rest");
    wait_committed(&brokers, &big_ends, Duration::from_secs(240));
    assert_eq!(terminate(w), Some(0));
    let rows = read_parquet(&stack.s3_dir.join("output/embeddings"));
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for r in &rows {
        *seen.entry(r["id"].as_str().expect("id")).or_default() += 1;
    }
    for (id, _) in small.iter().chain(&big) {
        assert_eq!(seen.get(id.as_str()), Some(&1), "{id} in Parquet");
    }
    assert_eq!(
        seen.len(),
        small.len() + big.len(),
        "unexpected ids in Parquet"
    );
    let embeddings = stack::read_topic(
        &brokers,
        "embeddings",
        PARTITIONS,
        Duration::from_secs(60),
        |m| ids(m).len() >= small.len() + big.len(),
    );
    assert_eq!(
        ids(&embeddings).len(),
        small.len() + big.len(),
        "embeddings missing"
    );
}

/// librdkafka's mock cluster (3 brokers, in this test process) in place of
/// the broker, to inject what a real broker cannot be made to do on cue:
/// the group coordinator moving twice, then every broker down for 10 s
/// mid-run.
#[test]
fn kafka_outage_and_coordinator_moves_from_a_mock_cluster_lose_nothing() {
    mock_cluster_faults(false);
}

/// The same, with produce requests refused (not the leader, not enough
/// replicas) while the worker writes its outputs.
///
/// The worker's producer sends one request at a time per broker here: the
/// mock checks idempotent sequence numbers only for transactional
/// producers, so it accepts a request sent after one it refused, and
/// librdkafka, trusting that a broker never does that, then reports the
/// refused messages as delivered (`rd_kafka_dr_implicit_ack`). Against the
/// mock with five requests in flight an acknowledged message goes missing
/// in about one run of three, with clipstream or a plain rdkafka producer;
/// a real broker answers OUT_OF_ORDER_SEQUENCE_NUMBER instead.
#[test]
fn kafka_refused_produce_requests_from_a_mock_cluster_lose_nothing() {
    mock_cluster_faults(true);
}

fn mock_cluster_faults(refuse_produce: bool) {
    use rdkafka::mocking::{MockCluster, MockCoordinator};
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    let _one = one_at_a_time();
    let dir = scratch("stream-mock");
    let stack = Stack::s3_only(&dir, &BUCKETS);
    let input = build_input(&dir, 1500, 61);
    let ev = to_kafka(&input, &stack.s3_dir);
    let cluster = MockCluster::new(3).expect("mock cluster");
    for (t, n) in TOPICS {
        cluster.create_topic(t, n as i32, 3).expect("topic");
    }
    let brokers = cluster.bootstrap_servers();
    let (first, rest) = ev.messages.split_at(300);
    let (second, third) = rest.split_at(300);
    let mut delivered = stack::produce(&brokers, TOPIC, first);
    let mut c = pipeline_config(&dir, &brokers, &stack.s3_endpoint(), "w");
    if refuse_produce {
        c.sink
            .kafka
            .as_mut()
            .expect("[sink.kafka]")
            .options
            .insert("max.in.flight.requests.per.connection".into(), "1".into());
    }
    let p = write_pipeline(&dir, "w", &c);
    let w = worker(&dir, &p, "w");
    wait_progress(&brokers, delivered.len() as i64, 0.2);

    // Produce requests refused (not the leader) while the worker writes its
    // outputs: its idempotent producer refreshes metadata and retries.
    delivered.extend(stack::produce(&brokers, TOPIC, second));
    use RDKafkaRespErr::*;
    if refuse_produce {
        let mut errors = vec![RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 8];
        errors.extend([RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 8]);
        cluster.request_errors(RDKafkaApiKey::Produce, &errors);
    }
    // The group's coordinator moves to another broker, twice.
    std::thread::sleep(Duration::from_millis(500));
    cluster
        .coordinator(MockCoordinator::Group(GROUP.into()), 2)
        .expect("coordinator move");
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RD_KAFKA_RESP_ERR_NOT_COORDINATOR; 2],
    );
    std::thread::sleep(Duration::from_millis(1500));
    cluster
        .coordinator(MockCoordinator::Group(GROUP.into()), 3)
        .expect("coordinator move");
    std::thread::sleep(Duration::from_millis(1000));
    // Every broker down for 10 s, with records still to do. (Errors the
    // worker left are cleared first: the test's own producer is not the
    // one under test.)
    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    delivered.extend(stack::produce(&brokers, TOPIC, third));
    let before = stack::committed(&brokers, GROUP, TOPIC, PARTITIONS);
    let total: i64 = ends(&delivered).values().sum();
    assert!(
        before.values().sum::<i64>() < total,
        "the run finished before the outage"
    );
    cluster.broker_down(-1).expect("brokers down");
    std::thread::sleep(Duration::from_secs(10));
    cluster.broker_up(-1).expect("brokers up");

    wait_committed(&brokers, &ends(&delivered), Duration::from_secs(300));
    assert_eq!(terminate(w), Some(0));
    // A 10 s outage is longer than the 6 s session: the worker's partitions
    // were taken away and given back, and what it did since its last
    // successful commit is done again. Duplicates on the topics are expected
    // (how many depends on when the group noticed); Parquet stays exactly
    // once and nothing may be missing.
    let out = check(&brokers, &stack.s3_dir, &input, &ev, ev.messages.len());
    eprintln!(
        "mock cluster faults: parquet rows {} (each id once), embeddings {} for {} ids, dead letters {} for {}",
        out.parquet.len(),
        out.embeddings.len(),
        input.good.len(),
        out.dead.len(),
        ev.bad.len()
    );
}
