#!/usr/bin/env bash
# Fetches the ONNX Runtime shared library that clipstream loads at run time
# (ort's `load-dynamic`), from the PyPI wheel, into .cache/onnxruntime/.
#
#   scripts/fetch-onnxruntime.sh           # CPU build (the `onnxruntime` wheel)
#   scripts/fetch-onnxruntime.sh --gpu     # CUDA 13 build (the `onnxruntime-gpu` wheel, ~255 MB)
#
# Only pip and a Python 3 are needed; nothing is downloaded except the wheel.
# Re-running is a no-op once the library is there.
set -euo pipefail

version="${ORT_VERSION:-1.31.1}"
package="onnxruntime"
flavour="cpu"
if [[ "${1:-}" == "--gpu" ]]; then
  package="onnxruntime-gpu"
  flavour="gpu"
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.cache/onnxruntime/$flavour-$version"
lib="$dest/libonnxruntime.so.$version"

if [[ -f "$lib" ]]; then
  echo "$lib"
  exit 0
fi

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
  echo "error: python3 with pip is needed to fetch ONNX Runtime from PyPI (set PYTHON=...)" >&2
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetching $package==$version from PyPI ..." >&2
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
  --dest "$tmp" "$package==$version" >&2

wheel="$(ls "$tmp"/*.whl | head -n 1)"
mkdir -p "$dest"
"$python" - "$wheel" "$dest" <<'PY'
import sys, zipfile, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("onnxruntime/capi/") and base.startswith("libonnxruntime") and ".so" in base:
            with z.open(name) as src, open(os.path.join(dest, base), "wb") as out:
                out.write(src.read())
PY

if [[ ! -f "$lib" ]]; then
  echo "error: $wheel did not contain onnxruntime/capi/libonnxruntime.so.$version" >&2
  exit 1
fi
ln -sf "libonnxruntime.so.$version" "$dest/libonnxruntime.so"
echo "$lib"
