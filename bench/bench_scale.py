"""The host side at scale: memory of the mine stage, host throughput per worker, training waits.

  python bench/bench_scale.py [--parts memory,throughput,waits] [--out DIR]
      [--rows 2000,20000] [--steps 30]

Prints figures and one JSON line per part (issue 13's benchmark):
  (a) memory: peak RSS of `python -m g2e.main --config.stages=mine` (judge off) on one
      synthetic subset (g2e.data.synthetic_mmeb) of N rows, for each N of --rows, with a tiny
      random Qwen2-VL; the main process and its Grain workers apart. Target: ratio <= 1.3.
  (b) throughput: images per second of the host pipeline (decode, policy, resize, tokenise,
      uint8 patches: `Processor.encode` in `g2e.data.workers.stream`) with 1 and 2 worker
      processes, for photos (640x480 JPEG) and pages (~1700x2200 PNG), at 448x448 ('mid_low')
      and 'random'; steady state (from the first result on). Target: 2 workers >= 1.7x 1.
  (c) waits: the share of a training step the devices wait on the host, at the demo's shapes
      (global batch 16, clusters of 4, the demo's buckets): the same steps timed with the real
      input pipeline and with every step's host batch prepared beforehand. Target: <= 5%.
Everything runs on this machine's CPU; the per-core rates feed docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _tiny_checkpoint(out: pathlib.Path) -> pathlib.Path:
    """A tiny random Qwen2-VL checkpoint (no torch): the demo's tokenizer and widths."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from g2e.demo import tiny
    from g2e.models import hf_io
    from g2e.models.config import Qwen2VLConfig
    from g2e.models.qwen2_vl import Qwen2VL

    if (out / "model.safetensors.index.json").is_file():
        return out
    tiny.write_assets(
        out,
        hidden_size=64,
        layers=2,
        heads=4,
        kv_heads=2,
        vision_width=32,
        vision_heads=4,
        vision_layers=2,
        max_pixels=1280 * 28 * 28,
    )
    model = Qwen2VL(Qwen2VLConfig.from_dir(out), dtype=jnp.float32, rngs=nnx.Rngs(0))
    hf_io.save_hf(model, out, dtype=np.float32)
    return out


def _tree_rss_kib(pid: int) -> tuple[int, int]:
    """(RSS of `pid`, RSS of its descendants) in KiB, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))

    def rss(p: int) -> int:
        try:
            with open(f"/proc/{p}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    stack, below = list(children.get(pid, [])), 0
    while stack:
        child = stack.pop()
        below += rss(child)
        stack.extend(children.get(child, []))
    return rss(pid), below


def memory(out: pathlib.Path, rows: list[int]) -> dict:
    from g2e.data import synthetic_mmeb

    model_dir = _tiny_checkpoint(out / "model")
    figures = {}
    for count in rows:
        data = out / f"synthetic_{count}"
        if not (data / "subsets.json").is_file():
            synthetic_mmeb.build(
                str(data),
                rows=count,
                subsets=1,
                eval_queries=2,
                candidates=2,
                image_scale=0.5,
                pool=64,
            )
        workdir = out / f"mine_{count}"
        command = [
            sys.executable,
            "-m",
            "g2e.main",
            f"--config={REPO}/configs/mmeb.py",
            "--config.stages=mine",
            f"--config.model_dir={model_dir}",
            f"--config.data.train_dir={data / 'train'}",
            f"--config.data.train_image_root={data}",
            f"--config.workdir={workdir}",
            "--config.data.train_split=original",
            "--config.mine.judge=False",
            "--config.data.image_resolution=clip",
            "--config.model.dtype=float32",
            "--config.model.param_dtype=float32",
            "--config.model.remat=none",
            "--config.mine.batch_size=32",
            "--config.force=mine",
        ]
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
        env.pop("XLA_FLAGS", None)
        start = time.perf_counter()
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        peak = {"main": 0, "workers": 0, "total": 0}
        while process.poll() is None:
            main, workers = _tree_rss_kib(process.pid)
            peak = {
                "main": max(peak["main"], main),
                "workers": max(peak["workers"], workers),
                "total": max(peak["total"], main + workers),
            }
            time.sleep(0.2)
        if process.returncode:
            raise RuntimeError(f"mine on {count} rows failed:\n{process.stderr.read()[-3000:]}")
        figures[count] = {k: round(v / 1024, 1) for k, v in peak.items()}
        figures[count]["seconds"] = round(time.perf_counter() - start, 1)
        print(
            f"(a) mine, {count} rows: peak RSS main {figures[count]['main']} MiB, workers "
            f"{figures[count]['workers']} MiB, together {figures[count]['total']} MiB, "
            f"{figures[count]['seconds']} s",
            flush=True,
        )
    small, large = min(rows), max(rows)
    ratio = figures[large]["total"] / figures[small]["total"]
    print(f"(a) peak RSS ratio {large}/{small} rows: {ratio:.2f} (target <= 1.3)", flush=True)
    return {"peak_mib": figures, "ratio": round(ratio, 3)}


def throughput(out: pathlib.Path, per_kind: dict[str, int]) -> dict:
    from g2e.data import synthetic_mmeb, workers
    from g2e.data.preprocess import EmbedItem, Processor

    model_dir = _tiny_checkpoint(out / "model")
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    import numpy as np

    rng = np.random.default_rng(0)
    files = {"photo": [], "page": []}
    for kind, count in per_kind.items():
        draw = synthetic_mmeb.draw_photo if kind == "photo" else synthetic_mmeb.draw_page
        image = draw(rng)
        suffix, fmt = (".jpg", "JPEG") if kind == "photo" else (".png", "PNG")
        for i in range(count):
            path = folder / f"{kind}_{i}{suffix}"
            if not path.is_file():
                image.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            files[kind].append(str(path))
    figures = {}
    for policy in ("mid_low", "random"):
        processor = Processor.from_dir(
            model_dir,
            max_length=8192,
            image_resolution=policy,
            max_pixels=12845056,
            jpeg_draft=True,
            length_buckets=(8192,),
        )
        for kind, paths in files.items():
            items = [
                EmbedItem("<|image_1|>\nRepresent the given image.", p, "query") for p in paths
            ]
            rates, load_before = {}, os.getloadavg()[0]
            for count in (1, 2):
                stream = workers.stream(items, processor.encode, workers=count, min_items=0)
                next(stream)
                start = time.perf_counter()
                done = sum(1 for _ in stream)
                rates[count] = done / (time.perf_counter() - start)
            figures[f"{kind}/{policy}"] = {
                "images_per_s_1": round(rates[1], 2),
                "images_per_s_2": round(rates[2], 2),
                "ms_per_image_1": round(1e3 / rates[1], 1),
                # 1-minute load average before and after (another process slows the rates).
                "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "scaling": round(rates[2] / rates[1], 2),
            }
            print(
                f"(b) {kind:5s} {policy:8s}: 1 worker {rates[1]:6.1f} images/s "
                f"({1e3 / rates[1]:5.1f} ms each), 2 workers {rates[2]:6.1f} images/s: "
                f"{rates[2] / rates[1]:.2f}x (target >= 1.7)",
                flush=True,
            )
    return figures


def waits(out: pathlib.Path, steps: int) -> dict:
    """Demo shapes: real input pipeline vs every host batch prepared beforehand."""
    import jax
    import ml_collections
    from jax.sharding import AxisType

    from g2e.data import mmeb
    from g2e.data.preprocess import Processor
    from g2e.demo import mini_mmeb
    from g2e.models import hf_io, sharding
    from g2e.training import batches, stage

    sys.path.insert(0, str(REPO / "configs"))
    import demo as demo_config  # noqa: E402

    demo = demo_config.get_config()
    model_dir = _tiny_checkpoint(out / "model")
    data = out / "mini"
    if not (data / "subsets.json").is_file():
        mini_mmeb.build(str(data), seed=0, train_rows=64, eval_queries=2, candidates=2)
    rows = [
        r
        for s in mmeb.list_subsets(str(data / "train"))
        for r in mmeb.read_train_subset(str(data / "train"), s, "original", str(data))
    ]
    clusters = [list(range(i, min(i + 4, len(rows)))) for i in range(0, len(rows), 4)]
    config = ml_collections.ConfigDict(demo.to_dict())
    config.train.steps = steps
    config.train.checkpoint_every = 10**6
    config.train.log_every = 1
    mesh = jax.make_mesh(
        (1, 1, 1),
        ("data", "fsdp", "tensor"),
        axis_types=(AxisType.Auto,) * 3,
        devices=jax.devices()[:1],
    )
    processor = Processor.from_dir(
        model_dir,
        max_length=demo.data.train_max_length,
        image_resolution=demo.data.train_image_resolution,
        length_buckets=tuple(demo.data.length_buckets),
        patch_buckets=tuple(demo.data.patch_buckets),
    )
    adapter = stage.adapter_config(config)
    step_seconds = {}
    for mode in ("prepared", "pipeline"):
        model = hf_io.load_model(
            model_dir, adapter=adapter, mesh=mesh, rules=sharding.DEFAULT_RULES
        )
        codec = batches.RowCodec(processor, rows, image_root=None)
        if mode == "prepared":
            codec = _Prepared(
                codec,
                stage.global_batch_size(config.train, mesh, sharding.DEFAULT_RULES),
                clusters,
                len(rows),
                config,
            )
        workdir = out / f"waits_{mode}"
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
        stage.train_model(
            config,
            model,
            rows,
            clusters,
            processor,
            mesh,
            sharding.DEFAULT_RULES,
            str(workdir),
            workers=0 if mode == "prepared" else 2,
        )
        lines = [json.loads(x) for x in (workdir / "train_metrics.jsonl").read_text().splitlines()]
        per_step = [1.0 / (x["pairs_per_s"] / 16) for x in lines[5:]]
        step_seconds[mode] = statistics.median(per_step)
    wait = max(0.0, 1 - step_seconds["prepared"] / step_seconds["pipeline"])
    print(
        f"(c) demo shapes: {step_seconds['pipeline'] * 1e3:.1f} ms per step with the input "
        f"pipeline (2 workers), {step_seconds['prepared'] * 1e3:.1f} ms with every batch "
        f"prepared: the devices wait {100 * wait:.1f}% of a step (target <= 5%)",
        flush=True,
    )
    return {
        "ms_per_step": {k: round(v * 1e3, 2) for k, v in step_seconds.items()},
        "wait_fraction": round(wait, 4),
    }


class _Prepared:
    """A RowCodec whose batches were all collated before training (no host work per step)."""

    def __init__(self, codec, batch_size: int, clusters, num_rows: int, config):
        from g2e.training import batches

        schedule = batches.ClusterSchedule(
            clusters, num_rows, config.train.cluster_size, batch_size, seed=int(config.seed)
        )
        self.batches = {}
        for step in range(config.train.steps):
            rows = schedule.rows(step)
            encoded = [codec.encode(r) for r in rows]
            self.batches[tuple(int(r) for r in rows)] = codec.collate(encoded)

    def encode(self, row: int) -> int:
        return row

    def shape(self, encoded):
        return [0]

    def collate(self, encoded):
        return self.batches[tuple(int(r) for r in encoded)]

    def widen(self, batch, shape):
        return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="memory,throughput,waits")
    parser.add_argument("--out", default="", help="work folder (default: a temporary one)")
    parser.add_argument("--rows", default="2000,20000")
    parser.add_argument("--photos", type=int, default=96)
    parser.add_argument("--pages", type=int, default=24)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="bench_scale_"))
    out.mkdir(parents=True, exist_ok=True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    result = {}
    if "throughput" in parts:
        result["throughput"] = throughput(out, {"photo": args.photos, "page": args.pages})
        print(json.dumps({"throughput": result["throughput"]}), flush=True)
    if "waits" in parts:
        result["waits"] = waits(out, args.steps)
        print(json.dumps({"waits": result["waits"]}), flush=True)
    if "memory" in parts:
        result["memory"] = memory(out, [int(r) for r in args.rows.split(",")])
        print(json.dumps({"memory": result["memory"]}), flush=True)


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS(sys.argv[:1])
    main()
