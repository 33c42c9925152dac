#!/usr/bin/env bash
# The operations checks: Grafana dashboards, Helm chart, and their plumbing.
#
#   scripts/check-ops.sh
#   CLIPSTREAM_BIN=target/debug/clipstream scripts/check-ops.sh
#
# Steps (all run; the summary lists each with its time; exit 1 if any failed):
#   1. set-up: Python venv .cache/ops-venv from tests/ops/requirements.txt and
#      npm packages in .cache/ops-npm from tests/ops/grafana/package-lock.json
#      (both redone only when those files change);
#   2. dashboards/build.py --check: the committed dashboards (and the chart's
#      copies) match their source;
#   3. tests/ops/grafana/typecheck.mjs: dashboards against @grafana/schema's
#      Dashboard type and the panel plugins' option types, tsc --strict;
#   4. tests/ops/check_chart.py: helm lint, render of the defaults and
#      helm/clipstream/ci/*-values.yaml, Kubernetes schemas (1.29 and 1.31,
#      strict), cross-references, the pipeline TOML (`clipstream validate`
#      with CLIPSTREAM_BIN), and bad values that must be rejected;
#   5. tests/ops/test_dashboard_queries.py: every dashboard query against a real
#      Prometheus scraping a fake exporter (skipped when `prometheus` is not on
#      PATH: scripts/install-prometheus.sh installs it).
#
# Environment:
#   CLIPSTREAM_BIN       clipstream binary for `clipstream validate` (unset: that step is skipped)
#   CLIPSTREAM_VALIDATE  auto (default: a binary without the Kafka source is reported, not failed),
#                        require, or skip
#   OPS_PROMETHEUS       auto (default: run step 5 when prometheus is on PATH), require, or skip
# Needs python3 (with venv) and node + npm; the first run downloads the
# Python wheels (about 80 MB, PyPI) and two npm packages.
set -uo pipefail
cd "$(dirname "$0")/.."

venv=.cache/ops-venv
npmdir=.cache/ops-npm
declare -a summary=()
failed=0

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }
step() { printf '\n==> %s\n' "$*"; }
record() { # name status start
  summary+=("$(printf '%-34s %-8s %s' "$1" "$2" "$(elapsed "$3")")")
  [[ "$2" == FAILED ]] && failed=1
  return 0
}
hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# --- 1. set-up ----------------------------------------------------------------
step "set-up: Python venv ($venv) and npm packages ($npmdir)"
t=$(now)
setup_ok=1
req=tests/ops/requirements.txt
want="$(hash_of "$req")"
if [[ ! -x "$venv/bin/python" || "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]]; then
  echo "installing $req into $venv ..."
  rm -rf "$venv"
  if python3 -m venv "$venv" \
    && "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$req"; then
    echo "$want" > "$venv/.requirements.sha256"
  else
    echo "error: could not create $venv (python3 -m venv, pip install -r $req)" >&2
    setup_ok=0
  fi
else
  echo "venv up to date"
fi
lock=tests/ops/grafana/package-lock.json
want="$(hash_of tests/ops/grafana/package.json "$lock")"
if ! command -v npm >/dev/null 2>&1; then
  echo "error: node and npm are needed for the Grafana type check" >&2
  setup_ok=0
elif [[ ! -d "$npmdir/node_modules" || "$(cat "$npmdir/.lock.sha256" 2>/dev/null)" != "$want" ]]; then
  echo "installing npm packages from $lock into $npmdir ..."
  rm -rf "$npmdir"
  mkdir -p "$npmdir"
  cp tests/ops/grafana/package.json "$lock" "$npmdir/"
  if (cd "$npmdir" && npm ci --no-audit --no-fund --loglevel=error); then
    echo "$want" > "$npmdir/.lock.sha256"
  else
    echo "error: npm ci failed in $npmdir" >&2
    setup_ok=0
  fi
else
  echo "npm packages up to date"
fi
if [[ $setup_ok == 1 ]]; then record "set-up" ok "$t"; else record "set-up" FAILED "$t"; fi

# --- 2. dashboards up to date ----------------------------------------------------
step "dashboards/build.py --check"
t=$(now)
if python3 dashboards/build.py --check; then record "dashboards up to date" ok "$t"; else record "dashboards up to date" FAILED "$t"; fi

# --- 3. Grafana type check -------------------------------------------------------
step "Grafana dashboards: @grafana/schema type check (tsc --strict)"
t=$(now)
if [[ -d "$npmdir/node_modules" ]] && node tests/ops/grafana/typecheck.mjs --project "$npmdir" dashboards/clipstream-*.json; then
  record "grafana type check" ok "$t"
else
  record "grafana type check" FAILED "$t"
fi

# --- 4. Helm chart ---------------------------------------------------------------
step "Helm chart: lint, render, Kubernetes schemas, pipeline TOML, rejections"
t=$(now)
chart_args=(--validate-mode "${CLIPSTREAM_VALIDATE:-auto}")
if [[ -n "${CLIPSTREAM_BIN:-}" ]]; then
  chart_args+=(--clipstream-bin "$CLIPSTREAM_BIN")
else
  echo "(CLIPSTREAM_BIN is not set: the \`clipstream validate\` step is skipped)"
fi
log="$(mktemp)"
if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" tests/ops/check_chart.py "${chart_args[@]}" | tee "$log"; then
  if grep -q '^clipstream validate: 0 ran' "$log"; then
    record "helm chart (validate skipped)" ok "$t"
  else
    record "helm chart" ok "$t"
  fi
else
  record "helm chart" FAILED "$t"
fi
rm -f "$log"

# --- 5. dashboard queries against Prometheus ---------------------------------------
step "dashboard queries against Prometheus + fake exporter"
t=$(now)
mode="${OPS_PROMETHEUS:-auto}"
if [[ "$mode" == skip ]]; then
  echo "skipped (OPS_PROMETHEUS=skip)"
  record "dashboard queries (plumbing)" skipped "$t"
elif ! command -v "${PROMETHEUS_BIN:-prometheus}" >/dev/null 2>&1; then
  echo "prometheus is not on PATH: run scripts/install-prometheus.sh (or set PROMETHEUS_BIN)"
  if [[ "$mode" == require ]]; then record "dashboard queries (plumbing)" FAILED "$t"; else record "dashboard queries (plumbing)" skipped "$t"; fi
else
  log="$(mktemp)"
  if python3 tests/ops/test_dashboard_queries.py >"$log" 2>&1; then
    tail -n 3 "$log"
    record "dashboard queries (plumbing)" ok "$t"
  else
    cat "$log"
    record "dashboard queries (plumbing)" FAILED "$t"
  fi
  rm -f "$log"
fi

printf '\n==> summary\n'
printf '  %s\n' "${summary[@]}"
if [[ $failed != 0 ]]; then
  echo "ops checks: FAILED"
  exit 1
fi
echo "ops checks: ok"
