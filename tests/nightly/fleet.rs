//! Nights run by a Kafka fleet: tombstones for removed products, and two
//! workers running two nights at the scale.

use super::*;

/// The products a night removed become tombstones on the embeddings topic
/// (a real Kafka-protocol broker, tansu): the id as key, no value, after
/// the night's new embeddings; publishing again on a rerun is harmless.
#[test]
fn removed_products_become_tombstones_on_the_embeddings_topic() {
    let root = scratch("nightly-tombstones");
    let stack = stack::Stack::start(&root, &[("embeddings", 1)], &["unused"]);
    let images = root.join("catalog");
    std::fs::create_dir_all(&images).expect("images");
    let mut products: Vec<(String, String, String)> = (0..20u32)
        .map(|k| {
            (
                format!("sku-{k}"),
                image(&images, &format!("p{k}.png"), k),
                format!("product {k}"),
            )
        })
        .collect();
    let catalog = images.join("catalog.jsonl");
    write_catalog(&catalog, &products);
    let night = |name: &str| {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("night dir");
        let text = format!(
            "{model}\n[source]\nkind = \"files\"\nmanifest = \"{manifest}\"\n\n\
             [fetch]\nroot = \"{root}\"\n\n[sink.parquet]\ndir = \"{out}\"\n\n\
             [sink.kafka]\nbrokers = \"{brokers}\"\nembeddings_topic = \"embeddings\"\n",
            model = model_section(),
            manifest = dir.join("events.jsonl").display(),
            root = support::root().display(),
            out = dir.join("out").display(),
            brokers = stack.brokers(),
        );
        let cfg = parse_pipeline(&text, &dir);
        let pipeline = write_pipeline(&dir, "pipeline", &cfg);
        Night { dir, pipeline }
    };
    let snap = |n: &Night, previous: Option<&Path>, out: &Path| {
        let output = n.dir.join("out");
        let mut args = vec![
            "snapshot",
            "--night",
            s(&n.dir),
            "--output",
            s(&output),
            "--out",
            s(out),
            "--pipeline",
            s(&n.pipeline),
        ];
        if let Some(p) = previous {
            args.extend(["--previous", s(p)]);
        }
        ok(&args)
    };
    let n1 = night("night-1");
    plan(&n1, &catalog, None);
    run(&n1);
    let snap1 = root.join("snap-1");
    let out = snap(&n1, None, &snap1);
    assert!(out.contains("tombstones: 0 on embeddings"), "{out}");

    products.retain(|p| p.0 != "sku-1" && p.0 != "sku-4");
    write_catalog(&catalog, &products);
    let n2 = night("night-2");
    let p = plan(&n2, &catalog, Some(&snap1));
    assert_eq!(p["deleted"], 2, "{p}");
    run(&n2);
    let snap2 = root.join("snap-2");
    let out = snap(&n2, Some(&snap1), &snap2);
    assert!(out.contains("tombstones: 2 on embeddings"), "{out}");
    // A rerun of a finished night's snapshot keeps it: its tombstones went
    // out before it was in place.
    let out = snap(&n2, Some(&snap1), &snap2);
    assert!(out.contains("finished snapshot (kept"), "{out}");
    assert!(!out.contains("tombstones:"), "{out}");

    let msgs = stack::read_topic(
        &stack.brokers(),
        "embeddings",
        1,
        std::time::Duration::from_secs(30),
        |m| m.len() >= 22,
    );
    let tombstones: Vec<&str> = msgs
        .iter()
        .filter(|m| m.null)
        .filter_map(|m| m.key.as_deref())
        .collect();
    assert_eq!(tombstones, ["sku-1", "sku-4"], "{msgs:?}");
    // Night 1's twenty embeddings came first, every one with a value.
    assert_eq!(msgs.iter().filter(|m| !m.null).count(), 20, "{msgs:?}");
    let first_tombstone = msgs.iter().position(|m| m.null).expect("tombstones");
    assert!(msgs[..first_tombstone].iter().all(|m| !m.null));
}

/// The night as a worker fleet runs it (the "done when"): a catalog
/// of `s3://` images (s3s-fs), two long-running workers of one consumer
/// group (tansu), writing Parquet to S3; each night `plan --publish` puts
/// the work on their topic and, once the group has committed it,
/// `snapshot` writes the night's table to S3. Night 1 is 2,000 products.
/// On night 2 (100 images replaced, 60 titles edited, 40 new products, 20
/// removed: 5%, 3%, 2%, 1%), run as the Helm CronJob runs it (`clipstream
/// night`), only those 200 are embedded, the snapshot has one row per
/// product, the removed ones are tombstones, and `search` over the snapshot
/// on S3 finds a replaced image's product with tonight's embedding.
#[test]
fn a_two_worker_fleet_runs_two_nights() {
    use support::streaming::{TOPICS, pipeline_config, terminate, worker};
    let root = scratch("nightly-fleet");
    let stack = stack::Stack::start(&root, &TOPICS, &["images", "output"]);
    let objects = stack.s3_dir.join("images").join("cat");
    std::fs::create_dir_all(&objects).expect("objects");
    let product = |k: u32| {
        (
            format!("sku-{k:04}"),
            format!("s3://images/cat/p{k:04}.png"),
            format!("product {k}"),
        )
    };
    let mut products: Vec<(String, String, String)> = (0..2000u32)
        .map(|k| {
            image(&objects, &format!("p{k:04}.png"), k);
            product(k)
        })
        .collect();
    let catalog = root.join("catalog.jsonl");
    write_catalog(&catalog, &products);
    let run_ok = |args: &[&str]| -> String {
        let out = std::process::Command::new(bin())
            .args(args)
            .env("AWS_ACCESS_KEY_ID", stack::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", stack::SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .expect("clipstream runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "clipstream {args:?}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    // The fleet: long-running, as in production; its output is one S3
    // folder, night after night. (Stopping every worker between nights and
    // starting new ones stalls on tansu: after all members left, with
    // LeaveGroup acknowledged, its JoinGroup answers still name a departed
    // member as leader, so SyncGroup never completes; seen in librdkafka's
    // cgrp debug log. A Kafka broker would rebalance.)
    let mut cfg = pipeline_config(&root, &stack.brokers(), &stack.s3_endpoint(), "fleet");
    cfg.sink.parquet.url = Some("s3://output/fleet/".into());
    let pipeline = write_pipeline(&root, "fleet", &cfg);
    // Each worker with its own /metrics (the night's progress).
    let addrs = ["a", "b"].map(|_| format!("127.0.0.1:{}", stack::free_port()));
    let workers = [("a", &addrs[0]), ("b", &addrs[1])].map(|(name, addr)| {
        let mut c = cfg.clone();
        c.metrics.listen = Some(addr.clone());
        worker(&root, &write_pipeline(&root, name, &c), name)
    });
    let on_s3 = |path: &str| stack.s3_dir.join("output").join(path);
    let snapshot_args = |name: &str, previous: Option<&str>| -> Vec<String> {
        let mut args: Vec<String> = [
            "snapshot",
            "--night",
            s(&root.join(name)),
            "--output",
            "s3://output/fleet/",
            "--out",
            &format!("s3://output/snapshots/{name}/"),
            "--pipeline",
            s(&pipeline),
            "--wait",
            "120",
        ]
        .map(String::from)
        .to_vec();
        if let Some(p) = previous {
            args.extend(["--previous".into(), format!("s3://output/snapshots/{p}/")]);
        }
        args
    };
    // One night: plan and publish, then snapshot (with tombstones) once the
    // group has committed everything.
    let night = |name: &str, previous: Option<&str>| -> (Value, String) {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("night dir");
        let previous_url = previous.map(|p| format!("s3://output/snapshots/{p}/"));
        let mut args = vec![
            "plan",
            "--json",
            "--publish",
            "--catalog",
            s(&catalog),
            "--pipeline",
            s(&pipeline),
            "--night",
            s(&dir),
            "--text-column",
            "title",
        ];
        if let Some(p) = &previous_url {
            args.extend(["--previous", p.as_str()]);
        }
        let plan: Value = serde_json::from_str(&run_ok(&args)).expect("plan --json");
        // `snapshot --wait` waits for the group to commit what the plan
        // published (the offsets the plan recorded).
        let args = snapshot_args(name, previous);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        (plan, run_ok(&args))
    };

    let (p1, out) = night("night-1", None);
    assert_eq!(
        (p1["planned"].as_u64(), p1["published"].as_u64()),
        (Some(2000), Some(2000)),
        "{p1}"
    );
    assert_eq!(
        read_parquet(&on_s3("fleet")).len(),
        2000,
        "night 1's output"
    );
    assert!(out.contains("2000 rows"), "{out}");
    assert!(on_s3("snapshots/night-1/_snapshot.json").is_file());

    // Night 2: 5% of the images replaced, 3% of the titles edited, 1%
    // removed, 2% new products.
    for k in (0..2000u32).filter(|k| k % 20 == 3) {
        image(&objects, &format!("p{k:04}.png"), k + 5000);
    }
    for k in (0..2000usize).filter(|k| [5, 25, 45].contains(&(k % 100))) {
        products[k].2 = format!("product {k}, renamed");
    }
    products.retain(|p| !p.0.ends_with("10"));
    for k in 2000..2040u32 {
        image(&objects, &format!("p{k:04}.png"), k);
        products.push(product(k));
    }
    write_catalog(&catalog, &products);
    // Night 2 as the chart's CronJob runs it: one command, which finds the
    // previous snapshot itself.
    let out = run_ok(&[
        "night",
        "--name",
        "night-2",
        "--catalog",
        s(&catalog),
        "--pipeline",
        s(&pipeline),
        "--snapshots",
        "s3://output/snapshots",
        "--work",
        s(&root),
        "--text-column",
        "title",
        "--wait",
        "120",
    ]);
    assert!(
        out.contains("previous snapshot: s3://output/snapshots/night-1/"),
        "{out}"
    );
    let p2: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("night-2/plan.json")).expect("plan.json"),
    )
    .expect("plan.json");
    let got = [
        "new",
        "changed_image",
        "changed_text",
        "deleted",
        "planned",
        "published",
    ]
    .map(|k| p2[k].as_u64().unwrap_or(u64::MAX));
    assert_eq!(got, [40, 100, 60, 20, 200, 200], "{p2}");
    // The fleet embedded night 1's 2,000 and night 2's 200, nothing more.
    assert_eq!(
        read_parquet(&on_s3("fleet")).len(),
        2200,
        "the fleet's output"
    );
    assert!(out.contains("2020 rows"), "{out}");
    assert!(out.contains("tombstones: 20 on embeddings"), "{out}");
    let rows = rows_by_id(&on_s3("snapshots/night-2"));
    assert_eq!(rows.len(), 2020);
    assert!(!rows.contains_key("sku-0010") && rows.contains_key("sku-2039"));
    assert_eq!(rows["sku-0025"]["text"], "product 25, renamed");
    // The night's snapshot, searched on S3 with a replaced image: its
    // product comes first, with tonight's embedding.
    let model = support::model();
    let found: Value = serde_json::from_str(&run_ok(&[
        "search",
        "s3://output/snapshots/night-2/",
        "--pipeline",
        s(&pipeline),
        "--model",
        s(&model),
        "--image",
        s(&objects.join("p0003.png")),
        "-k",
        "20",
        "--json",
    ]))
    .expect("search --json");
    // (Plain-colour images can share their embedding: the product is among
    // the best, with the image's own embedding, not night 1's.)
    let hits = found["results"][0]["hits"].as_array().expect("hits");
    let best = hits[0]["score"].as_f64().expect("score");
    let mine = hits
        .iter()
        .find(|h| h["id"] == "sku-0003")
        .unwrap_or_else(|| panic!("sku-0003 not found: {found}"));
    assert!(
        best > 0.999 && mine["score"].as_f64() == Some(best),
        "{found}"
    );
    // The workers show what each night planned (from the events' headers),
    // for the dashboard's progress panels.
    let metrics: String = addrs
        .iter()
        .map(|a| support::http_get(a, "/metrics").1)
        .collect();
    for line in [
        "clipstream_night_planned{night=\"night-1\"} 2000",
        "clipstream_night_planned{night=\"night-2\"} 200",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}:\n{metrics}");
    }
    // A rerun of the night's snapshot keeps the finished one on S3.
    let args = snapshot_args("night-2", Some("night-1"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let kept = run_ok(&args);
    assert!(kept.contains("finished snapshot (kept"), "{kept}");
    for w in workers {
        assert_eq!(terminate(w), Some(0));
    }
}
