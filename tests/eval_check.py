#!/usr/bin/env python3
"""Independent check of `clipstream eval`: recomputes every figure with numpy
from the samples in the JSON report (each record's true label and its
ranked labels with scores), and compares with what the command printed (to
the last digit) and wrote as JSON; then checks the HTML report's charts.

    python3 tests/eval_check.py REPORT.json STDOUT.txt [REPORT.html] [--output DIR --field F [--labels F.toml]]

With --output (the report of `eval --output DIR`), the records themselves
are also read independently (pyarrow): the newest row per id, its true
label from its attributes, its labels; the report must have evaluated
exactly those, with the same true labels, labels and skip counts.

Exit 0 when everything agrees; otherwise the differences are listed.
The definitions are those of crates/clipstream-pipeline/src/eval/mod.rs,
written here from the definitions, not from the Rust code.
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET

import numpy as np

BINS = 15
problems: list[str] = []


def check(ok: bool, what: str) -> None:
    if not ok:
        problems.append(what)


def f4(x: float) -> str:
    return f"{x:.4f}"


def figures(samples: list[dict], classes: list[str], targets: list[float]) -> dict:
    n = len(samples)
    k = min(5, min(len(s["ranked"]) for s in samples))
    index = {c: i for i, c in enumerate(classes)}
    truth = np.array([index[s["truth"]] for s in samples])
    pred_names = [s["ranked"][0][0] for s in samples]
    conf = np.array([s["ranked"][0][1] for s in samples], dtype=np.float64)
    right = np.array([p == s["truth"] for p, s in zip(pred_names, samples)])
    in_k = np.array([s["truth"] in [l for l, _ in s["ranked"][:k]] for s in samples])
    pred = np.array([index.get(p, -1) for p in pred_names])
    # Per class, one-vs-rest counts.
    prec, rec, f1, support = [], [], [], []
    for c in range(len(classes)):
        tp = np.sum((pred == c) & (truth == c))
        fp = np.sum((pred == c) & (truth != c))
        fn = np.sum((pred != c) & (truth == c))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        prec.append(p)
        rec.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
        support.append(int(np.sum(truth == c)))
    # Calibration: bin i holds (i/B, (i+1)/B], 0 in the first.
    edges = np.linspace(0.0, 1.0, BINS + 1)
    ece = 0.0
    bins = []
    for i in range(BINS):
        lo, hi = edges[i], edges[i + 1]
        member = (conf > lo) & (conf <= hi) if i > 0 else (conf <= hi)
        if i == BINS - 1:
            member |= conf > 1.0
        cnt = int(member.sum())
        acc = float(right[member].mean()) if cnt else 0.0
        cf = float(conf[member].mean()) if cnt else 0.0
        ece += cnt / n * abs(acc - cf)
        bins.append(cnt)
    # Thresholds: for each distinct confidence t, precision of conf >= t.
    ts = np.unique(conf)[::-1]
    curve = [(t, float(np.mean(conf >= t)), float(right[conf >= t].mean())) for t in ts]
    operating = []
    for target in targets:
        ok = [c for c in curve if c[2] >= target]
        operating.append(min(ok, key=lambda c: c[0]) if ok else None)
    pairs = {}
    for t, p in zip(truth, pred):
        if p >= 0 and t != p:
            pairs[(classes[t], classes[p])] = pairs.get((classes[t], classes[p]), 0) + 1
    confused = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    return dict(n=n, k=k, top1=float(right.mean()), topk=float(in_k.mean()), prec=prec, rec=rec, f1=f1,
                support=support, macro=(float(np.mean(prec)), float(np.mean(rec)), float(np.mean(f1))),
                ece=ece, bins=bins, curve=curve, operating=operating, confused=confused)


def sections(stdout: str) -> dict[str, str]:
    out = {}
    for part in re.split(r"^== ", stdout, flags=re.M)[1:]:
        name, _, body = part.partition("\n")
        out[name.strip()] = body
    return out


def check_text(name: str, body: str, f: dict, classes: list[str], targets: list[float]) -> None:
    def line(prefix: str) -> str:
        m = re.search(r"^" + re.escape(prefix) + r".*$", body, re.M)
        return m.group(0) if m else ""
    check(line("records evaluated").split()[-1] == str(f["n"]), f"{name}: records evaluated")
    check(line("top-1 accuracy").split()[-1] == f4(f["top1"]), f"{name}: top-1 {line('top-1 accuracy')} vs {f4(f['top1'])}")
    check(line(f"top-{f['k']} accuracy").split()[-1] == f4(f["topk"]), f"{name}: top-{f['k']} accuracy")
    want = f"macro precision     {f4(f['macro'][0])}   recall {f4(f['macro'][1])}   F1 {f4(f['macro'][2])}"
    check(line("macro precision") == want, f"{name}: {line('macro precision')!r} vs {want!r}")
    check(line("ECE").split()[-1] == f4(f["ece"]), f"{name}: ECE {line('ECE')} vs {f4(f['ece'])}")
    for target, op in zip(targets, f["operating"]):
        l = line(f"  precision >= {target:g}:")
        if op is None:
            check("no threshold reaches it" in l, f"{name}: {target} should be unreachable: {l!r}")
            continue
        t, cov, p = op
        m = re.search(r"score >= (\S+) accepts (\S+) of records \(precision (\S+)\)", l)
        check(bool(m), f"{name}: no threshold line for {target}: {l!r}")
        if m:
            # The printed threshold is the f32 score; it must select the same records.
            check(np.float32(float(m.group(1))) == np.float32(t), f"{name}: threshold {m.group(1)} vs {t}")
            check(m.group(2) == f4(cov) and m.group(3) == f4(p), f"{name}: coverage/precision {m.group(2)}/{m.group(3)} vs {f4(cov)}/{f4(p)}")
    for i, c in enumerate(classes):
        m = re.search(r"^  " + re.escape(c) + r"\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$", body, re.M)
        want = (str(f["support"][i]), f4(f["prec"][i]), f4(f["rec"][i]), f4(f["f1"][i]))
        check(bool(m) and m.groups() == want, f"{name}: class {c}: {m.groups() if m else None} vs {want}")
    for (t, p), cnt in f["confused"]:
        check(re.search(rf"^\s+{cnt}  {re.escape(t)} -> {re.escape(p)}$", body, re.M) is not None, f"{name}: confused {t} -> {p} ({cnt})")


def check_json(s: dict, f: dict) -> None:
    m = s["metrics"]
    close = lambda a, b: abs(a - b) < 1e-9  # noqa: E731
    check(close(m["top1"], f["top1"]) and close(m["topk"], f["topk"]), f"{s['name']}: JSON accuracy")
    check(close(m["ece"], f["ece"]), f"{s['name']}: JSON ECE {m['ece']} vs {f['ece']}")
    check([b["count"] for b in m["bins"]] == f["bins"], f"{s['name']}: JSON bin counts")
    check(len(m["curve"]) == len(f["curve"]), f"{s['name']}: JSON curve length")
    for c, (t, cov, p) in zip(m["curve"], f["curve"]):
        check(c["threshold"] == t and close(c["coverage"], cov) and close(c["precision"], p), f"{s['name']}: curve at {t}")
    check([[a, b, n] for (a, b), n in f["confused"]] == m["confused"], f"{s['name']}: JSON confused pairs")
    check(m["k"] == f["k"] and m["records"] == f["n"], f"{s['name']}: JSON k / records")
    for c, p, r, f1, sup in zip(m["classes"], f["prec"], f["rec"], f["f1"], f["support"]):
        check(close(c["precision"], p) and close(c["recall"], r) and close(c["f1"], f1) and c["support"] == sup,
              f"{s['name']}: JSON class {c['class']}")
    check(all(close(a, b) for a, b in zip((m["macro_precision"], m["macro_recall"], m["macro_f1"]), f["macro"])),
          f"{s['name']}: JSON macro figures")
    for o, want in zip(m["operating"], f["operating"]):
        if want is None:
            check(o["threshold"] is None, f"{s['name']}: JSON target {o['target']} should be unreachable")
        else:
            check(o["threshold"] == want[0] and close(o["coverage"], want[1]) and close(o["precision"], want[2]),
                  f"{s['name']}: JSON target {o['target']}")



def check_html(path: str, report: dict) -> None:
    text = open(path, encoding="utf-8").read()
    check(text.startswith("<!doctype html>") and text.rstrip().endswith("</html>"), "HTML: not a whole document")
    figs = re.findall(r'<figure class="([^"]+)">(.*?)</figure>', text, re.S)
    check(len(figs) == 3 * len(report["sets"]), f"HTML: {len(figs)} charts for {len(report['sets'])} label sets")
    ns = "{http://www.w3.org/2000/svg}"
    for k, s in enumerate(report["sets"]):
        m = s["metrics"]
        for cls, svg in figs[3 * k:3 * k + 3]:
            root = ET.fromstring(svg)  # well-formed SVG
            rects = root.findall(f".//{ns}rect")
            if cls == "confusion":
                n = min(len(s["classes"]), 40)
                cells = [r for r in rects if r.get("stroke") == "none" and r.get("x") != "0"]
                check(len(cells) >= n * n, f"{s['name']}: confusion matrix has {len(cells)} cells, want {n * n}")
                labels = {(t.text or "").strip() for t in root.findall(f".//{ns}text")}
                check(all(c in labels for c in s["classes"][:n]), f"{s['name']}: confusion matrix names its classes")
                nonzero = sum(1 for row in m["matrix"] for v in row if v)
                counts = [t for t in root.findall(f".//{ns}text") if (t.text or "").strip().isdigit()]
                check(n > 30 or len(counts) >= nonzero, f"{s['name']}: confusion cells show their counts")
            elif cls == "reliability":
                bars = [r for r in rects if r.get("fill") == "#3C6EBE"]
                filled = sum(1 for b in m["bins"] if b["count"])
                check(len(bars) == filled, f"{s['name']}: reliability has {len(bars)} bars for {filled} non-empty bins")
                check(len(root.findall(f".//{ns}circle")) == filled, f"{s['name']}: reliability points")
            elif cls == "precision-coverage":
                lines = [p for p in root.findall(f".//{ns}polyline") if p.get("stroke") == "#3C6EBE"]
                pts = len(lines[0].get("points").split()) if lines else 0
                check(pts == len(m["curve"]), f"{s['name']}: the curve has {pts} points, want {len(m['curve'])}")
                reached = sum(1 for o in m["operating"] if o["threshold"] is not None)
                check(len(root.findall(f".//{ns}circle")) == reached, f"{s['name']}: one marker per reachable target")
            else:
                check(False, f"unknown chart {cls}")


def check_records(report: dict, output: str, field: str, labels: str | None) -> None:
    """What `eval --output` must have evaluated, read here from the files."""
    import glob
    import tomllib
    import pyarrow.parquet as pq
    newest: dict[str, tuple] = {}
    for f in sorted(glob.glob(output + "/**/*.parquet", recursive=True)):
        if any(part.startswith((".", "_")) for part in f[len(output):].split("/")):
            continue
        t = pq.read_table(f, columns=["id", "attributes", "labels", "processed_at"]).to_pylist()
        for row in t:
            at = row["processed_at"]
            if row["id"] not in newest or newest[row["id"]][0] <= at:
                newest[row["id"]] = (at, row)
    classes = set(tomllib.load(open(labels, "rb"))["classes"]) if labels else None
    want, no_truth, unknown, no_labels = {}, 0, 0, 0
    for rid, (_, row) in newest.items():
        attrs = json.loads(row["attributes"]) if row["attributes"] else {}
        truth = attrs.get(field) if isinstance(attrs, dict) else None
        if not isinstance(truth, str):
            no_truth += 1
            continue
        if classes is not None and truth not in classes:
            unknown += 1
            continue
        ranked = [(l["label"], float(np.float32(l["score"]))) for l in (row["labels"] or [])]
        if not ranked:
            no_labels += 1
            continue
        want[rid] = (truth, ranked)
    s = report["sets"][0]
    got = {x["id"]: (x["truth"], [(l, sc) for l, sc in x["ranked"]]) for x in s["samples"]}
    check(set(got) == set(want), f"--output: evaluated ids differ: {sorted(set(got) ^ set(want))[:5]}")
    for rid in set(got) & set(want):
        check(got[rid][0] == want[rid][0] and [l for l, _ in got[rid][1]] == [l for l, _ in want[rid][1]]
              and all(abs(a[1] - b[1]) < 1e-6 for a, b in zip(got[rid][1], want[rid][1])), f"--output: record {rid}")
    sk = s["skipped"]
    check(sk["no_truth"] == no_truth and sum(sk["unknown_truth"].values()) == unknown and sk["no_labels"] == no_labels,
          f"--output: skipped {sk} vs no_truth {no_truth}, unknown {unknown}, no_labels {no_labels}")


def main() -> int:
    args = sys.argv[1:]
    opts = {}
    while len(args) >= 2 and args[-2].startswith("--"):
        opts[args[-2]] = args[-1]
        args = args[:-2]
    sys.argv = [sys.argv[0]] + args
    report = json.load(open(sys.argv[1], encoding="utf-8"))
    stdout = open(sys.argv[2], encoding="utf-8").read()
    texts = sections(stdout)
    for s in report["sets"]:
        targets = [o["target"] for o in s["metrics"]["operating"]]
        f = figures(s["samples"], s["classes"], targets)
        check(s["name"] in texts, f"no section for {s['name']} in the output")
        check_text(s["name"], texts.get(s["name"], ""), f, s["classes"], targets)
        check_json(s, f)
        print(f"{s['name']}: {f['n']} records, top-1 {f4(f['top1'])}, ECE {f4(f['ece'])}: recomputed")
    if len(sys.argv) > 3:
        check_html(sys.argv[3], report)
    if "--output" in opts:
        check_records(report, opts["--output"], opts.get("--field", "true_label"), opts.get("--labels"))
    for p in problems:
        print("MISMATCH:", p)
    print("eval_check:", "ok" if not problems else f"{len(problems)} mismatches")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
