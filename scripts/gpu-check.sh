#!/usr/bin/env bash
# The first run on a GPU machine, as one script: fetches ONNX Runtime's GPU
# build, checks CUDA against CPU embeddings (cosine >= 0.9999 fp32, >= 0.999
# fp16), then benchmarks ViT-B/32 (random weights) on CUDA and TensorRT with
# GPU utilisation sampled by nvidia-smi and the host CPU-ms per record, split
# into the towers' runs (the host's share of the GPU's work) and the rest
# (with float and with uint8 model input, `[image] model_input`, side by
# side: the uint8 input is meant for GPUs and has only been measured on CPU).
# The parity step also checks that images reach the GPU through a pinned
# host buffer and I/O binding. Exits non-zero with the reason on any
# mismatch. Meant to finish within 10
# minutes on one H100/H200.
#
#   scripts/gpu-check.sh                # needs nvidia-smi, python3 with pip
#
# CUDA 13, cuBLAS and cuDNN 9 are taken from the environment, or from the
# nvidia-* Python packages next to torch (their lib folders are added to
# LD_LIBRARY_PATH). The ViT-B/32 export needs torch, transformers and onnx
# (tests/fixtures/make_fixtures.py vit-b32); without them that part is
# skipped with a message, and the run is not a pass.
#
# Not yet run on a GPU: the development machines have none.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "gpu-check: FAIL: $*" >&2; exit 1; }
step() { printf '\n== %s\n' "$*"; }
command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: no NVIDIA driver here"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

step "ONNX Runtime GPU build"
lib="$(scripts/fetch-onnxruntime.sh --gpu | tail -1)"
export ORT_DYLIB_PATH="$lib"
python="${PYTHON:-python3}"
# CUDA libraries from torch's nvidia packages, when present.
extra="$("$python" - <<'PY' 2>/dev/null || true
import glob, os, site
dirs = set()
for base in site.getsitepackages() + [site.getusersitepackages()]:
    for d in glob.glob(os.path.join(base, "nvidia", "*", "lib")):
        dirs.add(d)
print(":".join(sorted(dirs)))
PY
)"
[[ -n "$extra" ]] && export LD_LIBRARY_PATH="$extra${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

step "Build"
cargo build --release --locked -p clipstream
bin=target/release/clipstream
model=tests/fixtures/clip-tiny
images=(tests/fixtures/images/jpeg-baseline-420.jpg tests/fixtures/images/png-rgb.png tests/fixtures/images/jpeg-1600x1200.jpg)

step "Parity: CUDA against CPU"
out="$(mktemp -d)"
trap 'rm -rf "$out"; kill $(jobs -p) 2>/dev/null || true' EXIT
args=()
for i in "${images[@]}"; do args+=(--image "$i"); done
args+=(--text "a red circle" --text "a photo of a blue square")
for variant in fp32 fp16; do
  "$bin" embed --model "$model" --variant "$variant" --provider cpu "${args[@]}" >"$out/cpu-$variant.jsonl"
  # Images go through the pinned input buffer and I/O binding (the
  # pipeline's path); the log says whether the buffer is pinned.
  CLIPSTREAM_LOG=warn,clipstream_model=info \
    "$bin" embed --model "$model" --variant "$variant" --provider cuda "${args[@]}" \
    >"$out/cuda-$variant.jsonl" 2>"$out/cuda-$variant.log" \
    || { cat "$out/cuda-$variant.log" >&2; fail "embedding on CUDA ($variant) failed"; }
  grep -q 'vision input buffer.*pinned=true.*io_binding=true' "$out/cuda-$variant.log" \
    || fail "the CUDA session gave no pinned input buffer ($variant): $(grep -i pinned "$out/cuda-$variant.log" || echo 'no log line')"
done
"$python" - "$out" <<'PY' || fail "CUDA embeddings differ from CPU ones"
import json, math, sys
out = sys.argv[1]
bad = False
for variant, bar in (("fp32", 0.9999), ("fp16", 0.999)):
    cpu = [json.loads(l) for l in open(f"{out}/cpu-{variant}.jsonl")]
    gpu = [json.loads(l) for l in open(f"{out}/cuda-{variant}.jsonl")]
    assert len(cpu) == len(gpu) > 0, "different numbers of lines"
    worst = 1.0
    for a, b in zip(cpu, gpu):
        x, y = a["embedding"], b["embedding"]
        c = sum(p * q for p, q in zip(x, y)) / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))
        worst = min(worst, c)
    print(f"{variant}: worst cosine CUDA vs CPU {worst:.6f} (bar {bar})")
    bad |= worst < bar
sys.exit(1 if bad else 0)
PY

step "ViT-B/32 (random weights)"
vit=.cache/models/clip-vit-b32-random
if [[ ! -f "$vit/vision_model.onnx" ]]; then
  "$python" tests/fixtures/make_fixtures.py vit-b32 --out "$vit" \
    || fail "cannot export ViT-B/32 (needs torch, transformers, onnx in $python)"
fi
for provider in cuda tensorrt; do
  step "bench on $provider"
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 >"$out/util-$provider.txt" &
  smi=$!
  "$bin" bench --model "$vit" --provider "$provider" --batch-size 64 --seconds 10 \
    --pipeline-records 4096 --only vision --only pipeline \
    || fail "bench on $provider failed"
  "$bin" bench --host-cost --model "$model" --provider "$provider" --seconds 3 \
    | grep -E '^(part|local job)' || fail "host cost on $provider failed"
  kill "$smi" 2>/dev/null || true
  "$python" - "$out/util-$provider.txt" <<'PY'
import sys
v = [float(x) for x in open(sys.argv[1]) if x.strip()]
print(f"GPU utilisation: mean {sum(v) / max(len(v), 1):.0f}%, max {max(v, default=0):.0f}% over {len(v)} samples")
PY
done
echo "gpu-check: PASS"
