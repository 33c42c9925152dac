#!/usr/bin/env bash
# Installs Prometheus (and promtool) from Debian for the dashboard query
# checks (tests/ops/test_dashboard_queries.py, tests/ops/dashboard_queries.py).
#
#   scripts/install-prometheus.sh
#
# A no-op when `prometheus` is already on PATH. Otherwise needs root (or
# sudo) and apt: `apt-get install -y --no-install-recommends prometheus`
# (about 11 s on a fresh Debian 12). The Debian package's service is not
# started here (containers have no init; tests start their own Prometheus).
set -euo pipefail

if command -v prometheus >/dev/null 2>&1; then
  echo "prometheus already installed: $(command -v prometheus) ($(prometheus --version 2>&1 | head -n 1))"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: prometheus is not on PATH and apt-get is not available; install Prometheus 2.x some other way (or set PROMETHEUS_BIN)" >&2
  exit 1
fi

sudo=()
if [[ "$(id -u)" != 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    echo "error: installing prometheus with apt-get needs root (or sudo)" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
# The package's postinst would start the service where there is an init; in
# a container policy-rc.d (if any) and the missing init keep it stopped.
if ! "${sudo[@]}" apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1; then
  # Fresh images have no package lists yet.
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y --no-install-recommends prometheus >/dev/null
fi

if ! command -v prometheus >/dev/null 2>&1; then
  echo "error: apt-get installed prometheus but it is not on PATH" >&2
  exit 1
fi
echo "installed $(prometheus --version 2>&1 | head -n 1)"
