#!/usr/bin/env python3
"""Builds clipstream's Grafana dashboards from this file (the only source).

    python3 dashboards/build.py           # writes the dashboards
    python3 dashboards/build.py --check   # exits 1 if a written file is stale

Writes dashboards/clipstream-overview.json and dashboards/clipstream-fleet.json,
and the same bytes into helm/clipstream/dashboards/ so the chart is
self-contained. Commit this file and its output together.

Every panel gets a description and a unit; every query is filtered by the
`job`, `namespace` and `pod` variables (checked below, before anything is
written). The metric names are the worker's (see the README of dashboards/).
Only the standard library is used.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT_DIRS = [ROOT / "dashboards", ROOT / "helm" / "clipstream" / "dashboards"]

DS = {"type": "prometheus", "uid": "${datasource}"}
# Every series is filtered by these. `.*` (the "All" value) also matches a
# missing label, so a Prometheus without Kubernetes labels still works.
SEL = 'job=~"$job", namespace=~"$namespace", pod=~"$pod"'
RI = "$__rate_interval"
VISION = 'tower="vision"'
TEXT = 'tower="text"'


def s(extra: str = "") -> str:
    """The label selector, with extra matchers."""
    return "{" + SEL + (", " + extra if extra else "") + "}"


def rate(metric: str, extra: str = "", by: str = "") -> str:
    """sum [by (...)] (rate(metric{sel}[$__rate_interval]))"""
    grp = f" by ({by})" if by else ""
    return f"sum{grp}(rate({metric}{s(extra)}[{RI}]))"


def quantile(q: float, hist: str, extra: str = "", by: str = "") -> str:
    """histogram_quantile over the rate of a histogram's buckets."""
    grp = "le" + (", " + by if by else "")
    return f"histogram_quantile({q}, sum by ({grp})(rate({hist}_bucket{s(extra)}[{RI}])))"


def avg_of(hist: str, extra: str = "", by: str = "") -> str:
    """Mean of a histogram's observations over the rate interval."""
    return f"{rate(hist + '_sum', extra, by)} / {rate(hist + '_count', extra, by)}"


# Lag: each partition is reported by the pod that holds it; `max by` keeps a
# partition once even while a rebalance leaves a stale copy on another pod.
LAG_BY_PARTITION = f"max by (topic, partition)(clipstream_kafka_consumer_lag_records{s()})"
LAG_TOTAL = f"sum({LAG_BY_PARTITION})"
# A night's progress: what `clipstream plan --publish` planned (every pod
# that read one of its events reports it), and of that, what the group has
# not yet committed (the lag, at most the planned count).
# Only the newest night (by when it was published): pods keep the last two.
NIGHT_LATEST = f"topk(1, max by (night)(clipstream_night_published_timestamp_seconds{s()}))"
NIGHT_PLANNED = f"(max by (night)(clipstream_night_planned{s()}) and on(night) {NIGHT_LATEST})"
NIGHT_DONE = f"clamp_min({NIGHT_PLANNED} - on() group_left() {LAG_TOTAL}, 0)"
NIGHT_REMAINING = f"({NIGHT_PLANNED} - {NIGHT_DONE})"
FINISH_RATE = "sum(rate(clipstream_records_finished_total" + "{" + SEL + "}" + "[$__rate_interval]))"


# --------------------------------------------------------------------------
# Panels


def target(expr: str, legend: str = "__auto", ref: str = "A", instant: bool = False, table: bool = False) -> dict:
    t = {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "range": not instant,
        "instant": instant,
        "refId": ref,
    }
    if table:
        t["format"] = "table"
    return t


def targets(*queries) -> list[dict]:
    out = []
    for i, q in enumerate(queries):
        expr, legend = q if isinstance(q, tuple) else (q, "__auto")
        out.append(target(expr, legend, chr(ord("A") + i)))
    return out


def thresholds(*steps) -> dict:
    """Absolute thresholds: green below the first step."""
    out = [{"color": "green", "value": None}]
    for value, color in steps:
        out.append({"color": color, "value": value})
    return {"mode": "absolute", "steps": out}


def timeseries(title, description, unit, queries, *, w=12, h=8, stack=False, min0=True, decimals=None, legend_calcs=None) -> dict:
    custom = {
        "drawStyle": "line",
        "lineInterpolation": "linear",
        "lineWidth": 1,
        "fillOpacity": 10 if not stack else 30,
        "gradientMode": "none",
        "showPoints": "never",
        "pointSize": 4,
        "spanNulls": False,
        "axisPlacement": "auto",
        "axisLabel": "",
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "thresholdsStyle": {"mode": "off"},
    }
    if min0:
        custom["axisSoftMin"] = 0
    defaults = {
        "unit": unit,
        "color": {"mode": "palette-classic"},
        "custom": custom,
        "thresholds": thresholds(),
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {
                "calcs": legend_calcs if legend_calcs is not None else ["mean", "max", "lastNotNull"],
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets(*queries),
        "_size": (w, h),
    }


def stat(title, description, unit, query, *, w=4, h=4, steps=(), decimals=None, graph=True) -> dict:
    defaults = {
        "unit": unit,
        "color": {"mode": "thresholds"},
        "thresholds": thresholds(*steps),
        "mappings": [],
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "auto",
            "textMode": "auto",
            "colorMode": "value",
            "graphMode": "area" if graph else "none",
            "justifyMode": "auto",
            "showPercentChange": False,
            "percentChangeColorMode": "standard",
            "wideLayout": True,
        },
        "targets": targets(query if isinstance(query, tuple) else (query, "__auto")),
        "_size": (w, h),
    }


def table(title, description, queries, *, w=24, h=7) -> dict:
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {
            "defaults": {
                "unit": "none",
                "color": {"mode": "thresholds"},
                "thresholds": thresholds(),
                "custom": {"align": "auto", "cellOptions": {"type": "auto"}, "inspect": False},
            },
            "overrides": [],
        },
        "options": {"showHeader": True, "frameIndex": 0, "cellHeight": "sm"},
        "targets": [target(q, "", chr(ord("A") + i), instant=True, table=True) for i, q in enumerate(queries)],
        "transformations": [
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True, "Value": True, "Value #A": True, "Value #B": True},
                    "indexByName": {},
                    "renameByName": {},
                },
            },
        ],
        "_size": (w, h),
    }


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def layout(items: list[dict]) -> list[dict]:
    """Places panels left to right on a 24-column grid, rows full width."""
    x = y = 0
    line_h = 0
    pid = 1
    out = []
    for item in items:
        p = dict(item)
        if p["type"] == "row":
            if x:
                y += line_h
            x, line_h = 0, 0
            p["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
            y += 1
        else:
            w, h = p.pop("_size")
            if x + w > 24:
                x, y, line_h = 0, y + line_h, 0
            p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
            x += w
            line_h = max(line_h, h)
        p["id"] = pid
        pid += 1
        out.append(p)
    return out


# --------------------------------------------------------------------------
# Variables


def query_var(name, label, metric, description, extra_sel=""):
    q = f"label_values({metric}{'{' + extra_sel + '}' if extra_sel else ''}, {name})"
    return {
        "type": "query",
        "name": name,
        "label": label,
        "description": description,
        "datasource": DS,
        "query": {"qryType": 1, "query": q, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,
        "regex": "",
        "sort": 1,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "hide": 0,
    }


def text_var(name, label, value, description):
    return {
        "type": "textbox",
        "name": name,
        "label": label,
        "description": description,
        "query": value,
        "current": {"selected": False, "text": value, "value": value},
        "options": [{"selected": True, "text": value, "value": value}],
        "hide": 0,
    }


def variables(batch_max: bool) -> list[dict]:
    out = [
        {
            "type": "datasource",
            "name": "datasource",
            "label": "Data source",
            "description": "The Prometheus that scrapes the clipstream workers.",
            "query": "prometheus",
            "regex": "",
            "options": [],
            "refresh": 1,
            "hide": 0,
            "includeAll": False,
            "multi": False,
        },
        query_var("job", "Job", "clipstream_build_info", "Scrape job of the workers."),
        query_var("namespace", "Namespace", "clipstream_build_info", "Kubernetes namespace (empty outside Kubernetes).", 'job=~"$job"'),
        query_var("pod", "Pod", "clipstream_build_info", "Worker pod (empty outside Kubernetes).", 'job=~"$job", namespace=~"$namespace"'),
    ]
    if batch_max:
        out += [
            text_var("vision_batch_max", "Vision batch max", "32", "engine.vision_batch.max_size of the pipeline (for the fill ratio)."),
            text_var("text_batch_max", "Text batch max", "64", "engine.text_batch.max_size of the pipeline (for the fill ratio)."),
        ]
    return out


def dashboard(uid, title, description, tags, panels, other_tag_links=True, batch_max=False) -> dict:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": tags,
        "editable": True,
        "graphTooltip": 1,
        "liveNow": False,
        "refresh": "30s",
        "schemaVersion": 41,
        "version": 1,
        "time": {"from": "now-3h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "weekStart": "",
        "links": [
            {
                "title": "clipstream",
                "type": "dashboards",
                "tags": ["clipstream"],
                "asDropdown": False,
                "icon": "external link",
                "includeVars": True,
                "keepTime": True,
                "targetBlank": False,
                "tooltip": "",
                "url": "",
            }
        ]
        if other_tag_links
        else [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": variables(batch_max)},
        "panels": layout(panels),
    }


# --------------------------------------------------------------------------
# The overview: one deployment at a glance.

STAGES = [
    ("Fetch (S3 / file)", "clipstream_fetch_duration_seconds", "", "Time to fetch one referenced object (S3 GetObject or a local file), retries included."),
    ("Decode + preprocess", "clipstream_decode_duration_seconds", "", "Time to decode and preprocess one image on the CPU pool."),
    ("Tokenize", "clipstream_tokenize_duration_seconds", "", "Time to tokenize one caption on the CPU pool."),
    ("Parquet close + upload", "clipstream_parquet_close_duration_seconds", "", "Time to close one Parquet file (and finish its upload when writing to S3)."),
    ("Kafka offset commit", "clipstream_kafka_commit_duration_seconds", "", "Time of one offset commit to the consumer group."),
]


def overview() -> dict:
    p: list[dict] = []
    p.append(row("Throughput"))
    p.append(stat("Records finished / s", "Records fully written by every sink (and so committable), per second, all selected pods.", "ops", rate("clipstream_records_finished_total"), w=4))
    p.append(stat("Records finished (range)", "Records finished over the dashboard's time range.", "short", f"sum(increase(clipstream_records_finished_total{s()}[$__range]))", w=4, graph=False))
    p.append(stat("Consumer lag", "Records in the consumer group's partitions not yet read (sum over partitions).", "short", LAG_TOTAL, w=4, steps=((10000, "orange"), (100000, "red"))))
    p.append(stat("Time to drain backlog", "Consumer lag divided by the current finish rate: how long the backlog takes at this throughput.", "s", f"{LAG_TOTAL} / {rate('clipstream_records_finished_total')}", w=4, steps=((600, "orange"), (3600, "red"))))
    p.append(stat("Dead letters / s", "Records sent to the dead-letter topic per second (bad payloads, objects or content).", "ops", rate("clipstream_dead_letters_total"), w=4, steps=((0.1, "orange"), (1, "red"))))
    p.append(stat("Replicas up", "Worker pods that Prometheus currently scrapes successfully.", "short", f"sum(up{s()})", w=4, graph=False))
    p.append(timeseries(
        "Records / s", "Records read from the source, finished (written by every sink), skipped (already written) and failed, per second.", "ops",
        [(rate("clipstream_records_read_total"), "read"), (rate("clipstream_records_finished_total"), "finished"),
         (rate("clipstream_records_skipped_total"), "skipped"), (rate("clipstream_records_failed_total"), "failed")]))
    p.append(timeseries(
        "Rows and encodings / s", "Parquet rows written, images and texts encoded, per second.", "ops",
        [(rate("clipstream_rows_written_total"), "rows written"), (rate("clipstream_images_encoded_total"), "images encoded"),
         (rate("clipstream_texts_encoded_total"), "texts encoded")]))

    p.append(row("Nightly re-embedding"))
    p.append(stat("Night: planned", "Events the newest night's `clipstream plan --publish` sent to the fleet (from their headers).", "short", NIGHT_PLANNED, w=6, graph=False))
    p.append(stat("Night: done", "Share of the night's planned events the group has committed: planned minus what is still on the topic. Counts the night's events only while nothing else is published on the topic.", "percentunit", f"({NIGHT_DONE}) / ({NIGHT_PLANNED} > 0)", w=6, graph=False))
    p.append(stat("Night: remaining", "Planned events not yet committed by the group (the consumer lag, at most the night's planned count).", "short", NIGHT_REMAINING, w=6))
    p.append(stat("Night: ETA", "Remaining events divided by the current finish rate: when the night's work is done at this throughput (no value while nothing finishes).", "s", f"{NIGHT_REMAINING} / on() group_left() ({FINISH_RATE} > 0)", w=6, steps=((3600, "orange"), (6 * 3600, "red"))))

    p.append(row("Latency by stage (p50 / p95)"))
    for title, hist, extra, desc in STAGES:
        p.append(timeseries(title, desc + " p50 and p95 over the rate interval.", "s",
                            [(quantile(0.5, hist, extra), "p50"), (quantile(0.95, hist, extra), "p95")], w=8))
    p.append(timeseries("Inference by tower", "Time of one encoder run (a whole batch) per tower, p50 and p95.", "s",
                        [(quantile(0.5, "clipstream_inference_duration_seconds", by="tower"), "p50 {{tower}}"),
                         (quantile(0.95, "clipstream_inference_duration_seconds", by="tower"), "p95 {{tower}}")], w=8))
    p.append(timeseries("Queue wait by tower", "Time an item waits in the batcher before its batch runs, per tower, p50 and p95.", "s",
                        [(quantile(0.5, "clipstream_queue_wait_seconds", by="tower"), "p50 {{tower}}"),
                         (quantile(0.95, "clipstream_queue_wait_seconds", by="tower"), "p95 {{tower}}")], w=8))
    p.append(timeseries("S3 request latency by operation", "Time of one S3 request attempt per operation (GetObject, UploadPart, ...), p50 and p95.", "s",
                        [(quantile(0.5, "clipstream_s3_request_duration_seconds", by="operation"), "p50 {{operation}}"),
                         (quantile(0.95, "clipstream_s3_request_duration_seconds", by="operation"), "p95 {{operation}}")], w=8))
    p.append(timeseries("Mean stage time", "Mean time per item of every stage over the rate interval (histogram sum / count).", "s",
                        [(avg_of("clipstream_fetch_duration_seconds"), "fetch"), (avg_of("clipstream_decode_duration_seconds"), "decode"),
                         (avg_of("clipstream_tokenize_duration_seconds"), "tokenize"),
                         (avg_of("clipstream_inference_duration_seconds", by="tower"), "inference {{tower}}"),
                         (avg_of("clipstream_queue_wait_seconds", by="tower"), "queue wait {{tower}}")], w=8))

    p.append(row("Batching"))
    p.append(timeseries("Mean batch size by tower", "Items per encoder run, per tower (histogram sum / count).", "short",
                        [(avg_of("clipstream_batch_size", by="tower"), "{{tower}}")], w=8, decimals=1))
    p.append(timeseries("Batch fill vs max", "Mean batch size over the configured maximum ($vision_batch_max / $text_batch_max; set them to the pipeline's engine.*_batch.max_size). Low fill at high lag means the batcher waits too little or the source is starved.", "percentunit",
                        [("(" + avg_of("clipstream_batch_size", VISION) + ") / $vision_batch_max", "vision"),
                         ("(" + avg_of("clipstream_batch_size", TEXT) + ") / $text_batch_max", "text")], w=8))
    p.append(timeseries("Batch size p50 / p95 by tower", "Distribution of batch sizes per tower.", "short",
                        [(quantile(0.5, "clipstream_batch_size", by="tower"), "p50 {{tower}}"),
                         (quantile(0.95, "clipstream_batch_size", by="tower"), "p95 {{tower}}")], w=8))
    p.append(timeseries("Batches / s by tower", "Encoder runs per second, per tower.", "ops",
                        [(rate("clipstream_batch_size_count", by="tower"), "{{tower}}")], w=8))

    p.append(row("Kafka"))
    p.append(timeseries("Consumer lag (total)", "Records not yet read, summed over every partition of the group.", "short",
                        [(LAG_TOTAL, "lag")], w=8))
    p.append(timeseries("Consumer lag by partition", "Records not yet read per topic and partition.", "short",
                        [(LAG_BY_PARTITION, "{{topic}}/{{partition}}")], w=8, legend_calcs=["lastNotNull", "max"]))
    p.append(timeseries("Assigned partitions", "Partitions assigned to the selected pods (by pod).", "short",
                        [(f"sum by (pod)(clipstream_kafka_assigned_partitions{s()})", "{{pod}}")], w=8, stack=True, decimals=0))
    p.append(timeseries("Offset commits / s", "Offset commits per second by result (ok, error).", "ops",
                        [(rate("clipstream_kafka_commits_total", by="result"), "{{result}}")], w=8))
    p.append(timeseries("Messages produced / s", "Messages produced per second by output (embeddings, labels, dead_letters).", "ops",
                        [(rate("clipstream_kafka_messages_produced_total", by="output"), "{{output}}")], w=8))
    p.append(timeseries("Commit latency", "Offset commit time, p50 and p95.", "s",
                        [(quantile(0.5, "clipstream_kafka_commit_duration_seconds"), "p50"),
                         (quantile(0.95, "clipstream_kafka_commit_duration_seconds"), "p95")], w=8))

    p.append(row("Errors and dead letters"))
    p.append(timeseries("Dead letters by stage and kind", "Records sent to the dead-letter topic per second, by the stage that rejected them and the kind of problem.", "ops",
                        [(rate("clipstream_dead_letters_total", by="stage, kind"), "{{stage}} / {{kind}}")], w=8))
    p.append(timeseries("Failed records and commit errors", "Records that failed (neither written nor dead-lettered), dead letters written, and failed offset commits, per second.", "ops",
                        [(rate("clipstream_records_failed_total"), "records failed"),
                         (rate("clipstream_dead_letters_written_total"), "dead letters written"),
                         (rate("clipstream_kafka_commits_total", 'result="error"'), "commit errors")], w=8))
    p.append(timeseries("S3 errors and retries", "S3 requests that failed and S3 retries per second, by operation.", "ops",
                        [(rate("clipstream_s3_requests_total", 'result="error"', by="operation"), "error {{operation}}"),
                         (rate("clipstream_s3_retries_total", by="operation"), "retry {{operation}}")], w=8))

    p.append(row("Output"))
    p.append(timeseries("Parquet files / s", "Parquet files closed (and uploaded) per second.", "ops",
                        [(rate("clipstream_parquet_files_total"), "files")], w=6))
    p.append(timeseries("Parquet bytes / s", "Parquet bytes written per second.", "Bps",
                        [(rate("clipstream_parquet_bytes_total"), "bytes")], w=6))
    p.append(timeseries("S3 traffic", "Bytes read from and written to S3 per second.", "Bps",
                        [(rate("clipstream_s3_bytes_total", by="direction"), "{{direction}}")], w=6))
    p.append(timeseries("S3 requests / s", "S3 requests per second by operation and result.", "ops",
                        [(rate("clipstream_s3_requests_total", by="operation, result"), "{{operation}} {{result}}")], w=6))
    p.append(timeseries("Labels accepted vs routed to review", "Labelled rows per second that passed the review thresholds ([model] review_min_score / review_min_margin) and those routed to a person (review topic or _review.jsonl). Zero without thresholds.", "ops",
                        [(rate("clipstream_review_total", by="decision"), "{{decision}}")], w=12, stack=True))

    p.append(row("In flight and queues"))
    p.append(timeseries("Records in flight", "Records read but not yet acknowledged by every sink (bounded by engine.max_in_flight), by pod; and the records the source reports as its input.", "short",
                        [(f"sum by (pod)(clipstream_in_flight_records{s()})", "in flight {{pod}}"),
                         (f"sum by (pod)(clipstream_input_records{s()})", "input {{pod}}")], w=6))
    p.append(timeseries("Queue occupancy", "Items in each stage queue over its capacity. A queue pinned at 100% is the one that the next stage cannot keep up with.", "percentunit",
                        [(f"sum by (queue)(clipstream_queue_items{s()}) / sum by (queue)(clipstream_queue_capacity{s()})", "{{queue}}")], w=6))
    p.append(timeseries("Queue items", "Items in each stage queue.", "short",
                        [(f"sum by (queue)(clipstream_queue_items{s()})", "{{queue}}")], w=6))
    p.append(timeseries("Source paused (backpressure)", "1 while a pod's Kafka source has paused its partitions because its pipeline stayed full for half a second: that pod is at capacity (more replicas help while partitions are left to spread). Also pauses per second.", "short",
                        [(f"max by (pod)(clipstream_kafka_source_paused{s()})", "paused {{pod}}"),
                         (rate("clipstream_kafka_source_pauses_total"), "pauses / s")], w=6))
    p.append(timeseries("Memory in flight vs budget", "Bytes the records in flight hold (events, objects, decoded images, model inputs, rows) over the pipeline's engine.max_bytes_in_flight, by pod. The source pauses at half the budget; a pod that sits there is held back by memory, not by the model.", "percentunit",
                        [(f"max by (pod)(clipstream_memory_in_flight_bytes{s()}) / max by (pod)(clipstream_memory_budget_bytes{s()})", "{{pod}}")], w=12))
    p.append(timeseries("Partitions starting", "Assigned partitions still paused while their committed offset is read and leftover files removed (by pod), and failed attempts per second (each retried: a coordinator that does not answer, a listing that fails). Non-zero for long means the partition is refused until the broker answers.", "short",
                        [(f"sum by (pod)(clipstream_kafka_partitions_starting{s()})", "starting {{pod}}"),
                         (rate("clipstream_kafka_partition_start_retries_total"), "retries / s")], w=12))

    p.append(row("Encoder"))
    p.append(table("Encoder and build", "Model, execution provider actually in use and clipstream version, per pod.",
                   [f"max by (pod, model, provider)(clipstream_encoder_info{s()})",
                    f"max by (pod, version)(clipstream_build_info{s()})"]))
    p.append(timeseries("Host CPU of the towers' runs", "Cores busy in the towers' ONNX Runtime runs (its pool threads and the encoder threads inside run), per tower. On the CPU provider this is the inference itself; on a GPU, the host's share of it (launching kernels, copies): what the GPU does not take off the host.", "short",
                        [(rate("clipstream_encoder_cpu_seconds_total", by="tower"), "{{tower}}")], w=12, decimals=2))
    p.append(timeseries("Towers' host CPU per finished record", "Host CPU seconds the towers' runs take per finished record (both towers). Compare with the pod's whole CPU per record (container_cpu_usage_seconds_total over the finish rate): the rest is decode, resize, batches and output, which more host cores or fast mode relieve.", "s",
                        [(f"{rate('clipstream_encoder_cpu_seconds_total')} / ({FINISH_RATE} > 0)", "towers")], w=12))
    return dashboard("clipstream-overview", "clipstream / overview",
                     "Throughput, latency by stage, batching, Kafka lag, errors and outputs of clipstream workers.",
                     ["clipstream"], p, batch_max=True)


# --------------------------------------------------------------------------
# The fleet: capacity planning across pods.


def fleet() -> dict:
    fin = rate("clipstream_records_finished_total")
    p: list[dict] = []
    p.append(row("Capacity"))
    p.append(stat("Replicas up", "Worker pods that Prometheus currently scrapes successfully.", "short", f"sum(up{s()})", graph=False))
    p.append(stat("Assigned partitions", "Partitions assigned across the selected pods. Replicas beyond the partition count sit idle.", "short",
                  f"sum(clipstream_kafka_assigned_partitions{s()})", graph=False))
    p.append(stat("Records finished / s", "Fleet throughput: records finished per second.", "ops", fin))
    p.append(stat("Per-pod throughput (mean)", "Records finished per second divided by the pods reporting.", "ops",
                  f"{fin} / count(clipstream_build_info{s()})"))
    p.append(stat("Consumer lag", "Records not yet read, all partitions.", "short", LAG_TOTAL, steps=((10000, "orange"), (100000, "red"))))
    p.append(stat("Time to drain backlog", "sum(lag) / sum(rate(finished)): seconds until the backlog is read at the current throughput (if nothing new arrives).", "s",
                  f"{LAG_TOTAL} / {fin}", steps=((600, "orange"), (3600, "red"))))

    p.append(row("Throughput per pod"))
    p.append(timeseries("Records finished / s by pod", "Records finished per second by each pod: uneven pods point at uneven partition load or slower nodes.", "ops",
                        [(rate("clipstream_records_finished_total", by="pod"), "{{pod}}")], stack=True))
    p.append(timeseries("Images and texts encoded / s by pod", "Encoder work per pod.", "ops",
                        [(rate("clipstream_images_encoded_total", by="pod"), "images {{pod}}"),
                         (rate("clipstream_texts_encoded_total", by="pod"), "texts {{pod}}")]))

    p.append(row("Lag"))
    p.append(timeseries("Lag trend", "Total consumer lag over time. Rising while throughput is flat means the fleet is under-provisioned.", "short",
                        [(LAG_TOTAL, "lag")], w=8))
    p.append(timeseries("Lag change / s", "Slope of the consumer lag (deriv over the rate interval): negative drains, positive grows.", "short",
                        [(f"sum(deriv(clipstream_kafka_consumer_lag_records{s()}[{RI}]))", "lag change / s")], w=8, min0=False))
    p.append(timeseries("Time to drain backlog", "sum(lag) / sum(rate(records finished)): how long the current backlog takes at the current throughput.", "s",
                        [(f"{LAG_TOTAL} / {fin}", "time to drain")], w=8))
    p.append(timeseries("Lag by pod", "Consumer lag of the partitions each pod holds.", "short",
                        [(f"sum by (pod)(clipstream_kafka_consumer_lag_records{s()})", "{{pod}}")], w=12))
    p.append(timeseries("Assigned partitions by pod", "Partitions each pod holds. After a scale-up every pod should hold some.", "short",
                        [(f"sum by (pod)(clipstream_kafka_assigned_partitions{s()})", "{{pod}}")], w=12, stack=True, decimals=0))

    p.append(row("Batching and saturation per pod"))
    p.append(timeseries("Vision batch fill by pod", "Mean vision batch size over $vision_batch_max, per pod. Full batches and rising lag: add replicas (or GPUs).", "percentunit",
                        [("(" + avg_of("clipstream_batch_size", VISION, by="pod") + ") / $vision_batch_max", "{{pod}}")], w=8))
    p.append(timeseries("Text batch fill by pod", "Mean text batch size over $text_batch_max, per pod.", "percentunit",
                        [("(" + avg_of("clipstream_batch_size", TEXT, by="pod") + ") / $text_batch_max", "{{pod}}")], w=8))
    p.append(timeseries("Inference p95 by pod", "p95 of one encoder run per pod and tower.", "s",
                        [(quantile(0.95, "clipstream_inference_duration_seconds", by="pod, tower"), "{{pod}} {{tower}}")], w=8))
    p.append(timeseries("In flight by pod", "Records in flight per pod (bounded by engine.max_in_flight).", "short",
                        [(f"sum by (pod)(clipstream_in_flight_records{s()})", "{{pod}}")], w=12))
    p.append(timeseries("Dead letters / s by pod", "Dead letters per second per pod.", "ops",
                        [(rate("clipstream_dead_letters_total", by="pod"), "{{pod}}")], w=12))

    p.append(row("Providers"))
    p.append(table("Pods by provider and version", "Which execution provider each pod really runs on (a GPU pod on cpu has fallen back) and its clipstream version.",
                   [f"max by (pod, model, provider)(clipstream_encoder_info{s()})",
                    f"max by (pod, version)(clipstream_build_info{s()})"]))
    return dashboard("clipstream-fleet", "clipstream / fleet and capacity",
                     "Per-pod throughput, lag trend, time to drain the backlog, batch fill and partition assignment across clipstream workers.",
                     ["clipstream"], p, batch_max=True)


# --------------------------------------------------------------------------
# Self-check and output

METRIC_RE = re.compile(r"\b(clipstream_[a-z0-9_]+|up)\b(\{[^}]*\})?")


def lint(d: dict) -> list[str]:
    """Every panel: description, unit, targets filtered by the variables."""
    problems = []
    ids = set()
    for p in d["panels"]:
        where = f"{d['uid']}: panel {p['id']} {p['title']!r}"
        if p["id"] in ids:
            problems.append(f"{where}: duplicate id")
        ids.add(p["id"])
        if p["type"] == "row":
            continue
        if not p.get("description"):
            problems.append(f"{where}: no description")
        if not p.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problems.append(f"{where}: no unit")
        if p.get("datasource") != DS:
            problems.append(f"{where}: datasource is not ${{datasource}}")
        for t in p.get("targets", []):
            expr = t["expr"]
            found = False
            for m in METRIC_RE.finditer(expr):
                if m.group(1) in ("up",) and not m.group(2):
                    continue  # the word, not the metric
                found = True
                if not m.group(2) or any(f'{l}=~"${l}"' not in m.group(2) for l in ("job", "namespace", "pod")):
                    problems.append(f"{where}: {m.group(0)!r} is not filtered by job, namespace and pod")
            if not found:
                problems.append(f"{where}: no metric in {expr!r}")
            if expr.count("(") != expr.count(")") or expr.count("{") != expr.count("}"):
                problems.append(f"{where}: unbalanced brackets in {expr!r}")
    return problems


def render(d: dict) -> str:
    return json.dumps(d, indent=2, ensure_ascii=False) + "\n"


def build() -> dict[str, str]:
    out = {}
    problems = []
    for name, fn in (("clipstream-overview.json", overview), ("clipstream-fleet.json", fleet)):
        d = fn()
        problems += lint(d)
        out[name] = render(d)
    if problems:
        sys.exit("dashboards/build.py: problems:\n  " + "\n  ".join(problems))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if any output differs from the source")
    args = ap.parse_args()
    files = build()
    stale = []
    for d in OUT_DIRS:
        for name, text in files.items():
            path = d / name
            rel = path.relative_to(ROOT)
            if args.check:
                if not path.exists() or path.read_text(encoding="utf-8") != text:
                    stale.append(str(rel))
            else:
                d.mkdir(parents=True, exist_ok=True)
                if not path.exists() or path.read_text(encoding="utf-8") != text:
                    path.write_text(text, encoding="utf-8")
                    print(f"wrote {rel}")
    if stale:
        print("stale (run python3 dashboards/build.py and commit the result):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    if args.check:
        n = sum(len(json.loads(t)["panels"]) for t in files.values())
        print(f"dashboards up to date ({len(files)} dashboards, {n} panels and rows, {len(OUT_DIRS)} copies)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
