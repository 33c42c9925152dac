#!/usr/bin/env python3
"""A stand-in for a clipstream worker's /metrics, to test the dashboard plumbing.

    python3 tests/ops/fake_exporter.py --port 9464 [--omit REGEX]
    python3 tests/ops/fake_exporter.py --print

Serves the worker's metric names (the contract in the ops brief: counters,
gauges, histograms with their labels) with values that grow over time, so
rates and quantiles have something to show. `--omit REGEX` leaves out the
metrics whose name matches (to check that a missing metric is reported).
This is not the worker: the real acceptance is the same query check against
a Prometheus scraping a real `clipstream run`.
"""

from __future__ import annotations

import argparse
import http.server
import re
import time

START = time.monotonic()

# name -> (type, help, label sets)
COUNTERS = {
    "clipstream_records_read_total": [{}],
    "clipstream_records_skipped_total": [{}],
    "clipstream_records_finished_total": [{}],
    "clipstream_rows_written_total": [{}],
    "clipstream_images_encoded_total": [{}],
    "clipstream_texts_encoded_total": [{}],
    "clipstream_dead_letters_written_total": [{}],
    "clipstream_dead_letters_total": [{"stage": "fetch", "kind": "object_not_found"}, {"stage": "decode", "kind": "corrupt_image"}],
    "clipstream_records_failed_total": [{}],
    "clipstream_parquet_files_total": [{}],
    "clipstream_parquet_bytes_total": [{}],
    "clipstream_kafka_commits_total": [{"result": "ok"}, {"result": "error"}],
    "clipstream_kafka_source_pauses_total": [{}],
    "clipstream_kafka_partition_start_retries_total": [{}],
    "clipstream_kafka_messages_produced_total": [{"output": o} for o in ("embeddings", "labels", "review", "dead_letters")],
    "clipstream_review_total": [{"decision": "accepted"}, {"decision": "routed"}],
    "clipstream_s3_requests_total": [{"operation": op, "result": r} for op in ("get_object", "head_object", "create_multipart_upload", "upload_part", "complete_multipart_upload") for r in ("ok", "error")],
    "clipstream_s3_retries_total": [{"operation": "get_object"}, {"operation": "upload_part"}],
    "clipstream_s3_bytes_total": [{"direction": "read"}, {"direction": "written"}],
    "clipstream_encoder_cpu_seconds_total": [{"tower": "vision"}, {"tower": "text"}],
}
GAUGES = {
    "clipstream_input_records": [{}],
    "clipstream_in_flight_records": [{}],
    "clipstream_kafka_consumer_lag_records": [{"topic": "image-events", "partition": str(p)} for p in range(4)],
    "clipstream_kafka_assigned_partitions": [{}],
    "clipstream_kafka_source_paused": [{}],
    "clipstream_kafka_partitions_starting": [{}],
    "clipstream_memory_in_flight_bytes": [{}],
    "clipstream_memory_budget_bytes": [{}],
    "clipstream_queue_items": [{"queue": q} for q in ("records", "fetched", "vision", "text", "done")],
    "clipstream_queue_capacity": [{"queue": q} for q in ("records", "fetched", "vision", "text", "done")],
    "clipstream_encoder_info": [{"model": "clip-tiny", "provider": "cpu"}],
    "clipstream_build_info": [{"version": "0.1.0"}],
    "clipstream_night_planned": [{"night": "2026-12-01"}, {"night": "2026-12-02"}],
    "clipstream_night_published_timestamp_seconds": [{"night": "2026-12-01"}, {"night": "2026-12-02"}],
}
SECONDS_BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]
HISTOGRAMS = {
    "clipstream_fetch_duration_seconds": ([{}], SECONDS_BUCKETS, 0.02),
    "clipstream_decode_duration_seconds": ([{}], SECONDS_BUCKETS, 0.004),
    "clipstream_tokenize_duration_seconds": ([{}], SECONDS_BUCKETS, 0.0005),
    "clipstream_parquet_close_duration_seconds": ([{}], SECONDS_BUCKETS, 0.3),
    "clipstream_kafka_commit_duration_seconds": ([{}], SECONDS_BUCKETS, 0.008),
    "clipstream_inference_duration_seconds": ([{"tower": "vision"}, {"tower": "text"}], SECONDS_BUCKETS, 0.2),
    "clipstream_queue_wait_seconds": ([{"tower": "vision"}, {"tower": "text"}], SECONDS_BUCKETS, 0.015),
    "clipstream_batch_size": ([{"tower": "vision"}, {"tower": "text"}], BATCH_BUCKETS, 20),
    "clipstream_s3_request_duration_seconds": ([{"operation": "get_object"}, {"operation": "upload_part"}], SECONDS_BUCKETS, 0.05),
}


def labels(d: dict) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in d.items()) + "}" if d else ""


def exposition(omit: re.Pattern | None) -> str:
    t = time.monotonic() - START + 1.0
    lines = []
    keep = lambda name: not (omit and omit.search(name))  # noqa: E731
    for i, (name, sets) in enumerate(COUNTERS.items()):
        if not keep(name):
            continue
        lines += [f"# HELP {name} Fake {name}.", f"# TYPE {name} counter"]
        for j, ls in enumerate(sets):
            per_s = 50.0 / (1 + i + j) if "bytes" not in name else 1e6
            lines.append(f"{name}{labels(ls)} {int(t * per_s)}")
    for i, (name, sets) in enumerate(GAUGES.items()):
        if not keep(name):
            continue
        lines += [f"# HELP {name} Fake {name}.", f"# TYPE {name} gauge"]
        for j, ls in enumerate(sets):
            if name.endswith("_info"):
                v = 1
            elif name == "clipstream_kafka_consumer_lag_records":
                v = max(0, 5000 - int(t * 10)) + 100 * j
            elif name == "clipstream_queue_capacity":
                v = 64
            elif name == "clipstream_kafka_assigned_partitions":
                v = 4
            elif name == "clipstream_night_planned":
                v = 20000 + 1000 * j
            elif name == "clipstream_night_published_timestamp_seconds":
                v = 1796083200 + 86400 * j
            elif name == "clipstream_kafka_source_paused":
                v = int(t) % 2
            else:
                v = (7 * (j + 1) + int(t)) % 64
            lines.append(f"{name}{labels(ls)} {v}")
    for name, (sets, buckets, typical) in HISTOGRAMS.items():
        if not keep(name):
            continue
        lines += [f"# HELP {name} Fake {name}.", f"# TYPE {name} histogram"]
        for ls in sets:
            n = int(t * 20)
            cum = 0
            for b in buckets:
                # most observations near `typical`
                share = 0.05 if b < typical / 2 else (0.6 if b < typical * 2 else 1.0)
                cum = max(cum, int(n * share))
                lines.append(f"{name}_bucket{labels({**ls, 'le': str(b)})} {cum}")
            lines.append(f"{name}_bucket{labels({**ls, 'le': '+Inf'})} {n}")
            lines.append(f"{name}_sum{labels(ls)} {n * typical:.6f}")
            lines.append(f"{name}_count{labels(ls)} {n}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int)
    ap.add_argument("--omit", default=None, help="regex of metric names to leave out")
    ap.add_argument("--print", action="store_true", help="print the exposition once and exit")
    a = ap.parse_args()
    omit = re.compile(a.omit) if a.omit else None
    if a.print:
        print(exposition(omit), end="")
        return
    if a.port is None:
        ap.error("--port is required (or --print)")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path.split("?")[0] == "/metrics":
                body = exposition(omit).encode()
                ctype = "text/plain; version=0.0.4; charset=utf-8"
                code = 200
            elif self.path in ("/healthz", "/readyz"):
                body, ctype, code = b"ok\n", "text/plain", 200
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    http.server.ThreadingHTTPServer((a.host, a.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
