#!/usr/bin/env python3
"""Time the Python peers of clipstream's preprocessing on one core, on the same
files: Pillow's JPEG decode alone (libjpeg-turbo with SIMD: the floor for
bit-exact output), transformers' CLIPImageProcessorPil (the reference
clipstream reproduces), and its torchvision "fast" processor when torch and
torchvision are installed.

    python scripts/bench_hf_preprocess.py --images DIR [--seconds N]

The processors come from tests/fixtures/clip-tiny/preprocessor_config.json
(OpenAI CLIP settings: shortest edge 224 bicubic, centre crop 224, rescale,
normalise). Each one processes every image file in DIR, one at a time, opening
each with PIL every time (decode included), in passes over the folder until N
seconds (default 10) have elapsed. One line per peer:

    peer <name> images_per_s=<float> cpu_ms=<float> n=<int> <description>

(cpu_ms: process CPU time per image.) `clipstream bench --host-cost --python
PATH` runs this and prints the lines in its table. Needs Pillow, numpy and
transformers; torch is optional.
"""

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

try:
    import torch

    torch.set_num_threads(1)
except ImportError:
    torch = None

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "tests" / "fixtures" / "clip-tiny"
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def timed(name, description, files, seconds, one):
    one(files[0])  # warm-up (imports, lazy initialisation)
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while True:
        for p in files:
            one(p)
            n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    cpu = time.process_time() - c0
    print(f"peer {name} images_per_s={n / elapsed:.2f} cpu_ms={1000 * cpu / n:.3f} n={n} {description}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True, help="folder of images (not recursive)")
    ap.add_argument("--seconds", type=float, default=10.0, help="minimum time per peer (default 10)")
    args = ap.parse_args()

    files = sorted(p for p in args.images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXT)
    if not files:
        sys.exit(f"no image files in {args.images}")
    warnings.filterwarnings("ignore")

    def decode(path):
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"))
        assert a.ndim == 3

    timed("pillow_decode", f"Pillow {Image.__version__} JPEG decode alone", files, args.seconds, decode)

    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil.from_pretrained(str(MODEL_DIR))

    def pil(path):
        with Image.open(path) as im:
            out = proc(im, return_tensors="np")["pixel_values"]
        assert out.shape == (1, 3, 224, 224)

    timed("hf_pil", "transformers CLIPImageProcessorPil", files, args.seconds, pil)

    try:
        import torchvision  # noqa: F401
        from transformers import CLIPImageProcessor  # torchvision backend in transformers 5
    except ImportError:
        print("(transformers' fast processor skipped: torch and torchvision are not installed)", file=sys.stderr)
        return
    fast = CLIPImageProcessor.from_pretrained(str(MODEL_DIR))

    def tv(path):
        with Image.open(path) as im:
            out = fast(im, return_tensors="pt")["pixel_values"]
        assert tuple(out.shape) == (1, 3, 224, 224)

    timed("hf_fast", "transformers CLIPImageProcessor (torchvision backend)", files, args.seconds, tv)


if __name__ == "__main__":
    main()
