//! Nightly re-embedding of a local catalog through the binary: `plan` →
//! `run` → `snapshot`, three nights.
//! - Night 1: 60 products → 60 rows.
//! - Night 2: 3 images replaced, 2 titles edited, 2 products new, 1 gone:
//!   only those 7 are encoded (the run's counters), the snapshot has one row
//!   per product, unchanged rows carry night 1's embeddings unchanged,
//!   changed ones equal what a full re-embed gives, the gone one is listed
//!   in the deletions and absent.
//! - Night 3: a renamed copy of the model re-embeds nothing; the same
//!   model with one weight changed re-embeds everything.
//!
//! Reruns keep the plan and the finished snapshot; bad catalog rows are
//! counted.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use support::*;

struct Night {
    dir: PathBuf,
    pipeline: PathBuf,
}

/// A night's folder and the pipeline that runs its plan (model `model`).
fn night(root: &Path, name: &str, model: &Path) -> Night {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("night dir");
    let mut cfg = local_config(&dir, &dir.join("events.jsonl"), &dir.join("out"), 1000);
    cfg.model.dir = model.to_path_buf();
    let pipeline = write_pipeline(&dir, "pipeline", &cfg);
    Night { dir, pipeline }
}

fn ok(args: &[&str]) -> String {
    let out = clipstream(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "clipstream {args:?}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn plan(n: &Night, catalog: &Path, previous: Option<&Path>) -> Value {
    let mut args = vec![
        "plan",
        "--json",
        "--catalog",
        s(catalog),
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
    serde_json::from_str(&ok(&args)).expect("plan --json")
}

/// Runs the night's plan; returns (images encoded, texts encoded).
fn run(n: &Night) -> (u64, u64) {
    let out = ok(&["run", "--no-progress", s(&n.pipeline)]);
    let count = |what: &str| -> u64 {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(what))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {what:?} in:\n{out}"))
    };
    (count("images encoded"), count("texts encoded"))
}

fn snapshot(n: &Night, previous: Option<&Path>, out: &Path) -> String {
    let output = n.dir.join("out");
    let mut args = vec![
        "snapshot",
        "--night",
        s(&n.dir),
        "--output",
        s(&output),
        "--out",
        s(out),
    ];
    if let Some(p) = previous {
        args.extend(["--previous", s(p)]);
    }
    ok(&args)
}

/// id → row of a snapshot; each id exactly once.
fn rows_by_id(dir: &Path) -> HashMap<String, Value> {
    let mut by_id = HashMap::new();
    for r in read_parquet(dir) {
        let id = r["id"].as_str().expect("id").to_string();
        assert!(by_id.insert(id.clone(), r).is_none(), "{id} twice");
    }
    by_id
}

fn write_catalog(path: &Path, products: &[(String, String, String)]) {
    let mut text = String::new();
    for (id, image, title) in products {
        text.push_str(&json!({"id": id, "image": image, "title": title}).to_string());
        text.push('\n');
    }
    std::fs::write(path, text).expect("catalog");
}

/// Products `ks` of a local catalog: id, an image written into `images`,
/// a title.
fn local_products(images: &Path, ks: std::ops::Range<u32>) -> Vec<(String, String, String)> {
    ks.map(|k| {
        (
            format!("sku-{k:03}"),
            image(images, &format!("p{k:03}.png"), k),
            format!("product number {k}"),
        )
    })
    .collect()
}

fn image(dir: &Path, name: &str, k: u32) -> String {
    let rgb = [
        (k * 37 % 256) as u8,
        (k * 91 % 256) as u8,
        (k * 53 % 256) as u8,
    ];
    std::fs::write(dir.join(name), solid_png(40 + k % 7, 30 + k % 5, rgb)).expect("image");
    name.to_string()
}

#[test]
fn three_nights_embed_only_what_changed() {
    let root = scratch("nightly");
    let images = root.join("catalog");
    std::fs::create_dir_all(&images).expect("images");
    let model = model();

    // Night 1.
    let mut products = local_products(&images, 0..60);
    let catalog = images.join("catalog.jsonl");
    write_catalog(&catalog, &products);
    let n1 = night(&root, "night-1", &model);
    let p = plan(&n1, &catalog, None);
    assert_eq!(
        (p["new"].as_u64(), p["planned"].as_u64()),
        (Some(60), Some(60)),
        "{p}"
    );
    assert_eq!(run(&n1), (60, 60));
    let snap1 = root.join("snapshots/night-1");
    snapshot(&n1, None, &snap1);
    let rows1 = rows_by_id(&snap1);
    assert_eq!(rows1.len(), 60);

    // Night 2: 3 images replaced, 2 titles edited, 2 new, 1 removed.
    for k in [3u32, 17, 42] {
        image(&images, &format!("p{k:03}.png"), k + 100);
    }
    products[5].2 = "an edited title".into();
    products[33].2 = "another edited title".into();
    products.extend(local_products(&images, 60..62));
    let gone = products.remove(50).0;
    write_catalog(&catalog, &products);
    let n2 = night(&root, "night-2", &model);
    let p = plan(&n2, &catalog, Some(&snap1));
    let counts = |p: &Value| {
        [
            "new",
            "changed_image",
            "changed_text",
            "changed_model",
            "unchanged",
            "deleted",
            "planned",
        ]
        .map(|k| p[k].as_u64().unwrap_or(u64::MAX))
    };
    assert_eq!(counts(&p), [2, 3, 2, 0, 54, 1, 7], "{p}");
    let deletions = std::fs::read_to_string(n2.dir.join("deletions.jsonl")).expect("deletions");
    assert_eq!(deletions.trim(), json!({"id": gone}).to_string());
    // Planning the night again keeps its plan (a rerun resumes the same work).
    assert_eq!(plan(&n2, &catalog, Some(&snap1)), p);
    // Only the planned products are encoded: a 5% night is not a full night.
    assert_eq!(run(&n2), (7, 7));
    let snap2 = root.join("snapshots/night-2");
    // What a snapshot killed part way leaves: its hidden folder, of a
    // process that is gone (a pid above Linux's maximum). It is removed and
    // the night's snapshot written as if nothing had happened.
    let abandoned = root.join("snapshots/.night-2.partial-4194305");
    std::fs::create_dir_all(&abandoned).expect("partial");
    std::fs::write(abandoned.join("part-x-00000.parquet"), b"half a file").expect("partial");
    snapshot(&n2, Some(&snap1), &snap2);
    assert!(
        !abandoned.exists(),
        "the abandoned partial snapshot is still there"
    );
    let rows2 = rows_by_id(&snap2);
    assert_eq!(rows2.len(), 61);
    assert!(!rows2.contains_key(&gone));
    // A full re-embed of night 2's catalog, for comparison.
    let full = night(&root, "night-2-full", &model);
    plan(&full, &catalog, None);
    run(&full);
    let full_rows: HashMap<String, Value> = read_parquet(&full.dir.join("out"))
        .into_iter()
        .map(|r| (r["id"].as_str().expect("id").to_string(), r))
        .collect();
    assert_eq!(full_rows.len(), 61);
    for (id, row) in &rows2 {
        let expect = &full_rows[id];
        for col in ["image_embedding", "text_embedding"] {
            let c = cosine(&floats(&row[col]), &floats(&expect[col]));
            assert!(c > 0.99999, "{id} {col}: cosine {c} to a full re-embed");
        }
        if let Some(old) = rows1.get(id)
            && !["sku-003", "sku-017", "sku-042", "sku-005", "sku-033"].contains(&id.as_str())
        {
            // Carried over: night 1's row, not a new encode.
            assert_eq!(row["image_embedding"], old["image_embedding"], "{id}");
            assert!(row["processed_at_ms"].is_i64(), "{row}");
            assert_eq!(row["processed_at_ms"], old["processed_at_ms"], "{id}");
        }
    }
    assert_eq!(rows2["sku-005"]["text"], "an edited title");
    // Snapshotting the night again keeps the finished snapshot.
    let again = snapshot(&n2, Some(&snap1), &snap2);
    assert!(again.contains("finished snapshot (kept"), "{again}");
    assert_eq!(rows_by_id(&snap2).len(), 61);

    // Night 3: a renamed copy of the model changes nothing ...
    let copy = root.join("renamed-model");
    copy_dir(&model, &copy);
    let n3 = night(&root, "night-3-renamed", &copy);
    let p = plan(&n3, &catalog, Some(&snap2));
    assert_eq!(counts(&p), [0, 0, 0, 0, 61, 0, 0], "{p}");
    // ... one changed weight re-embeds everything.
    let changed = root.join("changed-model");
    copy_dir(&model, &changed);
    change_one_weight(&changed.join("text_model.onnx"));
    let n3 = night(&root, "night-3-changed", &changed);
    let p = plan(&n3, &catalog, Some(&snap2));
    assert_eq!(counts(&p), [0, 0, 0, 61, 0, 0, 61], "{p}");
    // A night's kept plan is for one model: rerunning it with another is
    // refused, not mixed.
    let mixed = night(&root, "night-3-renamed", &changed);
    let err = plan_err(&mixed, &catalog, &snap2, &[]);
    assert!(err.contains("holds a plan for the model"), "{err}");

    // A broken export must not empty the index: an empty catalog is an
    // error; one that would delete more than 10% is refused ...
    let empty = images.join("empty.jsonl");
    std::fs::write(&empty, "").expect("empty");
    let err = plan_err(&night(&root, "night-4", &model), &empty, &snap2, &[]);
    assert!(err.contains("no usable row"), "{err}");
    let half = images.join("half.jsonl");
    write_catalog(&half, &products[..30]);
    let err = plan_err(&night(&root, "night-5", &model), &half, &snap2, &[]);
    assert!(err.contains("would delete 31 of the 61"), "{err}");
    // ... unless allowed; and rows that could not be read hold deletions
    // back (they may be the products that look gone).
    let n6 = night(&root, "night-6", &model);
    ok(&[
        "plan",
        "--catalog",
        s(&half),
        "--pipeline",
        s(&n6.pipeline),
        "--night",
        s(&n6.dir),
        "--text-column",
        "title",
        "--previous",
        s(&snap2),
        "--max-deleted-percent",
        "60",
    ]);
    let garbled = images.join("garbled.jsonl");
    let mut text = std::fs::read_to_string(&catalog).expect("catalog");
    text = text.replacen("{\"id\":\"sku-000\"", "{\"id\":\"sku-000\" garbage", 1);
    std::fs::write(&garbled, text).expect("garbled");
    let p = plan(&night(&root, "night-7", &model), &garbled, Some(&snap2));
    assert_eq!(
        (p["deleted"].as_u64(), p["deletions_held"].as_u64()),
        (Some(0), Some(1)),
        "{p}"
    );
}

/// `plan` that must fail; its stderr.
fn plan_err(n: &Night, catalog: &Path, previous: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "plan",
        "--catalog",
        s(catalog),
        "--pipeline",
        s(&n.pipeline),
        "--night",
        s(&n.dir),
        "--text-column",
        "title",
        "--previous",
        s(previous),
    ];
    args.extend(extra);
    let out = clipstream(&args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    err
}

#[test]
fn bad_catalog_rows_are_counted_and_bad_catalogs_named() {
    let root = scratch("nightly-bad");
    let images = root.join("catalog");
    std::fs::create_dir_all(&images).expect("images");
    let a = image(&images, "a.png", 1);
    let catalog = images.join("catalog.jsonl");
    std::fs::write(
        &catalog,
        format!(
            "{}\n{}\nnot json\n{}\n{}\n{}\n",
            json!({"id": "x", "image": a, "title": "first"}),
            json!({"image": a, "title": "no id"}),
            json!({"id": "x", "image": a, "title": "second: wins"}),
            json!({"id": "y", "image": "missing.png", "title": "t"}),
            json!({"id": "z", "title": "text only"}),
        ),
    )
    .expect("catalog");
    let n = night(&root, "night", &model());
    let p = plan(&n, &catalog, None);
    assert_eq!(p["catalog_rows"], 4, "{p}");
    assert_eq!(p["duplicate_ids"], 1, "{p}");
    assert_eq!(p["bad_rows"], 2, "{p}");
    assert_eq!(p["unreadable_images"], 1, "{p}");
    assert_eq!(p["planned"], 2, "{p}");
    let events = std::fs::read_to_string(n.dir.join("events.jsonl")).expect("events");
    assert!(events.contains("second: wins"), "{events}");

    // A CSV without the configured column, and previous output that is not
    // clipstream's, are errors that name the file.
    let csv = images.join("c.csv");
    std::fs::write(&csv, "sku,image\n1,a.png\n").expect("csv");
    let out = clipstream(&[
        "plan",
        "--catalog",
        s(&csv),
        "--pipeline",
        s(&n.pipeline),
        "--night",
        s(&root.join("other")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("c.csv") && err.contains("\"id\""), "{err}");
    let bogus = root.join("bogus");
    std::fs::create_dir_all(&bogus).expect("dir");
    std::fs::write(bogus.join("x.parquet"), b"not parquet").expect("file");
    let out = clipstream(&[
        "plan",
        "--catalog",
        s(&catalog),
        "--pipeline",
        s(&n.pipeline),
        "--night",
        s(&root.join("other2")),
        "--previous",
        s(&bogus),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("x.parquet"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("dir");
    for e in std::fs::read_dir(from).expect("model dir").flatten() {
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).expect("copy");
        }
    }
}

/// Changes one byte in the second half of an ONNX file, where its weights
/// are stored: `plan` only hashes the model's files, so any change counts.
fn change_one_weight(path: &Path) {
    let mut bytes = std::fs::read(path).expect("onnx");
    let i = bytes.len() * 3 / 4;
    bytes[i] ^= 0x01;
    std::fs::write(path, bytes).expect("write");
}

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

/// `scripts/nightly.sh`, as cron would run it, two days in a row: the
/// second day finds the first day's snapshot, embeds only the change, and
/// running it again finishes nothing new.
#[test]
fn the_nightly_script_runs_night_after_night() {
    let root = scratch("nightly-script");
    let images = root.join("catalog");
    std::fs::create_dir_all(&images).expect("images");
    let mut products: Vec<(String, String, String)> = (0..8u32)
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
    let state = root.join("state");
    let night = |day: &str| {
        let out = std::process::Command::new(support::root().join("scripts/nightly.sh"))
            .arg(&catalog)
            .arg(&state)
            .args(["--text-column", "title"])
            .env("CLIPSTREAM_BIN", bin())
            .env("CLIPSTREAM_NIGHT_DATE", day)
            .env("CLIPSTREAM_IMAGES_ROOT", &root)
            .output()
            .expect("nightly.sh runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let out = night("2026-12-01");
    assert!(out.contains("previous snapshot: none"), "{out}");
    assert!(out.contains("to embed: 8 (new 8"), "{out}");
    products[2].2 = "renamed".into();
    write_catalog(&catalog, &products);
    let out = night("2026-12-02");
    assert!(out.contains("snapshots/2026-12-01"), "{out}");
    assert!(
        out.contains("to embed: 1 (new 0, model changed 0, image changed 0, text changed 1)"),
        "{out}"
    );
    assert!(
        out.contains("8 rows in 1 files (1 from tonight, 7 carried over)"),
        "{out}"
    );
    let again = night("2026-12-02");
    assert!(again.contains("already holds a plan"), "{again}");
    assert!(again.contains("finished snapshot (kept"), "{again}");
    let rows = rows_by_id(&state.join("snapshots/2026-12-02"));
    assert_eq!(rows.len(), 8);
    assert_eq!(rows["sku-2"]["text"], "renamed");
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

/// A night killed with SIGKILL part way through its run, and then at many
/// points of its snapshot, finishes on rerun with the snapshot of a night
/// that was never interrupted.
#[test]
fn a_night_killed_in_run_and_in_snapshot_finishes_the_same() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let root = scratch("nightly-killed");
    let images = root.join("catalog");
    std::fs::create_dir_all(&images).expect("images");
    let model = model();
    let mut products = local_products(&images, 0..400);
    let catalog = images.join("catalog.jsonl");
    write_catalog(&catalog, &products);
    let n1 = night(&root, "night-1", &model);
    plan(&n1, &catalog, None);
    run(&n1);
    let snap1 = root.join("snapshots/night-1");
    snapshot(&n1, None, &snap1);

    // Night 2: 120 images replaced, 40 titles edited, 10 new, 5 removed.
    for k in (0..400u32).step_by(10).flat_map(|k| [k, k + 3, k + 7]) {
        image(&images, &format!("p{k:03}.png"), k + 1000);
    }
    for k in (1..400usize).step_by(10) {
        products[k].2 = format!("product number {k}, edited");
    }
    products.extend(local_products(&images, 400..410));
    products.retain(|p| {
        !["sku-005", "sku-105", "sku-205", "sku-305", "sku-395"].contains(&p.0.as_str())
    });
    write_catalog(&catalog, &products);

    // The uninterrupted night.
    let calm = night(&root, "calm", &model);
    let p = plan(&calm, &catalog, Some(&snap1));
    assert_eq!(p["planned"].as_u64(), Some(170), "{p}");
    run(&calm);
    let calm_snap = root.join("snapshots/calm");
    snapshot(&calm, Some(&snap1), &calm_snap);
    let want = rows_by_id(&calm_snap);
    assert_eq!(want.len(), 405);

    // The same night, its run killed once it has written some files (one
    // per 20 rows) ...
    let dir = root.join("night-2");
    std::fs::create_dir_all(&dir).expect("night dir");
    let out = dir.join("out");
    let mut cfg = local_config(&dir, &dir.join("events.jsonl"), &out, 20);
    cfg.model.dir = model.clone();
    let n2 = Night {
        pipeline: write_pipeline(&dir, "pipeline", &cfg),
        dir,
    };
    assert_eq!(plan(&n2, &catalog, Some(&snap1)), p);
    fn files(d: &Path) -> usize {
        std::fs::read_dir(d).map_or(0, |entries| {
            entries
                .flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        files(&p)
                    } else {
                        usize::from(p.extension().is_some_and(|x| x == "parquet"))
                    }
                })
                .sum()
        })
    }
    let mut child = Command::new(bin())
        .args(["run", "--no-progress", s(&n2.pipeline)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run starts");
    let started = Instant::now();
    while files(&out) < 2 {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the run ended before it could be killed"
        );
        assert!(started.elapsed() < Duration::from_secs(120), "no output");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let before = read_parquet(&out).len();
    assert!((40..170).contains(&before), "{before} rows before the kill");
    // ... the rerun encodes only what is left.
    let (images_left, _) = run(&n2);
    assert!(
        images_left as usize <= 170 - before + 40,
        "the rerun encoded {images_left} images after {before} rows were written"
    );

    // The snapshot, killed at many points from its start to its end; each
    // time a rerun finishes it, and it is the uninterrupted night's.
    let snap2 = root.join("snapshots/night-2");
    let snapshots = root.join("snapshots");
    let partial = || -> bool {
        std::fs::read_dir(&snapshots)
            .expect("snapshots")
            .flatten()
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".night-2.partial")
            })
    };
    let output = n2.dir.join("out");
    let args = [
        "snapshot",
        "--night",
        s(&n2.dir),
        "--output",
        s(&output),
        "--previous",
        s(&snap1),
        "--out",
        s(&snap2),
    ];
    // How long an uninterrupted snapshot takes, process start to exit.
    let t = Instant::now();
    ok(&args);
    let whole = t.elapsed();
    std::fs::remove_dir_all(&snap2).expect("remove");
    let tries = 16u32;
    let mut mid_write = 0;
    for k in 0..tries {
        let delay = whole * k / (tries - 1);
        let mut child = Command::new(bin())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("snapshot starts");
        std::thread::sleep(delay);
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        if partial() {
            mid_write += 1;
        }
        ok(&args);
        let got = rows_by_id(&snap2);
        assert_eq!(got.len(), want.len(), "killed after {delay:?}");
        for (id, row) in &want {
            let g = &got[id];
            assert_eq!(g["text"], row["text"], "{id}");
            for col in ["image_embedding", "text_embedding"] {
                let c = cosine(&floats(&g[col]), &floats(&row[col]));
                assert!(
                    c > 0.99999,
                    "{id} {col}: cosine {c} (killed after {delay:?})"
                );
            }
        }
        assert!(!partial(), "the rerun left a partial snapshot");
        std::fs::remove_dir_all(&snap2).expect("remove");
    }
    eprintln!("snapshot ({whole:?}) killed {tries} times, {mid_write} of them while writing");
    assert!(
        mid_write >= 1,
        "no kill landed while the snapshot was written"
    );
}
