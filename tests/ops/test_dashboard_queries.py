#!/usr/bin/env python3
"""Plumbing test of dashboard_queries.py: a real Prometheus, a fake exporter.

    python3 tests/ops/test_dashboard_queries.py [--prometheus-bin prometheus]

Starts Prometheus (from PATH; scripts/install-prometheus.sh installs it)
scraping three fake exporters every second:
  - job `clipstream.fake` (namespace ops-test, pod clipstream-0): every metric;
  - job `clipstreamXfake` (pod decoy-0): every metric; it must never show up
    when $job is `clipstream.fake` (the `.` has to be escaped);
  - job `clipstream-partial`: without the Kafka metrics.
Then checks that every dashboard query returns data for the first job, that
the decoy's series never leak in, and that the Kafka panels are reported as
failures for the partial job. Exit 0 on success. Takes about 10 s.

This checks the plumbing (variables, escaping, the Prometheus API, the
metric names of the contract). The acceptance is the same tool against a
Prometheus scraping a real worker (the end-to-end test).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
import dashboard_queries  # noqa: E402

DASHBOARDS = sorted(str(p) for p in (ROOT / "dashboards").glob("clipstream-*.json"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prometheus-bin", default=os.environ.get("PROMETHEUS_BIN", "prometheus"))
    a = ap.parse_args()
    prom_bin = shutil.which(a.prometheus_bin)
    if not prom_bin:
        print(f"{a.prometheus_bin} not found: run scripts/install-prometheus.sh (Debian) or set PROMETHEUS_BIN", file=sys.stderr)
        return 2

    procs: list[subprocess.Popen] = []
    tmp = tempfile.mkdtemp(prefix="clipstream-ops-prom-")
    try:
        exporters = {
            "clipstream.fake": ({"namespace": "ops-test", "pod": "clipstream-0"}, None),
            "clipstreamXfake": ({"namespace": "ops-test", "pod": "decoy-0"}, None),
            "clipstream-partial": ({"namespace": "ops-test", "pod": "partial-0"}, "^clipstream_kafka_"),
        }
        scrape = []
        for job, (labels, omit) in exporters.items():
            port = free_port()
            cmd = [sys.executable, str(HERE / "fake_exporter.py"), "--port", str(port)]
            if omit:
                cmd += ["--omit", omit]
            procs.append(subprocess.Popen(cmd))
            scrape.append({
                "job_name": job,
                "scrape_interval": "1s",
                "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": labels}],
            })
        prom_port = free_port()
        config = Path(tmp, "prometheus.yml")
        config.write_text(json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": scrape}))  # JSON is YAML
        log = open(Path(tmp, "prometheus.log"), "w")
        procs.append(subprocess.Popen(
            [prom_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp}/data",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{prom_port}"

        deadline = time.monotonic() + 30
        up_since = None
        while time.monotonic() < deadline:
            try:
                targets = get_json(url + "/api/v1/targets")["data"]["activeTargets"]
                if len(targets) == 3 and all(t["health"] == "up" for t in targets):
                    up_since = up_since or time.monotonic()
                    if time.monotonic() - up_since >= 2.2:  # two more scrapes: rates work
                        break
            except OSError:
                pass
            time.sleep(0.3)
        else:
            print("Prometheus targets did not come up; log:\n" + Path(tmp, "prometheus.log").read_text(), file=sys.stderr)
            return 1

        failures = []

        # 1. Every query returns data for the complete exporter.
        buf = io.StringIO()
        rc, results = dashboard_queries.run(url, DASHBOARDS, {"job": ["clipstream.fake"], "namespace": ["ops-test"], "pod": ["clipstream-0"]},
                                            wait=10, out=buf)
        print(buf.getvalue())
        if rc != 0:
            failures.append(f"complete exporter: exit {rc}, expected 0")
        if len(results) < 50:
            failures.append(f"only {len(results)} queries found")
        # 2. The decoy job (matched by an unescaped `.`) never leaks in.
        leaked = [r for r in results for labels, _ in r.samples if labels.get("pod") == "decoy-0"]
        if leaked:
            failures.append(f"{len(leaked)} results contain the decoy job's pod: $job was not regex-escaped")
        # "All" (no --job) does see the decoy.
        buf = io.StringIO()
        rc_all, results_all = dashboard_queries.run(url, DASHBOARDS, {}, wait=0, out=buf)
        if not any(labels.get("pod") == "decoy-0" for r in results_all for labels, _ in r.samples):
            failures.append("with $job = All the decoy pod should appear in per-pod panels")

        # 3. The partial exporter: Kafka panels fail, and are listed.
        buf = io.StringIO()
        rc_p, results_p = dashboard_queries.run(url, DASHBOARDS, {"job": ["clipstream-partial"]}, wait=0, out=buf)
        bad = [r for r in results_p if r.failed]
        text = buf.getvalue()
        if rc_p != 1:
            failures.append(f"partial exporter: exit {rc_p}, expected 1")
        if not bad or any("kafka" not in r.query.expr for r in bad):
            failures.append("partial exporter: expected failures exactly on queries that use Kafka metrics: "
                            + ", ".join(f"{r.query.panel_title} ({r.query.expr})" for r in bad if "kafka" not in r.query.expr))
        if "FAILED:" not in text or "Consumer lag" not in text:
            failures.append("partial exporter: the failure list should name the Kafka panels")
        print(f"partial exporter: {len(bad)} queries reported as failing (the Kafka ones), exit {rc_p}")

        # 4. The command line: --json, and exit 2 when Prometheus is not there.
        out_json = Path(tmp, "r.json")
        cp = subprocess.run([sys.executable, str(HERE / "dashboard_queries.py"), "--prometheus", url, "--job", "clipstream.fake",
                             "--json", str(out_json), *DASHBOARDS], capture_output=True, text=True)
        if cp.returncode != 0 or len(json.loads(out_json.read_text())) != len(results):
            failures.append(f"CLI run: exit {cp.returncode}\n{cp.stdout[-2000:]}{cp.stderr[-2000:]}")
        cp = subprocess.run([sys.executable, str(HERE / "dashboard_queries.py"), "--prometheus", f"http://127.0.0.1:{free_port()}", *DASHBOARDS],
                            capture_output=True, text=True)
        if cp.returncode != 2:
            failures.append(f"unreachable Prometheus: exit {cp.returncode}, expected 2")

        if failures:
            print("test_dashboard_queries: FAILED\n  - " + "\n  - ".join(failures), file=sys.stderr)
            return 1
        print(f"test_dashboard_queries: ok ({len(results)} queries against Prometheus + fake exporter)")
        return 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
