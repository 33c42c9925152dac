//! Kafka + S3 streaming under faults: S3 errors and stalls, a coordinator
//! slow to answer offset lookups, a late upload from a worker that lost its
//! partition, poison messages; every good record must end up in Parquet
//! exactly once, every bad one as a dead letter with its reason.

#[path = "support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::stack::{self, Stack};
use support::streaming::*;
use support::{build_input, clock_seeded, read_parquet, scratch, write_pipeline};

#[test]
fn s3_faults_are_retried_and_a_forbidden_object_becomes_a_dead_letter() {
    let _one = one_at_a_time();
    let (dir, stack, mut input, mut ev) = setup("stream-s3-faults", 1000, 41);
    // Every 40th good event with an image points at a key the proxy answers
    // 403 AccessDenied (the object exists: only the permission is missing).
    std::fs::create_dir_all(stack.s3_dir.join("images/forbidden")).expect("dir");
    let mut forbidden = 0;
    for (i, (id, value)) in ev.messages.iter_mut().enumerate() {
        if i % 40 != 0 || input.good.get(id).is_none_or(|g| !g.0) {
            continue;
        }
        let mut v: Value = serde_json::from_slice(value).expect("json");
        let name = v["image"]
            .as_str()
            .and_then(|u| u.rsplit('/').next())
            .expect("name")
            .to_string();
        std::fs::copy(
            stack.s3_dir.join("images").join(&name),
            stack.s3_dir.join("images/forbidden").join(&name),
        )
        .expect("copy");
        v["image"] = Value::String(format!("s3://images/forbidden/{name}"));
        *value = v.to_string().into_bytes();
        input.good.remove(id);
        ev.bad.insert(id.clone(), "object_forbidden");
        forbidden += 1;
    }
    assert!(forbidden >= 5, "only {forbidden} forbidden events");
    // 15% of object requests answered 503 SlowDown, 5% held past the
    // worker's 2 s request timeout: 20% faulted, uploads included.
    let proxy = stack::FaultProxy::start(
        &dir,
        stack.s3_port,
        &[
            "--slowdown-rate",
            "0.15",
            "--timeout-rate",
            "0.05",
            "--timeout-secs",
            "4",
            "--forbid",
            "images/forbidden/",
        ],
    );
    let brokers = stack.brokers();
    let delivered = stack::produce(&brokers, TOPIC, &ev.messages);
    let p = pipeline(&dir, &brokers, &proxy.endpoint(), "w");
    let a = worker(&dir, &p, "a");
    wait_committed(&brokers, &ends(&delivered), Duration::from_secs(300));
    assert_eq!(terminate(a), Some(0));
    // Nothing lost, nothing twice: transient faults were retried, the 403s
    // are dead letters of kind object_forbidden.
    let out = check(&brokers, &stack.s3_dir, &input, &ev, 0);
    let stats = proxy.stats();
    eprintln!("S3 fault proxy: {stats}");
    let n = |k: &str| stats[k].as_u64().unwrap_or(0);
    assert!(n("injected_503") >= 20, "too few 503s to prove anything");
    assert!(n("injected_timeouts") >= 5, "too few timeouts");
    assert_eq!(
        n("injected_403"),
        forbidden,
        "each 403 asked once, not retried"
    );
    eprintln!(
        "with 20% S3 faults: {} Parquet rows, {} embeddings, {} dead letters ({forbidden} forbidden)",
        out.parquet.len(),
        out.embeddings.len(),
        out.dead.len()
    );
}

/// The scenario, as a new user would meet it: one worker embeds and
/// commits a first wave; a second worker joins while the coordinator takes
/// 15 s to answer the first offset lookups (it is loading, or moving). The
/// lookups must be retried, never read as "nothing committed": a worker that
/// read them so deleted every committed file of its partitions, and those
/// rows were never written again.
#[test]
fn a_slow_offset_lookup_never_deletes_committed_output() {
    let _one = one_at_a_time();
    let dir = scratch("stream-slow-lookup");
    let armed = dir.join("arm-offset-fetch");
    let stack = Stack::start_with_kafka_faults(
        &dir,
        &TOPICS,
        &BUCKETS,
        &[
            "--hold-api",
            "9",
            "--hold-secs",
            "15",
            "--hold-count",
            "4",
            "--armed-file",
            armed.to_str().expect("utf8"),
        ],
    );
    let brokers = stack.brokers();
    let input = build_input(&dir, 600, 91);
    let ev = to_kafka(&input, &stack.s3_dir);
    let (first, second) = ev.messages.split_at(400);
    let mut delivered = stack::produce(&brokers, TOPIC, first);
    let p = pipeline(&dir, &brokers, &stack.s3_endpoint(), "w");
    let a = worker(&dir, &p, "a");
    wait_committed(&brokers, &ends(&delivered), Duration::from_secs(120));
    let rows_before = read_parquet(&stack.s3_dir.join("output/embeddings")).len();

    // The coordinator turns slow; a second worker joins: every partition is
    // assigned again, and the first lookups take 15 s.
    std::fs::write(&armed, b"").expect("arm");
    let b = worker(&dir, &p, "b");
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.kafka_proxy_stats(&dir)["held"].as_u64().unwrap_or(0) < 2 {
        assert!(Instant::now() < deadline, "no offset lookup was held");
        std::thread::sleep(Duration::from_millis(100));
    }
    delivered.extend(stack::produce(&brokers, TOPIC, second));
    wait_committed(&brokers, &ends(&delivered), Duration::from_secs(180));
    assert_eq!(terminate(a), Some(0));
    assert_eq!(terminate(b), Some(0));
    let stats = stack.kafka_proxy_stats(&dir);
    let out = check(&brokers, &stack.s3_dir, &input, &ev, ev.messages.len());
    eprintln!(
        "slow offset lookups: {} Parquet rows after the first wave, {} in the end, each id once; proxy: {stats}",
        rows_before,
        out.parquet.len()
    );
    assert!(stats["held"].as_u64().unwrap_or(0) >= 2, "{stats}");
}

/// A worker's upload that completes late — its CompleteMultipartUpload held
/// 25 s on the way, while the partition moved to another worker that wrote
/// and committed a larger file of the same name — must not replace that
/// file: the completion is conditional (`If-None-Match: *`), so it fails
/// and the newer file stays.
#[test]
fn a_late_upload_never_replaces_a_newer_file() {
    let _one = one_at_a_time();
    let (dir, stack, input, ev) = setup("stream-late-upload", 500, 97);
    let brokers = stack.brokers();
    let armed = dir.join("arm-late-completes");
    // Worker a's S3 goes through a proxy that holds completions (only while
    // armed); worker b's goes straight to S3.
    let late = stack::FaultProxy::start_named(
        &dir,
        "late",
        stack.s3_port,
        &[
            "--slowdown-rate",
            "0",
            "--hold-complete-secs",
            "25",
            "--armed-file",
            armed.to_str().expect("utf8"),
        ],
    );
    // A first wave small enough that a's ranges end early (the partitions go
    // quiet): their files hold fewer records than the ranges b will cut.
    let (first, second) = ev.messages.split_at(60);
    let mut delivered = stack::produce(&brokers, TOPIC, first);
    std::fs::write(&armed, b"").expect("arm");
    let a = worker(&dir, &pipeline(&dir, &brokers, &late.endpoint(), "a"), "a");
    let deadline = Instant::now() + Duration::from_secs(60);
    while late.stats()["held_completes"].as_u64().unwrap_or(0) < 1 {
        assert!(
            Instant::now() < deadline,
            "worker a never completed an upload"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let held_at = Instant::now();
    let b = worker(
        &dir,
        &pipeline(&dir, &brokers, &stack.s3_endpoint(), "b"),
        "b",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while assignments(&dir, "b") == 0 {
        assert!(Instant::now() < deadline, "worker b got no partitions");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::remove_file(&armed).expect("disarm");
    delivered.extend(stack::produce(&brokers, TOPIC, second));
    wait_committed(&brokers, &ends(&delivered), Duration::from_secs(240));
    // Let the held completions land (late), then look.
    let until = held_at + Duration::from_secs(30);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(terminate(a), Some(0));
    assert_eq!(terminate(b), Some(0));
    let stats = late.stats();
    let out = check(&brokers, &stack.s3_dir, &input, &ev, ev.messages.len());
    eprintln!(
        "late uploads: {} Parquet rows, each id once; proxy of worker a: {stats}",
        out.parquet.len()
    );
}

/// Messages that a careless worker would crash on, or retry forever, go
/// through one worker among ordinary ones: a header name that is not UTF-8
/// (on a good event and on a bad one), thousands of headers, an event just
/// under 1 MiB whose output is over the producer's message size (a dead
/// letter `output_rejected`, itself cut to fit), images with extreme aspect
/// ratios (processed: only their crop is computed). Nothing stops the
/// partition; every good record is written once; the worker never exits on
/// its own.
#[test]
fn poison_messages_never_stop_a_partition() {
    let _one = one_at_a_time();
    let (dir, stack, mut input, mut ev) = setup("stream-poison", 300, 101);
    let brokers = stack.brokers();
    let mut delivered = stack::produce(&brokers, TOPIC, &ev.messages);
    // Images 1 x 100,000 and 100,000 x 1 (a few hundred bytes each).
    for name in ["png-aspect-1x100000.png", "png-aspect-100000x1.png"] {
        std::fs::copy(
            support::fixtures().join("fuzz").join(name),
            stack.s3_dir.join("images").join(name),
        )
        .expect("copy");
    }
    let huge_text = "a very long caption ".repeat(50_000);
    let odd = serde_json::json!([
        {"key": "odd-header-good", "value": serde_json::json!({"id": "odd-header-good", "text": "a red circle"}).to_string(),
         "headers": [[{"hex": "ff fe 74 72 61 63 65".replace(' ', "")}, "x"], ["plain", "y"]]},
        {"key": "odd-header-bad", "value": "{\"id\": \"odd-header-bad\", \"text\": ",
         "headers": [[{"hex": "c3 28".replace(' ', "")}, null]]},
        {"key": "many-headers", "value": serde_json::json!({"id": "many-headers", "text": "a blue star"}).to_string(),
         "headers": (0..3000).map(|i| serde_json::json!([format!("h{i}"), "v"])).collect::<Vec<_>>()},
        {"key": "huge-output", "value": serde_json::json!({"id": "huge-output", "text": huge_text}).to_string()},
        {"key": "aspect-tall", "value": serde_json::json!({"id": "aspect-tall", "image": "s3://images/png-aspect-1x100000.png"}).to_string()},
        {"key": "aspect-wide", "value": serde_json::json!({"id": "aspect-wide", "image": "s3://images/png-aspect-100000x1.png", "text": "a wide one"}).to_string()},
    ]);
    let file = dir.join("odd.json");
    std::fs::write(&file, odd.to_string()).expect("odd messages");
    let out = support::run_ok(
        Command::new(support::python())
            .arg(support::root().join("tests/helpers/produce_odd.py"))
            .args(["--brokers", &brokers, "--topic", TOPIC])
            .arg(&file),
        "produce_odd.py",
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut it = line
            .split_whitespace()
            .map(|v| v.parse::<i64>().expect("number"));
        delivered.push((it.next().expect("p") as i32, it.next().expect("o")));
    }
    for m in odd.as_array().expect("list") {
        let id = m["key"].as_str().expect("key").to_string();
        ev.messages.push((
            id.clone(),
            m["value"].as_str().expect("value").as_bytes().to_vec(),
        ));
        match id.as_str() {
            "odd-header-bad" => {
                ev.bad.insert(id, "invalid_json");
            }
            "huge-output" => {
                ev.bad.insert(id, "output_rejected");
            }
            "aspect-tall" => {
                input.good.insert(id, (true, false));
            }
            "aspect-wide" => {
                input.good.insert(id, (true, true));
            }
            _ => {
                input.good.insert(id, (false, true));
            }
        }
    }
    // Events up to 1 MiB: the generated ones of 5 kB are good here.
    let mut c = pipeline_config(&dir, &brokers, &stack.s3_endpoint(), "w");
    kafka_source(&mut c).max_event_bytes = 1 << 20;
    let small_now: Vec<String> = ev
        .bad
        .iter()
        .filter(|(_, k)| **k == "event_too_large")
        .map(|(id, _)| id.clone())
        .collect();
    for id in small_now {
        ev.bad.remove(&id);
        input.good.insert(id, (false, true));
    }
    let mut w = worker(&dir, &write_pipeline(&dir, "w", &c), "w");
    wait_committed(&brokers, &ends(&delivered), Duration::from_secs(240));
    assert_eq!(w.exited(), None, "the worker exited on its own");
    assert_eq!(terminate(w), Some(0));
    let out = check(&brokers, &stack.s3_dir, &input, &ev, 0);
    let dead = |id: &str| {
        out.dead
            .iter()
            .find(|d| d.key.as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no dead letter for {id}"))
    };
    let bad = dead("odd-header-bad");
    assert!(
        bad.headers.keys().any(|k| k == "\\xc3("),
        "the header whose name is not UTF-8 is kept, escaped: {:?}",
        bad.headers.keys().collect::<Vec<_>>()
    );
    let huge = dead("huge-output");
    assert_eq!(huge.headers["clipstream.stage"], "output");
    assert!(huge.headers["clipstream.reason"].contains("message.max.bytes"));
    assert_eq!(huge.headers["clipstream.original.truncated"], "true");
    assert_eq!(huge.headers["clipstream.original.sha256"].len(), 64);
    eprintln!(
        "poison messages: {} Parquet rows, {} dead letters (the huge one cut to {} bytes)",
        out.parquet.len(),
        out.dead.len(),
        huge.value.len()
    );
}

/// Object bodies that stop arriving (the response head and half the bytes,
/// then nothing) are timed out and retried; bodies sent without their size
/// are still held to `max_object_bytes` as they stream.
#[test]
fn stalled_and_unsized_s3_bodies_are_bounded_and_retried() {
    let _one = one_at_a_time();
    let (dir, stack, input, ev) = setup("stream-s3-bodies", 400, 103);
    let brokers = stack.brokers();
    let armed = dir.join("arm-stall");
    let proxy = stack::FaultProxy::start(
        &dir,
        stack.s3_port,
        &[
            "--slowdown-rate",
            "0",
            "--stall-body-secs",
            "5",
            "--no-content-length",
            "--armed-file",
            armed.to_str().expect("utf8"),
        ],
    );
    std::fs::write(&armed, b"").expect("arm");
    let delivered = stack::produce(&brokers, TOPIC, &ev.messages);
    let w = worker(&dir, &pipeline(&dir, &brokers, &proxy.endpoint(), "w"), "w");
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.stats()["stalled_bodies"].as_u64().unwrap_or(0) < 5 {
        assert!(Instant::now() < deadline, "no body stalled");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::remove_file(&armed).expect("disarm");
    wait_committed(&brokers, &ends(&delivered), Duration::from_secs(240));
    assert_eq!(terminate(w), Some(0));
    let out = check(&brokers, &stack.s3_dir, &input, &ev, 0);
    let stats = proxy.stats();
    eprintln!(
        "stalled and unsized bodies: {} Parquet rows, {} dead letters; proxy: {stats}",
        out.parquet.len(),
        out.dead.len()
    );
    assert!(
        stats["unsized_bodies"].as_u64().unwrap_or(0) > 100,
        "{stats}"
    );
}

/// Chaos: two workers in a group over Kafka + S3 while, round after round,
/// a worker is SIGKILLed and restarted, S3 stops answering for longer than
/// the session timeout and the poll interval, the coordinator sits on offset
/// lookups for longer than a lookup may take, and bad events, odd Kafka
/// headers, extreme images and an output too large for its topic arrive
/// among the good ones. At the end every good record is in Parquet exactly
/// once, every bad one is a dead letter with its kind, and no worker ever
/// exited on its own (or was evicted for not polling).
#[test]
fn chaos_loses_nothing_and_no_worker_stops_on_its_own() {
    let _one = one_at_a_time();
    let dir = scratch("stream-chaos");
    let lookups = dir.join("arm-offset-fetch");
    let stack = Stack::start_with_kafka_faults(
        &dir,
        &TOPICS,
        &BUCKETS,
        &[
            "--hold-api",
            "9",
            "--hold-secs",
            "12",
            "--hold-count",
            "1000",
            "--armed-file",
            lookups.to_str().expect("utf8"),
        ],
    );
    let brokers = stack.brokers();
    let mut input = build_input(&dir, 1500, 107);
    let mut ev = to_kafka(&input, &stack.s3_dir);
    for name in ["png-aspect-1x100000.png", "png-aspect-100000x1.png"] {
        std::fs::copy(
            support::fixtures().join("fuzz").join(name),
            stack.s3_dir.join("images").join(name),
        )
        .expect("copy");
    }
    let outage = dir.join("arm-s3");
    let proxy = stack::FaultProxy::start(
        &dir,
        stack.s3_port,
        &[
            "--slowdown-rate",
            "0.5",
            "--timeout-rate",
            "0.5",
            "--timeout-secs",
            "12",
            "--armed-file",
            outage.to_str().expect("utf8"),
        ],
    );
    let mut c = pipeline_config(&dir, &brokers, &proxy.endpoint(), "w");
    let k = kafka_source(&mut c);
    k.max_event_bytes = 1 << 20;
    // Evicted if the poll loop ever stops for 8 s.
    k.options
        .insert("max.poll.interval.ms".into(), "8000".into());
    let p = write_pipeline(&dir, "w", &c);
    // Generated events of 5 kB are good with 1 MiB events.
    let small_now: Vec<String> = ev
        .bad
        .iter()
        .filter(|(_, k)| **k == "event_too_large")
        .map(|(id, _)| id.clone())
        .collect();
    for id in small_now {
        ev.bad.remove(&id);
        input.good.insert(id, (false, true));
    }

    let mut next = clock_seeded("chaos");
    let mut a = worker(&dir, &p, "a");
    let mut b = worker(&dir, &p, "b");
    let mut delivered = Vec::new();
    let waves: Vec<Vec<(String, Vec<u8>)>> = ev
        .messages
        .chunks(ev.messages.len().div_ceil(6))
        .map(<[_]>::to_vec)
        .collect();
    let mut log = Vec::new();
    for (round, wave) in waves.iter().enumerate() {
        delivered.extend(stack::produce(&brokers, TOPIC, wave));
        // Odd messages with every other wave.
        if round % 2 == 0 {
            let odd = serde_json::json!([
                {"key": format!("odd-header-{round}"), "value": serde_json::json!({"id": format!("odd-header-{round}"), "text": "a red circle"}).to_string(),
                 "headers": [[{"hex": "fffe6869"}, "x"]]},
                {"key": format!("huge-{round}"), "value": serde_json::json!({"id": format!("huge-{round}"), "text": "long caption ".repeat(80_000)}).to_string()},
                {"key": format!("aspect-{round}"), "value": serde_json::json!({"id": format!("aspect-{round}"), "image": "s3://images/png-aspect-1x100000.png"}).to_string()},
            ]);
            let file = dir.join(format!("odd-{round}.json"));
            std::fs::write(&file, odd.to_string()).expect("odd");
            let out = support::run_ok(
                Command::new(support::python())
                    .arg(support::root().join("tests/helpers/produce_odd.py"))
                    .args(["--brokers", &brokers, "--topic", TOPIC])
                    .arg(&file),
                "produce_odd.py",
            );
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let mut it = line
                    .split_whitespace()
                    .map(|v| v.parse::<i64>().expect("number"));
                delivered.push((it.next().expect("p") as i32, it.next().expect("o")));
            }
            for m in odd.as_array().expect("list") {
                let id = m["key"].as_str().expect("key").to_string();
                ev.messages.push((
                    id.clone(),
                    m["value"].as_str().expect("value").as_bytes().to_vec(),
                ));
                if id.starts_with("huge-") {
                    ev.bad.insert(id, "output_rejected");
                } else if id.starts_with("aspect-") {
                    input.good.insert(id, (true, false));
                } else {
                    input.good.insert(id, (false, true));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500 + next() % 1500));
        for (name, w) in [("a", &mut a), ("b", &mut b)] {
            assert_eq!(
                w.exited(),
                None,
                "worker {name} exited on its own (round {round})"
            );
        }
        match (round + next() as usize) % 3 {
            0 => {
                // SIGKILL b while offset lookups hang: the restart's
                // assignment must wait for them, deleting nothing.
                log.push("kill + slow lookups");
                std::fs::write(&lookups, b"").expect("arm");
                signal(&b, "-KILL");
                drop(b);
                b = worker(&dir, &p, "b");
                std::thread::sleep(Duration::from_secs(14));
                std::fs::remove_file(&lookups).expect("disarm");
            }
            1 => {
                // S3 answers nothing or 503 for longer than the session and
                // the poll interval.
                log.push("S3 outage");
                std::fs::write(&outage, b"").expect("arm");
                std::thread::sleep(Duration::from_secs(10));
                std::fs::remove_file(&outage).expect("disarm");
            }
            _ => {
                log.push("kill");
                signal(&a, "-KILL");
                drop(a);
                a = worker(&dir, &p, "a");
            }
        }
    }
    let _ = std::fs::remove_file(&lookups);
    let _ = std::fs::remove_file(&outage);
    wait_committed(&brokers, &ends(&delivered), Duration::from_secs(400));
    for (name, w) in [("a", &mut a), ("b", &mut b)] {
        assert_eq!(w.exited(), None, "worker {name} exited on its own");
    }
    assert_eq!(terminate(a), Some(0));
    assert_eq!(terminate(b), Some(0));
    for name in ["a", "b"] {
        let text = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
        assert!(
            !text.contains("maximum poll interval") && !text.contains("MAXPOLL"),
            "worker {name} was evicted for not polling"
        );
    }
    let out = check(&brokers, &stack.s3_dir, &input, &ev, ev.messages.len());
    eprintln!(
        "chaos ({}): {} Parquet rows (each id once), {} embeddings for {} ids, {} dead letters for {}; S3 proxy {}; Kafka proxy {}",
        log.join(", "),
        out.parquet.len(),
        out.embeddings.len(),
        input.good.len(),
        out.dead.len(),
        ev.bad.len(),
        proxy.stats(),
        stack.kafka_proxy_stats(&dir)
    );
}
