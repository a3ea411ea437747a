"""Times the data path on the full mini-MMEB: draw it, prepare its TFDS copy, iterate it once.

  python bench/bench_data.py [--seed 0] [--scale 1.0] [--out DIR]

Prints one JSON line with the seconds of each step and the rows/images it handled.
"""

import argparse
import json
import os
import tempfile
import time

import tensorflow_datasets as tfds

from g2e.data import mmeb, tfds_builders, tfds_rows
from g2e.demo import mini_mmeb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--out", default="", help="work folder (default: a temporary one)")
    args = parser.parse_args()
    tfds.disable_progress_bar()
    out = args.out or tempfile.mkdtemp(prefix="bench_data_")
    source, data_dir = os.path.join(out, "mini"), os.path.join(out, "tfds")
    figures = {}

    start = time.perf_counter()
    mini_mmeb.build(
        source,
        seed=args.seed,
        train_rows=max(1, round(200 * args.scale)),
        eval_queries=max(2, round(60 * args.scale)),
    )
    figures["draw_s"] = time.perf_counter() - start

    start = time.perf_counter()
    train_dir, eval_dir = os.path.join(source, "train"), os.path.join(source, "eval")
    train_subsets, eval_subsets = mmeb.list_subsets(train_dir), mmeb.list_subsets(eval_dir)
    tfds_builders.prepare("train", train_dir, source, train_subsets, data_dir)
    tfds_builders.prepare("eval", eval_dir, source, eval_subsets, data_dir)
    figures["prepare_tfds_s"] = time.perf_counter() - start

    start = time.perf_counter()
    rows = images = 0
    sources = [("train", s, split) for s in train_subsets for split in mmeb.TRAIN_SPLITS]
    sources += [("eval", s, mmeb.EVAL_SPLIT) for s in eval_subsets]
    for kind, subset, split in sources:
        for row in tfds_rows.RowSource(kind, data_dir, subset, split):
            rows += 1
            if kind == "train":
                images += sum(x is not None for x in (row.qry_image, row.pos_image, row.neg_image))
            else:
                images += (row.qry_image is not None) + sum(x is not None for x in row.tgt_images)
    figures["iterate_s"] = time.perf_counter() - start

    figures = {k: round(v, 2) for k, v in figures.items()}
    figures.update(rows=rows, image_reads=images, subsets=len(sources), out=out)
    figures["total_s"] = round(
        figures["draw_s"] + figures["prepare_tfds_s"] + figures["iterate_s"], 2
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
