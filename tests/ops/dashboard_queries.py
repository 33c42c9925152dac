#!/usr/bin/env python3
"""Runs every query of Grafana dashboards against a real Prometheus.

    python3 tests/ops/dashboard_queries.py --prometheus http://127.0.0.1:9090 \\
        --job clipstream [--namespace N] [--pod P] dashboards/*.json

Each panel target's `expr` has its variables replaced the way Grafana would:
`$job`, `$namespace`, `$pod` (repeat an option, or separate with commas, for
several values; left out = "All" = `.*`), other variables from `--var
NAME=VALUE` or else the dashboard's saved value, and Grafana's built-ins
(`$__rate_interval`, `$__interval`, `$__range`, `$__range_s`, ...) from
`--rate-interval`, `--interval`, `--range`. Inside a `=~` / `!~` matcher a
value is escaped as a regular expression (`my.job` matches only itself) and
several values become `(a|b)`.

Each query then runs as an instant query (GET /api/v1/query). One line is
printed per panel and query with what came back. Exit status:
  0  every query returned data
  1  some query returned no data, an error, or kept an unresolved variable
     (all of them are listed at the end)
  2  usage error, unreadable dashboard, or Prometheus unreachable

`--wait SECONDS` re-runs the failing queries until they pass or the time is
up (rates need two scrapes). `--allow-empty REGEX` accepts "no data" for the
panels whose title or expression matches (e.g. error counters that have not
counted anything yet). `--fail-on-nan` also fails queries whose every value is
NaN (histogram_quantile over an interval without observations). `--json FILE`
writes the results for a test to read. Only the Python standard library is
used, so any python3 (3.9+) runs it; `run()` is the same as a function.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterable

# Grafana's built-in variables, and which option sets each.
BUILTINS = ("__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms")
VAR_RE = re.compile(r"\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<fmt>[A-Za-z]+))?\}|\[\[(?P<old>[A-Za-z_][A-Za-z0-9_]*)\]\]|\$(?P<plain>[A-Za-z_][A-Za-z0-9_]*)")
STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|`[^`]*`')
RE2_META = set("\\.+*?()|[]{}^$")


def duration_seconds(text: str) -> float:
    """`90s`, `5m`, `1h30m`, `2d` -> seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise ValueError(f"{text!r} is not a duration like 30s, 5m, 1h")
    return sum(float(n) * units[u] for n, u in parts)


def regex_escape(value: str) -> str:
    """Escapes RE2 metacharacters (as Grafana's Prometheus data source does)."""
    return "".join("\\" + c if c in RE2_META else c for c in value)


def promql_string_escape(text: str) -> str:
    """Makes text safe inside a double-quoted PromQL string."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


@dataclasses.dataclass
class Query:
    dashboard: str
    panel_id: int
    panel_title: str
    ref_id: str
    expr: str  # as written in the dashboard
    promql: str = ""  # after substitution
    problem: str = ""  # substitution problem


@dataclasses.dataclass
class Result:
    query: Query
    status: str  # ok | nan | empty | allowed-empty | error
    detail: str
    samples: list

    @property
    def failed(self) -> bool:
        return self.status in ("empty", "error")

    def line(self) -> str:
        q = self.query
        return f"[{self.status:>13}] {q.dashboard} #{q.panel_id} {q.panel_title!r} {q.ref_id}: {self.detail}"


class Substituter:
    """Replaces dashboard variables in one dashboard's expressions."""

    def __init__(self, dashboard: dict, given: dict[str, list[str]], builtins: dict[str, str]):
        self.values: dict[str, list[str] | None] = {}  # None = All
        self.all_values: dict[str, str] = {}
        for v in dashboard.get("templating", {}).get("list", []):
            name = v.get("name")
            if not name or v.get("type") == "datasource":
                continue
            self.all_values[name] = v.get("allValue") or ".*"
            cur = (v.get("current") or {}).get("value")
            if isinstance(cur, str):
                cur = [cur]
            if not cur or "$__all" in cur:
                self.values[name] = None
            else:
                self.values[name] = [str(c) for c in cur]
        for name, vals in given.items():
            self.values[name] = vals if vals else None
        self.builtins = builtins

    def value(self, name: str, in_regex: bool) -> str:
        if name in self.builtins:
            return self.builtins[name]
        if name not in self.values:
            raise KeyError(name)
        vals = self.values[name]
        if vals is None:  # All
            return self.all_values.get(name, ".*") if in_regex else ".*"
        if in_regex:
            esc = [regex_escape(v) for v in vals]
            return esc[0] if len(esc) == 1 else "(" + "|".join(esc) + ")"
        if len(vals) > 1:
            raise ValueError(f"${name} has several values but is used outside a =~ matcher")
        return vals[0]

    def _sub(self, text: str, in_regex: bool, unresolved: list[str], in_string: bool) -> str:
        def repl(m: re.Match) -> str:
            name = m.group("braced") or m.group("old") or m.group("plain")
            try:
                v = self.value(name, in_regex)
            except KeyError:
                unresolved.append(name)
                return m.group(0)
            return promql_string_escape(v) if in_string else v

        return VAR_RE.sub(repl, text)

    def substitute(self, expr: str) -> tuple[str, str]:
        """Returns (promql, problem)."""
        unresolved: list[str] = []
        out = []
        pos = 0
        try:
            for m in STRING_RE.finditer(expr):
                before = expr[pos : m.start()]
                out.append(self._sub(before, False, unresolved, False))
                lit = m.group(0)
                op = before.rstrip()[-2:]
                in_regex = op in ("=~", "!~")
                if lit.startswith('"'):
                    out.append('"' + self._sub(lit[1:-1], in_regex, unresolved, True) + '"')
                else:  # raw string: no escapes possible
                    out.append(self._sub(lit, in_regex, unresolved, False))
                pos = m.end()
            out.append(self._sub(expr[pos:], False, unresolved, False))
        except ValueError as e:
            return expr, str(e)
        if unresolved:
            names = ", ".join(sorted(set("$" + n for n in unresolved)))
            return expr, f"unresolved variable(s) {names}: pass --var NAME=VALUE"
        return "".join(out), ""


def extract_queries(path: Path, given: dict[str, list[str]], builtins: dict[str, str]) -> list[Query]:
    d = json.loads(path.read_text(encoding="utf-8"))
    name = d.get("uid") or path.stem
    sub = Substituter(d, given, builtins)
    panels = []
    for p in d.get("panels", []):
        panels.append(p)
        panels.extend(p.get("panels", []))  # panels inside collapsed rows
    out = []
    for p in panels:
        for t in p.get("targets", []) or []:
            expr = t.get("expr")
            if not expr or t.get("hide"):
                continue
            q = Query(name, p.get("id", 0), p.get("title", ""), t.get("refId", "?"), expr)
            q.promql, q.problem = sub.substitute(expr)
            out.append(q)
    return out


def fmt_value(v: str) -> str:
    try:
        f = float(v)
    except ValueError:
        return v
    if math.isnan(f) or math.isinf(f):
        return v
    return f"{f:.6g}"


def instant_query(prometheus: str, promql: str, at: float | None, timeout: float) -> dict:
    params = {"query": promql}
    if at is not None:
        params["time"] = f"{at:.3f}"
    url = prometheus.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # 400/422 carry a JSON error body
        try:
            return json.loads(e.read())
        except Exception:
            return {"status": "error", "error": f"HTTP {e.code}"}


def evaluate(prometheus: str, q: Query, at: float | None, timeout: float, allow_empty: re.Pattern | None) -> Result:
    if q.problem:
        return Result(q, "error", q.problem, [])
    try:
        body = instant_query(prometheus, q.promql, at, timeout)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        return Result(q, "error", f"request failed: {e}", [])
    if body.get("status") != "success":
        return Result(q, "error", f"{body.get('errorType', 'error')}: {body.get('error')} | {q.promql}", [])
    data = body["data"]
    kind = data["resultType"]
    if kind in ("scalar", "string"):
        samples = [({}, data["result"][1])]
    else:
        samples = [(s["metric"], (s.get("value") or s.get("values", [[0, "NaN"]])[-1])[1]) for s in data["result"]]
    if not samples:
        if allow_empty and (allow_empty.search(q.panel_title) or allow_empty.search(q.expr)):
            return Result(q, "allowed-empty", "no data (allowed by --allow-empty)", [])
        return Result(q, "empty", f"no data | {q.promql}", [])
    shown = []
    for labels, v in samples[:4]:
        lab = ",".join(f"{k}={val}" for k, val in sorted(labels.items()) if k != "__name__")
        shown.append(f"{{{lab}}}={fmt_value(v)}")
    more = f" (+{len(samples) - 4} more)" if len(samples) > 4 else ""
    status = "ok"
    if all(str(v).lower() == "nan" for _, v in samples):
        status = "nan"
    return Result(q, status, f"{len(samples)} series: " + " ".join(shown) + more, samples)


def run(
    prometheus: str,
    dashboards: Iterable[str | Path],
    variables: dict[str, list[str]] | None = None,
    rate_interval: str = "1m",
    interval: str = "15s",
    range_: str = "5m",
    at: float | None = None,
    wait: float = 0.0,
    allow_empty: str | None = None,
    fail_on_nan: bool = False,
    timeout: float = 10.0,
    out=sys.stdout,
) -> tuple[int, list[Result]]:
    """Runs the check; returns (exit status, results). See the module docs."""
    builtins = {
        "__rate_interval": rate_interval,
        "__interval": interval,
        "__interval_ms": str(int(duration_seconds(interval) * 1000)),
        "__range": range_,
        "__range_s": str(int(duration_seconds(range_))),
        "__range_ms": str(int(duration_seconds(range_) * 1000)),
    }
    queries: list[Query] = []
    for path in dashboards:
        queries += extract_queries(Path(path), variables or {}, builtins)
    if not queries:
        print("no queries found in the dashboards", file=out)
        return 2, []
    allow = re.compile(allow_empty) if allow_empty else None
    deadline = time.monotonic() + wait
    results = {id(q): evaluate(prometheus, q, at, timeout, allow) for q in queries}

    def failing() -> list[Query]:
        return [q for q in queries if results[id(q)].failed or (fail_on_nan and results[id(q)].status == "nan")]

    while failing() and time.monotonic() < deadline:
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        for q in failing():
            if not q.problem:
                results[id(q)] = evaluate(prometheus, q, at, timeout, allow)
    ordered = [results[id(q)] for q in queries]
    for r in ordered:
        print(r.line(), file=out)
    bad = [r for r in ordered if r.failed or (fail_on_nan and r.status == "nan")]
    counts = {}
    for r in ordered:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"\n{len(ordered)} queries: {summary}", file=out)
    if bad:
        print(f"FAILED: {len(bad)} quer{'y' if len(bad) == 1 else 'ies'} returned no data or an error:", file=out)
        for r in bad:
            print(f"  - {r.query.dashboard} #{r.query.panel_id} {r.query.panel_title!r} {r.query.ref_id}: {r.status}: {r.detail}", file=out)
            print(f"      expr: {r.query.expr}", file=out)
        return 1, ordered
    return 0, ordered


def reachable(prometheus: str, timeout: float) -> str:
    """'' when Prometheus answers, else why not."""
    try:
        with urllib.request.urlopen(prometheus.rstrip("/") + "/api/v1/status/buildinfo", timeout=timeout) as r:
            json.loads(r.read())
        return ""
    except Exception as e:  # noqa: BLE001 - any failure means unreachable
        return f"{prometheus} does not answer /api/v1/status/buildinfo: {e}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dashboards", nargs="+", help="dashboard JSON files")
    ap.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    for name in ("job", "namespace", "pod"):
        ap.add_argument(f"--{name}", action="append", default=[], metavar=name.upper(), help=f"value(s) of ${name}; default All")
    ap.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="any other variable (commas: several values)")
    ap.add_argument("--rate-interval", default="1m", help="$__rate_interval (default 1m)")
    ap.add_argument("--interval", default="15s", help="$__interval (default 15s)")
    ap.add_argument("--range", dest="range_", default="5m", help="$__range (default 5m)")
    ap.add_argument("--time", type=float, default=None, help="evaluation time (Unix seconds); default now")
    ap.add_argument("--wait", type=float, default=0.0, help="retry failing queries for up to this many seconds")
    ap.add_argument("--allow-empty", default=None, metavar="REGEX", help="panels (title or expr) allowed to return no data")
    ap.add_argument("--fail-on-nan", action="store_true", help="fail queries whose every value is NaN")
    ap.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    ap.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="write the results as JSON")
    a = ap.parse_args(argv)

    def split(vals: list[str]) -> list[str]:
        return [x for v in vals for x in v.split(",") if x]

    variables = {n: split(getattr(a, n)) for n in ("job", "namespace", "pod") if getattr(a, n)}
    for kv in a.var:
        if "=" not in kv:
            ap.error(f"--var {kv!r}: expected NAME=VALUE")
        k, v = kv.split("=", 1)
        variables[k] = split([v])
    for d in ("rate_interval", "interval", "range_"):
        try:
            duration_seconds(getattr(a, d))
        except ValueError as e:
            ap.error(str(e))
    for path in a.dashboards:
        try:
            json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            print(f"{path}: cannot read dashboard: {e}", file=sys.stderr)
            return 2
    why = reachable(a.prometheus, a.timeout)
    if why:
        print(why, file=sys.stderr)
        return 2
    rc, results = run(a.prometheus, a.dashboards, variables, a.rate_interval, a.interval, a.range_, a.time,
                      a.wait, a.allow_empty, a.fail_on_nan, a.timeout)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps([
            {"dashboard": r.query.dashboard, "panel_id": r.query.panel_id, "panel": r.query.panel_title,
             "ref_id": r.query.ref_id, "expr": r.query.expr, "promql": r.query.promql, "status": r.status,
             "detail": r.detail, "samples": [{"labels": lab, "value": v} for lab, v in r.samples]}
            for r in results], indent=2) + "\n", encoding="utf-8")
    return rc


if __name__ == "__main__":
    sys.exit(main())
