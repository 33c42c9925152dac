#!/usr/bin/env python3
"""Time transformers' CLIPImageProcessorPil on one core (the Python baseline for
clipstream's preprocessing).

    python scripts/bench_hf_preprocess.py --images DIR [--seconds N]

Loads the processor from tests/fixtures/clip-tiny/preprocessor_config.json (OpenAI CLIP
settings: shortest edge 224 bicubic, centre crop 224, rescale, normalise) and processes
every image file in DIR, one at a time, opening each with PIL every time (decode
included), in passes over the folder until N seconds (default 10) have elapsed.
The last line printed is

    hf_preprocess images_per_s=<float> n=<int>
"""

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

torch.set_num_threads(1)

from PIL import Image  # noqa: E402
from transformers import CLIPImageProcessorPil  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "tests" / "fixtures" / "clip-tiny"
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True, help="folder of images (not recursive)")
    ap.add_argument("--seconds", type=float, default=10.0, help="minimum time to run (default 10)")
    args = ap.parse_args()

    files = sorted(p for p in args.images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXT)
    if not files:
        sys.exit(f"no image files in {args.images}")
    warnings.filterwarnings("ignore")
    proc = CLIPImageProcessorPil.from_pretrained(str(MODEL_DIR))

    def one(path):
        with Image.open(path) as im:
            out = proc(im, return_tensors="np")["pixel_values"]
        assert out.shape == (1, 3, 224, 224)

    one(files[0])  # warm-up (imports, lazy initialisation)
    n = 0
    t0 = time.perf_counter()
    while True:
        for p in files:
            one(p)
            n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= args.seconds:
            break
    print(f"files={len(files)} passes={n // len(files)} elapsed_s={elapsed:.2f}")
    print(f"hf_preprocess images_per_s={n / elapsed:.2f} n={n}")


if __name__ == "__main__":
    main()
