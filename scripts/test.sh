#!/usr/bin/env bash
# The whole test suite, from a fresh clone: fetches ONNX Runtime and the test
# servers (tansu, a Kafka-protocol broker; s3s-fs, an S3 server; Prometheus)
# into the project cache, checks formatting and lints, builds, runs every
# test, then the operations checks (dashboards, Helm chart).
#
#   scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# A clean CI run builds everything once: the incremental cache (a gigabyte)
# would only take disk.
if [[ -n "${CI:-}" ]]; then export CARGO_INCREMENTAL=0; fi

step() { printf '\n==> %s\n' "$*"; }

step "Build dependencies (a C compiler, make, pkg-config, OpenSSL headers)"
scripts/build-deps.sh

step "ONNX Runtime"
scripts/fetch-onnxruntime.sh

step "Python test helpers (pyarrow reads the Parquet output independently; kafka-python sends odd messages; numpy recomputes eval's figures)"
# pyarrow 26 (older ones, 22 for one, fail on null fixed-size lists in Parquet).
venv=.cache/test-venv
pyarrow_version=26.0.1
kafka_python_version=3.0.12
numpy_version=2.3.5
if ! "$venv/bin/python" -c "import pyarrow, kafka, numpy, sys; sys.exit(pyarrow.__version__ != '$pyarrow_version' or kafka.__version__ != '$kafka_python_version' or numpy.__version__ != '$numpy_version')" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "pyarrow==$pyarrow_version" "kafka-python==$kafka_python_version" "numpy==$numpy_version"
fi
export CLIPSTREAM_TEST_PYTHON="$PWD/$venv/bin/python"

step "Test servers: Kafka-protocol broker and S3 server (scripts/stack.sh install)"
scripts/stack.sh install

step "Prometheus (scripts/install-prometheus.sh)"
scripts/install-prometheus.sh

step "Chromium, to open eval's HTML report in a browser (scripts/install-chromium.sh)"
CLIPSTREAM_CHROMIUM="$(scripts/install-chromium.sh)"
export CLIPSTREAM_CHROMIUM

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (-D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "rustdoc of the library crates (-D warnings: the module maps' links must resolve)"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps -p clipstream-model -p clipstream-pipeline

step "cargo test"
cargo test --workspace --locked

step "Operations: dashboards, Grafana schema, Helm chart, queries against Prometheus"
# `cargo test` built the binary the tests ran; `cargo build -p clipstream` alone
# resolves dev-dependency features differently and would rebuild the S3 stack.
test -x target/debug/clipstream || cargo build --locked -p clipstream
CLIPSTREAM_BIN=target/debug/clipstream CLIPSTREAM_VALIDATE=require OPS_PROMETHEUS=require \
  scripts/check-ops.sh

step "Disk used by the build"
du -sh target
