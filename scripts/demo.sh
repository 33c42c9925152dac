#!/usr/bin/env bash
# The main job on its embedded default, from a fresh clone: fetches ONNX
# Runtime, builds clipstream, and runs pipelines/local.toml (bundled sample
# images and captions, the bundled tiny shapes CLIP, Parquet into out/local/).
#
#   scripts/demo.sh            # extra arguments go to `clipstream run`
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-deps.sh
scripts/fetch-onnxruntime.sh >/dev/null
cargo build --release --locked -p clipstream
exec target/release/clipstream run pipelines/local.toml "$@"
