"""Host cost of preparing one image, by kind and policy, on one core.

  python bench/bench_images.py [--repeats 10] [--seed 0] [--cpu 0]

The images are synthetic MMEB's (g2e.data.synthetic_mmeb): a 640x480 JPEG photo and a
1700x2200 PNG document page, as files hold them. Each is taken through the steps a batch makes
it go through: decode (images.load_image, from the encoded bytes), the resolution policy
(images.apply_policy: 'mid_low' 448x448 for training, 'random' for mining and evaluation), and
Qwen2-VL's image processor (Qwen2VLImageProcessorPil with Qwen2-VL-2B-Instruct's min/max
pixels: resize to multiples of 28, normalise, cut 14x14x2 patches). The process is pinned to
one core (`--cpu`) and its math libraries to one thread. Prints ms per image (median of
`--repeats`) per step, the patches and float32 megabytes per image, then one JSON line.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from g2e.data import images, synthetic_mmeb  # noqa: E402

# Qwen2-VL-2B-Instruct's preprocessor_config.json.
MIN_PIXELS, MAX_PIXELS = 3136, 12845056
POLICIES = ("mid_low", "random")


def _timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, (time.perf_counter() - start) * 1e3


def measure(data: bytes, policy: str, processor, repeats: int) -> dict:
    """Median ms of each step over `repeats` runs, and the processed image's size."""
    steps = {"decode": [], "policy": [], "processor": []}
    for _ in range(repeats):
        image, ms = _timed(images.load_image, data)
        steps["decode"].append(ms)
        image, ms = _timed(images.apply_policy, image, policy)
        steps["policy"].append(ms)
        features, ms = _timed(lambda im: processor(images=[im], return_tensors="np"), image)
        steps["processor"].append(ms)
    patches = np.asarray(features["pixel_values"], np.float32)
    figures = {step: round(statistics.median(ms), 1) for step, ms in steps.items()}
    figures["total"] = round(sum(figures.values()), 1)
    figures.update(
        patches=int(patches.shape[0]),
        patch_mb=round(patches.nbytes / 2**20, 1),
        size=list(image.size),
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", type=int, default=0, help="the core to pin the process to")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    pool = synthetic_mmeb.Pool.draw(args.seed, 1, 1.0, with_pages=True)
    files = {"photo": pool.images["photo"][0], "page": pool.images["page"][0]}
    processor = transformers.Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    results = {}
    print(
        f"{'kind':6} {'policy':8} {'decode':>7} {'policy':>7} {'processor':>9} {'total':>7}"
        f" ms/image {'patches':>8} {'MB':>5}"
    )
    for kind, data in files.items():
        for policy in POLICIES:
            r = results[f"{kind}/{policy}"] = measure(data, policy, processor, args.repeats)
            r["file_kb"] = round(len(data) / 1024)
            print(
                f"{kind:6} {policy:8} {r['decode']:7.1f} {r['policy']:7.1f} "
                f"{r['processor']:9.1f} {r['total']:7.1f}          {r['patches']:8d} "
                f"{r['patch_mb']:5.1f}"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
