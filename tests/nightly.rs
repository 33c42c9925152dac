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
//! counted. Beside this file: `nightly/s3.rs` (nights over S3),
//! `nightly/fleet.rs` (nights run by a Kafka fleet), `nightly/kill.rs`
//! (SIGKILLs in the middle of a night).

#[path = "support/mod.rs"]
mod support;

#[path = "nightly/fleet.rs"]
mod fleet;
#[path = "nightly/kill.rs"]
mod kill;
#[path = "nightly/s3.rs"]
mod s3;

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
