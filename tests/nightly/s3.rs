//! Nights over S3: images compared by their listed ETags, snapshots that
//! count only with their marker, and `snapshot --wait` on a fleet behind.

use super::*;

/// `s3://` images without a change column: their tokens are the ETags of
/// one listing (the S3 server is real, s3s-fs on loopback), nothing is
/// downloaded to plan, and a replaced object is a changed image. The
/// planned events then run through the S3 fetch as any others.
#[test]
fn s3_images_are_compared_by_their_listed_etags() {
    let root = scratch("nightly-s3");
    let stack = stack::Stack::s3_only(&root, &["shop"]);
    let objects = stack.s3_dir.join("shop").join("img");
    std::fs::create_dir_all(&objects).expect("objects");
    let products: Vec<(String, String, String)> = (0..12u32)
        .map(|k| {
            image(&objects, &format!("p{k:02}.png"), k);
            (
                format!("sku-{k:02}"),
                format!("s3://shop/img/p{k:02}.png"),
                format!("product {k}"),
            )
        })
        .collect();
    let catalog = root.join("catalog.jsonl");
    write_catalog(&catalog, &products);

    let night = |name: &str| {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("night dir");
        let text = format!(
            "{model}\n[source]\nkind = \"files\"\nmanifest = \"{manifest}\"\n\n\
             [s3]\nendpoint = \"{endpoint}\"\nforce_path_style = true\n\n\
             [fetch]\nallowed_schemes = [\"s3\"]\nallowed_buckets = [\"shop\"]\n\n[sink.parquet]\ndir = \"{out}\"\n",
            model = model_section(),
            manifest = dir.join("events.jsonl").display(),
            endpoint = stack.s3_endpoint(),
            out = dir.join("out").display(),
        );
        let cfg = parse_pipeline(&text, &dir);
        let pipeline = write_pipeline(&dir, "pipeline", &cfg);
        Night { dir, pipeline }
    };
    let with_s3 = |args: &[&str]| {
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
    let plan = |n: &Night, previous: Option<&Path>| -> Value {
        let mut args = vec![
            "plan",
            "--json",
            "--catalog",
            s(&catalog),
            "--pipeline",
            s(&n.pipeline),
            "--night",
            s(&n.dir),
            "--text-column",
            "title",
        ];
        if let Some(p) = previous {
            args.extend(["--previous", s(p)]);
        }
        serde_json::from_str(&with_s3(&args)).expect("plan --json")
    };

    let n1 = night("night-1");
    let p = plan(&n1, None);
    assert_eq!(
        (p["planned"].as_u64(), p["listing_requests"].as_u64()),
        (Some(12), Some(1)),
        "{p}"
    );
    let events = std::fs::read_to_string(n1.dir.join("events.jsonl")).expect("events");
    // s3s-fs's listings carry no ETags (AWS's do): its objects' tokens are
    // their last-modified time and size, from the same listing.
    assert!(
        events.contains("\"clipstream.image_token\":\"etag:")
            || events.contains("\"clipstream.image_token\":\"modified:"),
        "{events}"
    );
    let out = with_s3(&["run", "--no-progress", s(&n1.pipeline)]);
    assert!(out.contains("images encoded"), "{out}");
    let snap1 = root.join("snap-1");
    with_s3(&[
        "snapshot",
        "--night",
        s(&n1.dir),
        "--output",
        s(&n1.dir.join("out")),
        "--out",
        s(&snap1),
    ]);
    assert_eq!(rows_by_id(&snap1).len(), 12);

    // One object replaced, one gone: the first is changed, the second
    // counted as an image that cannot be looked at.
    image(&objects, "p04.png", 200);
    std::fs::remove_file(objects.join("p07.png")).expect("remove");
    let n2 = night("night-2");
    let p = plan(&n2, Some(&snap1));
    assert_eq!(p["changed_image"], 1, "{p}");
    assert_eq!(p["unreadable_images"], 1, "{p}");
    assert_eq!(p["unchanged"], 10, "{p}");
    let events = std::fs::read_to_string(n2.dir.join("events.jsonl")).expect("events");
    assert!(
        events.contains("sku-04") && !events.contains("sku-07"),
        "{events}"
    );

    // The catalog itself may be on S3: the same night, the same plan.
    let shelf = stack.s3_dir.join("shop").join("catalogs");
    std::fs::create_dir_all(&shelf).expect("dir");
    std::fs::copy(&catalog, shelf.join("catalog.jsonl")).expect("copy");
    let n3 = night("night-3");
    let p3: Value = serde_json::from_str(&with_s3(&[
        "plan",
        "--json",
        "--catalog",
        "s3://shop/catalogs/catalog.jsonl",
        "--pipeline",
        s(&n3.pipeline),
        "--night",
        s(&n3.dir),
        "--text-column",
        "title",
        "--previous",
        s(&snap1),
    ]))
    .expect("plan --json");
    for k in ["changed_image", "unreadable_images", "unchanged", "planned"] {
        assert_eq!(p3[k], p[k], "{k}: {p3}");
    }
}

/// Snapshots on S3 are finished only with their marker: a half-uploaded
/// one is refused as a previous snapshot, a rerun completes it (its own
/// objects, same content), and a folder holding other files is refused.
#[test]
fn s3_snapshots_are_finished_only_with_their_marker() {
    let root = scratch("nightly-s3-snapshots");
    let stack = stack::Stack::s3_only(&root, &["output"]);
    let images = root.join("catalog");
    std::fs::create_dir_all(&images).expect("images");
    let products: Vec<(String, String, String)> = (0..10u32)
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
    let dir = root.join("night-1");
    std::fs::create_dir_all(&dir).expect("night");
    let text = format!(
        "{model}\n[source]\nkind = \"files\"\nmanifest = \"{manifest}\"\n\n\
         [s3]\nendpoint = \"{endpoint}\"\nforce_path_style = true\n\n\
         [fetch]\nroot = \"{root}\"\n\n[sink.parquet]\ndir = \"{out}\"\n",
        model = model_section(),
        manifest = dir.join("events.jsonl").display(),
        endpoint = stack.s3_endpoint(),
        root = support::root().display(),
        out = dir.join("out").display(),
    );
    let pipeline = write_pipeline(&dir, "pipeline", &parse_pipeline(&text, &dir));
    let n = Night {
        dir: dir.clone(),
        pipeline: pipeline.clone(),
    };
    plan(&n, &catalog, None);
    run(&n);
    let with_s3 = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .env("AWS_ACCESS_KEY_ID", stack::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", stack::SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .expect("clipstream runs")
    };
    let snapshot_to = |url: &str| {
        with_s3(&[
            "snapshot",
            "--night",
            s(&dir),
            "--output",
            s(&dir.join("out")),
            "--out",
            url,
            "--pipeline",
            s(&pipeline),
        ])
    };
    let out = snapshot_to("s3://output/snaps/n1/");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let marker = stack.s3_dir.join("output/snaps/n1/_snapshot.json");
    assert!(marker.is_file());
    // An upload that died before its marker.
    std::fs::remove_file(&marker).expect("remove marker");
    let n2 = night(&root, "night-2", &model());
    let out = with_s3(&[
        "plan",
        "--catalog",
        s(&catalog),
        "--pipeline",
        s(&pipeline),
        "--night",
        s(&n2.dir),
        "--previous",
        "s3://output/snaps/n1/",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unfinished snapshot"), "{err}");
    // Its rerun finds its own objects and finishes it.
    let out = snapshot_to("s3://output/snaps/n1/");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(marker.is_file(), "the rerun finished the snapshot");
    assert_eq!(rows_by_id(&stack.s3_dir.join("output/snaps/n1")).len(), 10);
    // A folder with someone else's file is not written into.
    let other = stack.s3_dir.join("output/snaps/n1b");
    std::fs::create_dir_all(&other).expect("dir");
    std::fs::write(other.join("part-zzz-00000.parquet"), b"not ours").expect("file");
    let out = snapshot_to("s3://output/snaps/n1b/");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not a file of this snapshot"), "{err}");
    assert!(!other.join("_snapshot.json").exists());
}

/// `snapshot --wait` gives up, naming what is behind, when nobody
/// consumes the night's published events (and writes no snapshot).
#[test]
fn snapshot_wait_gives_up_on_a_fleet_that_is_behind() {
    use support::streaming::{TOPICS, pipeline_config};
    let root = scratch("nightly-wait");
    let stack = stack::Stack::start(&root, &TOPICS, &["images", "output"]);
    let objects = stack.s3_dir.join("images").join("cat");
    std::fs::create_dir_all(&objects).expect("objects");
    let products: Vec<(String, String, String)> = (0..5u32)
        .map(|k| {
            image(&objects, &format!("p{k}.png"), k);
            (
                format!("sku-{k}"),
                format!("s3://images/cat/p{k}.png"),
                format!("product {k}"),
            )
        })
        .collect();
    let catalog = root.join("catalog.jsonl");
    write_catalog(&catalog, &products);
    let cfg = pipeline_config(&root, &stack.brokers(), &stack.s3_endpoint(), "idle");
    let pipeline = write_pipeline(&root, "idle", &cfg);
    let night = root.join("night");
    let with_s3 = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .env("AWS_ACCESS_KEY_ID", stack::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", stack::SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .expect("clipstream runs")
    };
    let out = with_s3(&[
        "plan",
        "--publish",
        "--catalog",
        s(&catalog),
        "--pipeline",
        s(&pipeline),
        "--night",
        s(&night),
        "--text-column",
        "title",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snap = root.join("snapshot");
    let out = with_s3(&[
        "snapshot",
        "--wait",
        "3",
        "--night",
        s(&night),
        "--output",
        s(&root.join("nothing")),
        "--out",
        s(&snap),
        "--pipeline",
        s(&pipeline),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("has not finished the night"), "{err}");
    assert!(
        !snap.exists(),
        "a snapshot was written before the fleet finished"
    );
}
