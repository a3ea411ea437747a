"""The training main thread's work per 2,048-row step, against the device step it must hide behind.

  python bench/bench_main_thread.py [--rows 2048] [--repeats 3] [--image-share 0.61]

Per step the main thread receives the step's rows from the Grain workers (unpickled), collates
each side into its buckets (padding and M-RoPE positions, `Batcher.collate`) and widens them to
the shape the processes agree on (`RowCodec.collate`, `widen`). This script encodes 2,048 rows
once (the workers' part, not timed) at the recipe's sizes (config.data: train_max_length 1024,
mid_low images of 448x448 = 1,024 patches, docs/method.md §6's mix: 61% of queries hold an
image, positives are mostly text) with a tiny tokenizer (the main thread's work does not depend
on the model's width), then times those three parts.

Prints one JSON line: milliseconds per step of each part and in all, the device step that
docs/scale.md plans for 2B on one 8xH100 host (bench/scale_plan.py, same assumptions), and
their ratio; the target is at most 0.25. The load average is printed next to it, since
another process on the machine slows the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import tempfile
import time

import numpy as np
import PIL.Image
import scale_plan

from g2e import configuration
from g2e.data.preprocess import EmbedItem, Processor
from g2e.demo import tiny


def planned_device_step_s() -> float:
    """docs/scale.md's device seconds per training step, 2B on 8xH100."""
    (row,) = [
        r
        for r in scale_plan.plan(scale_plan.DEFAULT_RATES, 0.35)
        if (r["model"], r["machine"], r["stage"]) == ("2B", "8xH100", "train")
    ]
    return row["device_h"] * 3600 / (scale_plan.TRAIN_PAIRS / 2048)


def encoded_rows(processor: Processor, rows: int, image_share: float, seed: int = 0) -> tuple:
    """(queries, positives): `rows` Encoded items each; a share of the queries and a tenth of
    the positives hold a 448x448 image; texts of 20-120 words."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (448, 448, 3), np.uint8)
    image = PIL.Image.fromarray(pixels)
    words = "a red circle and two blue squares next to a green star on the left".split()

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(words, int(rng.integers(low, high))))

    def item(role: str, with_image: bool) -> object:
        prompt = "<|image_1|> " if with_image else ""
        return processor.encode(
            EmbedItem(prompt + text(20, 120), image if with_image else None, role, "bench")
        )

    queries = [item("query", rng.random() < image_share) for _ in range(rows)]
    positives = [item("candidate", rng.random() < 0.1) for _ in range(rows)]
    return queries, positives


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-share", type=float, default=0.61)
    args = parser.parse_args()
    data = configuration.base_config().data
    with tempfile.TemporaryDirectory() as folder:
        tiny.write_generator_assets(
            folder,
            [],
            vocab_size=512,
            hidden_size=32,
            layers=1,
            heads=2,
            kv_heads=1,
            vision_width=16,
            vision_layers=1,
        )
        processor = Processor.from_dir(
            folder,
            max_length=data.train_max_length,
            image_resolution=data.train_image_resolution,
            length_buckets=tuple(data.length_buckets),
            patch_buckets=tuple(data.patch_buckets),
        )
        queries, positives = encoded_rows(processor, args.rows, args.image_share)
    handed = [pickle.dumps(pair) for pair in zip(queries, positives)]  # one per worker result
    batcher = processor.batcher
    timings = {"unpickle_ms": [], "collate_ms": [], "widen_ms": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        pairs = [pickle.loads(blob) for blob in handed]
        timings["unpickle_ms"].append(time.perf_counter() - start)
        start = time.perf_counter()
        sides = [batcher.collate([p[i] for p in pairs]) for i in (0, 1)]
        timings["collate_ms"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for side in sides:  # agreed on one bucket more than this host's own
            length = side["input_ids"].shape[1]
            wider = min([b for b in batcher.length_buckets if b > length] or [length])
            batcher.widen(side, length=wider, num_patches=side["pixel_values"].shape[1])
        timings["widen_ms"].append(time.perf_counter() - start)
    figures = {k: round(1e3 * min(v), 1) for k, v in timings.items()}
    total_ms = sum(figures.values())
    device_ms = 1e3 * planned_device_step_s()
    print(
        json.dumps(
            {
                "rows": args.rows,
                **figures,
                "main_thread_ms": round(total_ms, 1),
                "planned_device_step_ms": round(device_ms),
                "ratio": round(total_ms / device_ms, 3),
                "target_ratio": 0.25,
                "load_average": os.getloadavg(),
            }
        )
    )


if __name__ == "__main__":
    main()
