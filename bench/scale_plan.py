"""The real-scale plan of docs/scale.md, computed from measured per-core host rates.

  python bench/scale_plan.py [--rates bench_scale.json] [--mfu 0.35] > docs/scale.md

Host rates (ms of one core per prepared image, by kind and policy) come from
`bench/bench_scale.py --parts throughput` (its JSON line), or the defaults below, which are that
benchmark's 1-worker figures on this project's 2-core VM. Device time is model FLOPs at an
assumed MFU (`--mfu`, of dense bf16 peak). Everything else is docs/method.md §6's sizes and the recipe's
settings; every assumption is printed with the table.
"""

from __future__ import annotations

import argparse
import json

# ms of one core per image through the host pipeline (decode, policy, resize, uint8 patches,
# tokenise): `bench/bench_scale.py --parts throughput`, 1 worker, this project's 2-core VM
# otherwise idle (2026-12-07, 1-minute load average 0.17-0.85 while measured; the figures of
# 2026-11-28, taken beside other work, were about twice these).
DEFAULT_RATES = {
    "photo/mid_low": 24.0,
    "photo/random": 26.5,
    "page/mid_low": 119.8,
    "page/random": 145.8,
}
RATES_MEASURED = "2026-12-07, idle 2-core VM, load average 0.17-0.85"

MODELS = {  # non-embedding text parameters, vision tower parameters, hidden width
    "2B": dict(text=1.31e9, vision=0.665e9, width=1536),
    "7B": dict(text=6.53e9, vision=0.665e9, width=3584),
}
MACHINES = {  # accelerators, peak dense bf16 FLOP/s each, host cores for workers, hosts
    "8xH100": dict(chips=8, peak=989e12, cores=44, hosts=1, host_memory_gb=1000),
    "TPU v4-32": dict(chips=16, peak=275e12, cores=4 * 110, hosts=4, host_memory_gb=4 * 400),
}
# docs/method.md §6 and the recipe.
TRAIN_ROWS = 662_000  # 20 subsets, 50k cap
MINE_ITEMS = 1_100_000  # unique queries (~662k) + unique positives (~440k)
MINE_IMAGES = 820_000  # of them with an image (pages: DocVQA, InfoVQA, ChartQA)
MINE_PAGES = 92_000
JUDGE_PAIRS = 1_200_000  # ~41k phase-1 clusters x 15 owners, x2 for speculation
EVAL_ITEMS = 190_000  # 36 x 1000 queries + ~150k unique candidates
EVAL_IMAGES = 100_000
EVAL_PAGES = 3_000
TRAIN_PAIRS = 1500 * 2048
TRAIN_IMAGES = 1500 * 2500  # ~2.5k images a step (448x448)
TRAIN_PAGES = TRAIN_IMAGES // 10
TOKENS_IMAGE_ITEM = 475  # ~100 text + ~375 image tokens ('random': ~1500 patches)
TOKENS_TEXT_ITEM = 100
PATCHES_RANDOM, PATCHES_448 = 1500, 1024
TOKENS_TRAIN_IMAGE_SIDE, TOKENS_TRAIN_TEXT_SIDE = 360, 100
WINDOW_ITEMS = 1024  # the runner's window: 8 batches of 128 rows per host
BYTES_PER_PATCH = 588  # uint8, one frame


TARGET_H = 3.0  # the 2B recipe on one 8xH100 node
# config.data's buckets: a row pays for the bucket its length and patches fall in.
LENGTH_BUCKETS = (128, 256, 512, 1024, 2048)
PATCH_BUCKETS = (0, 1024, 2048, 4096, 16384)
# Peak RSS of one Grain worker reading rows by index (tests/data/test_arrow_rows: 0.24 GB at
# 5,000 and at 100,000 rows), times the workers a host runs.
WORKER_GB = 0.25


def padded(value: float, buckets: tuple[int, ...]) -> int:
    """The bucket a row of `value` tokens or patches is padded to."""
    return min(b for b in buckets if b >= value)


def _forward(model: dict, tokens: float, patches: float) -> float:
    """Forward FLOPs of one item, as padded to its buckets: 2 x parameters per token / patch
    (attention left out)."""
    tokens, patches = padded(tokens, LENGTH_BUCKETS), padded(patches, PATCH_BUCKETS)
    return 2 * model["text"] * tokens + 2 * model["vision"] * patches


def plan(rates: dict[str, float], mfu: float) -> list[dict]:
    rows = []
    for model_name, model in MODELS.items():
        image_item = _forward(model, TOKENS_IMAGE_ITEM, PATCHES_RANDOM)
        text_item = _forward(model, TOKENS_TEXT_ITEM, 0)
        pair = _forward(model, TOKENS_IMAGE_ITEM + TOKENS_TEXT_ITEM, 2 * PATCHES_RANDOM) * 0.6
        # Training: text forward + backward through frozen weights (2x forward), vision once.
        train_tokens = 1.22 * padded(TOKENS_TRAIN_IMAGE_SIDE, LENGTH_BUCKETS) + 0.78 * padded(
            TOKENS_TRAIN_TEXT_SIDE, LENGTH_BUCKETS
        )
        train_pair = 3 * 2 * model["text"] * train_tokens + 1.22 * 2 * model["vision"] * padded(
            PATCHES_448, PATCH_BUCKETS
        )
        work = {
            "mine": (
                MINE_IMAGES * image_item
                + (MINE_ITEMS - MINE_IMAGES) * text_item
                + JUDGE_PAIRS * pair,
                (MINE_IMAGES - MINE_PAGES) * rates["photo/random"]
                + MINE_PAGES * rates["page/random"]
                + JUDGE_PAIRS * 1.4 * rates["photo/random"],
            ),
            "train": (
                TRAIN_PAIRS * train_pair,
                (TRAIN_IMAGES - TRAIN_PAGES) * rates["photo/mid_low"]
                + TRAIN_PAGES * rates["page/mid_low"],
            ),
            "eval (36 subsets)": (
                EVAL_IMAGES * image_item + (EVAL_ITEMS - EVAL_IMAGES) * text_item,
                (EVAL_IMAGES - EVAL_PAGES) * rates["photo/random"]
                + EVAL_PAGES * rates["page/random"],
            ),
        }
        for machine_name, machine in MACHINES.items():
            for stage, (flops, host_ms) in work.items():
                device_s = flops / (machine["chips"] * machine["peak"] * mfu)
                host_s = host_ms / 1e3 / machine["cores"]
                rows.append(
                    {
                        "model": model_name,
                        "machine": machine_name,
                        "stage": stage,
                        "device_h": device_s / 3600,
                        "host_h": host_s / 3600,
                        "wall_h": max(device_s, host_s) / 3600,
                        "host_bound": host_s > device_s,
                        **_memory_and_disk(model, stage, machine),
                    }
                )
    return rows


def _memory_and_disk(model: dict, stage: str, machine: dict) -> dict:
    """Host memory per host (GB) and disk (GB) of a stage, from the design's bounds and the
    workers' measured peak."""
    window = WINDOW_ITEMS * PATCHES_RANDOM * BYTES_PER_PATCH
    if stage == "mine":
        embeddings = 2 * 123_000 * model["width"] * 4  # the largest subset, both sides
        memory = window + embeddings + 0.3e9  # + rows of the largest subset
        disk = MINE_ITEMS * model["width"] * 2  # float16 shards
    elif stage == "train":
        memory = 4 * 256 * 2 * PATCHES_448 * BYTES_PER_PATCH + 0.3e9 * 2  # steps ahead, rows
        disk = 3 * 0.11e9 * (model["text"] / 1.31e9) ** 0.5  # keep 3 adapter checkpoints
    else:
        memory = window + 150_000 * model["width"] * 4
        disk = EVAL_ITEMS * model["width"] * 2
    workers = WORKER_GB * machine["cores"] / machine["hosts"]
    return {"host_memory_gb": (memory + 3e9) / 1e9 + workers, "disk_gb": disk / 1e9}


def _recipe_lines(rows: list[dict]) -> list[str]:
    """The whole recipe (eval, mine, train, eval) per model and machine, in wall hours."""
    lines = []
    for model in MODELS:
        for machine in MACHINES:
            stages = {r["stage"]: r for r in rows if (r["model"], r["machine"]) == (model, machine)}
            wall = sum(r["wall_h"] for r in stages.values()) + stages["eval (36 subsets)"]["wall_h"]
            bound = [
                f"{name} (host {r['host_h']:.2f} h against device {r['device_h']:.2f} h)"
                for name, r in stages.items()
                if r["host_bound"]
            ]
            lines.append(
                f"- {model} on {machine}, the whole recipe (eval, mine, train, eval): "
                f"**{wall:.2f} h** of wall time; "
                + (f"host-bound: {', '.join(bound)}" if bound else "the host never the bottleneck")
            )
            if (model, machine) == ("2B", "8xH100") and wall > TARGET_H:
                longest = max(stages.values(), key=lambda r: r["wall_h"])
                lines[-1] += (
                    f". Over the {TARGET_H:.0f}-h target by {wall - TARGET_H:.2f} h; the longest "
                    f"stage is {longest['stage']} ({longest['wall_h']:.2f} h, device-bound: "
                    "rows padded to their buckets; packing rows would recover most of it)"
                )
    return lines


def markdown(
    rows: list[dict], rates: dict[str, float], mfu: float, measured: str = RATES_MEASURED
) -> str:
    lines = [
        "# g2e at MMEB scale: a plan",
        "",
        "A plan, not a measurement: no accelerator has run the recipe yet. Written by "
        "`python bench/scale_plan.py > docs/scale.md` (host rates measured on this project's "
        "2-core VM; device time from model FLOPs, rows padded to their length and patch "
        "buckets, at an assumed MFU). Wall time is the larger of device and host time, since "
        "the host work runs in Grain workers for every stage (training's rows, the embedding "
        "runner's items for eval, mine and the judge's pairs) and overlaps the device; "
        "host-bound says which one sets it.",
        "",
        *_recipe_lines(rows),
        "",
        "| Model | Machine | Stage | Device (h) | Host (h) | Wall (h) | Host-bound | "
        "Host memory per host (GB) | Disk (GB) |",
        "|---" * 9 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['machine']} | {r['stage']} | {r['device_h']:.2f} | "
            f"{r['host_h']:.2f} | {r['wall_h']:.2f} | "
            f"{'yes' if r['host_bound'] else 'no'} | {r['host_memory_gb']:.0f} | "
            f"{r['disk_gb']:.1f} |"
        )
    lines += [
        "",
        f"Host rates (ms per image, one core; {measured}): {json.dumps(rates)}; MFU {mfu:.0%}; "
        f"length buckets {LENGTH_BUCKETS}, patch buckets {PATCH_BUCKETS}; "
        f"{WORKER_GB} GB per Grain worker, one worker per host core.",
        "",
        "Sizes (docs/method.md §6 and the recipe):",
        "",
    ]
    lines += [
        f"- {name}: {value:,}"
        for name, value in (
            ("training rows (20 subsets, 50k cap)", TRAIN_ROWS),
            ("items embedded by mining (unique queries and positives)", MINE_ITEMS),
            ("of them with an image", MINE_IMAGES),
            ("of them document pages", MINE_PAGES),
            ("judge pairs (phase-1 clusters x 15 owners, x2 for speculation)", JUDGE_PAIRS),
            ("items embedded by evaluation (36 x 1000 queries + unique candidates)", EVAL_ITEMS),
            ("evaluation images", EVAL_IMAGES),
            ("evaluation pages", EVAL_PAGES),
            ("training pairs (1500 steps x 2048)", TRAIN_PAIRS),
            ("training images (448x448)", TRAIN_IMAGES),
        )
    ]
    lines += [
        f"- {name}: {m['chips']} chips of {m['peak'] / 1e12:.0f} TFLOP/s bf16, "
        f"{m['hosts']} host(s), {m['cores']} host cores for workers"
        for name, m in MACHINES.items()
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", default="", help="bench_scale.py's JSON output (a file)")
    parser.add_argument("--mfu", type=float, default=0.35)
    args = parser.parse_args()
    rates, measured = dict(DEFAULT_RATES), RATES_MEASURED
    if args.rates:
        for line in open(args.rates):
            if line.startswith('{"throughput"'):
                figures = json.loads(line)["throughput"]
                rates.update({k: v["ms_per_image_1"] for k, v in figures.items()})
                loads = [x for v in figures.values() for x in v.get("load_average", [])]
                measured = f"{args.rates}" + (
                    f", load average {min(loads):.2f}-{max(loads):.2f}" if loads else ""
                )
    print(markdown(plan(rates, args.mfu), rates, args.mfu, measured), end="")


if __name__ == "__main__":
    main()
