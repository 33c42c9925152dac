//! A night killed (SIGKILL) in `run` and in `snapshot` finishes the same
//! as one that was not.

use super::*;

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
