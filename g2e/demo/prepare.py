"""The demo's `prepare_demo` stage: a mini-MMEB and a tiny Qwen2-VL *generator*.

The method starts from a generative MLLM. The demo has none to download, so the project makes
one: a tiny Qwen2-VL-architecture model pre-trained by next-token prediction to see and answer
(g2e.demo.pretrain), never trained on embeddings, committed as package data. With
demo.generator='asset' (the default) this stage copies it; with 'train' (CI's small jobs, at
toy widths) it trains one for demo.generator_steps on the mini-MMEB's own rows instead, with
the same loss and optimizer. Either way the checkpoint is a Hugging Face directory
(config.json, safetensors, tokenizer, preprocessor config) that every later stage loads like a
downloaded Qwen2-VL.

Layout under <workdir>/prepare_demo/: mini_mmeb/ (train/, eval/, images/, subsets.json),
mini_mmeb_v2/ (g2e.demo.mini_mmeb_v2: MMEB-V2's layout, for eval_mmeb_v2) and model/ (the
checkpoint). Each is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
import time
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from g2e import atomic, distributed, layout
from g2e.data import mmeb, prompts
from g2e.data.preprocess import Processor
from g2e.demo import lessons, mini_mmeb, mini_mmeb_v2, pretrain, tiny
from g2e.models import hf_io
from g2e.models.config import Qwen2VLConfig
from g2e.models.qwen2_vl import Qwen2VL
from g2e.pipeline import Pipeline


@dataclasses.dataclass(frozen=True)
class DemoPaths:
    """Where prepare_demo writes the mini-MMEB (data, images) and the generator checkpoint."""

    data_dir: pathlib.Path
    train_dir: pathlib.Path
    eval_dir: pathlib.Path
    image_root: pathlib.Path
    model_dir: pathlib.Path
    mmeb_v2_dir: pathlib.Path


def demo_paths(out: pathlib.Path) -> DemoPaths:
    """The demo's folders under `out` (prepare_demo's output folder)."""
    data = out / "mini_mmeb"
    return DemoPaths(data, data / "train", data / "eval", data, out / "model", out / "mini_mmeb_v2")


def run(pipeline: Pipeline) -> dict[str, Any]:
    """The `prepare_demo` stage: builds what `point_at_demo` pointed the config at."""
    # The primary alone writes (the processes share the workdir, and prepare replaces
    # directories); the others wait, then read its files.
    summary = {}
    if distributed.is_primary():
        summary = prepare(pipeline.config, pipeline.workdir / "prepare_demo")
    distributed.barrier("prepare_demo")
    return summary


def point_at_demo(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Points model_dir and the data keys at what prepare_demo writes under `workdir`.

    g2e.main calls it before validating the config, so the demo's config is checked as it
    will run; the folders need not exist yet (prepare_demo builds them first).
    """
    paths = demo_paths(layout.stage_dir(workdir, layout.PREPARE_DEMO))
    config.model_dir = str(paths.model_dir)
    config.data.train_dir = str(paths.train_dir)
    config.data.train_image_root = str(paths.image_root)
    config.data.eval_dir = str(paths.eval_dir)
    config.data.eval_image_root = str(paths.image_root)
    config.data.mmeb_v2_dir = str(paths.mmeb_v2_dir)


def generator_lessons(
    train_dir: pathlib.Path, image_root: pathlib.Path, *, matching_per_subset: int, seed: int
) -> list[lessons.Lesson]:
    """demo.generator='train' (CI's small jobs): lessons from the mini-MMEB's own rows.

    A row whose positive is text teaches the model to answer its query with it (labels,
    answers, captions); a row whose positive is an image teaches it to caption that image;
    each text-positive row also gives one-word summaries under the hierarchical prompt's system
    turn, of its query (with the query suffix) and of its positive text. And
    `matching_per_subset` judge-format lessons per training subset, drawn fresh
    (`lessons.matching_lesson`, their own seed: never the rows mining will judge).
    """
    taught = []
    subsets = mmeb.list_subsets(str(train_dir))
    for subset in subsets:
        for row in mmeb.read_train_subset(str(train_dir), subset, "original", str(image_root)):
            taught += _row_lessons(row)
    rng = np.random.default_rng([seed, 7])
    taught += [lessons.matching_lesson(rng) for _ in range(matching_per_subset * len(subsets))]
    return taught


def _row_lessons(row: mmeb.TrainRow) -> list[lessons.Lesson]:
    image = (row.qry_image,) if row.qry_image else ()
    if row.pos_image is not None:
        if row.qry_image or not row.qry_text:
            return []
        caption = row.qry_text.rsplit(": ", 1)[-1].strip()
        return [lessons.Lesson(lessons.GENERATOR_QUESTION, (row.pos_image,), caption)]
    word = lessons.one_word(row)
    system = prompts.SYSTEM_PROMPT
    return [
        lessons.Lesson(row.qry_text, image, row.pos_text),
        lessons.Lesson(
            row.qry_text, image, word, system, prompts.query_suffix(bool(row.qry_image))
        ),
        lessons.Lesson(row.pos_text, (), word, system),
    ]


def _sampled_batches(
    processor: Processor, taught: list[lessons.Lesson], *, batch_size: int, seed: int
):
    """draw_batch(step) over encoded lessons: three image batches to one text-only batch."""
    encoded = [e for e in (lessons.encode(processor, t) for t in taught) if e is not None]
    groups = [[e for e in encoded if e.num_patches], [e for e in encoded if not e.num_patches]]
    groups = [g for g in groups if len(g) >= batch_size]
    if not groups:
        raise ValueError(
            f"demo: only {len(encoded)} generator examples for a batch of "
            f"{batch_size}; raise demo.scale"
        )

    def draw_batch(step: int) -> list:
        group = groups[0 if len(groups) == 1 or step % 4 else 1]
        chosen = np.random.default_rng([seed, step]).choice(len(group), batch_size, replace=False)
        return [group[i] for i in chosen]

    return draw_batch


def prepare(config: ml_collections.ConfigDict, out: pathlib.Path) -> dict[str, Any]:
    """Builds the demo's data and generator checkpoint under `out` (see the module docstring)."""
    demo = config.demo
    if demo.generator not in ("asset", "train"):
        raise ValueError(f"demo.generator must be 'asset' or 'train', got {demo.generator!r}")
    paths = demo_paths(out)
    summary: dict[str, Any] = {}
    if not (paths.data_dir / "subsets.json").is_file():

        def build_data(tmp: pathlib.Path) -> None:
            summary["mini_mmeb"] = mini_mmeb.build(
                str(tmp),
                seed=demo.seed,
                train_rows=max(16, round(demo.train_rows * demo.scale)),
                eval_queries=max(4, round(demo.eval_queries * demo.scale)),
                candidates=12,
            )

        atomic.replace_directory(paths.data_dir, build_data)
        logging.info("demo: mini-MMEB in %s (%s)", paths.data_dir, summary["mini_mmeb"])
    if not (paths.mmeb_v2_dir / mini_mmeb_v2.SUMMARY).is_file():
        queries = max(4, round(demo.mmeb_v2_queries * demo.scale))

        def build_v2(tmp: pathlib.Path) -> None:
            summary["mini_mmeb_v2"] = mini_mmeb_v2.write(
                tmp, seed=demo.seed, queries_per_task=queries
            )

        atomic.replace_directory(paths.mmeb_v2_dir, build_v2)
    if not (paths.model_dir / "config.json").is_file():
        start = time.time()
        summary["generator"] = {}
        build = {"asset": copy_generator, "train": train_generator}[demo.generator]
        atomic.replace_directory(
            paths.model_dir, lambda tmp: summary["generator"].update(build(config, paths, tmp))
        )
        summary["generator"]["seconds"] = round(time.time() - start, 1)
        logging.info("demo: generator checkpoint in %s (%s)", paths.model_dir, summary["generator"])
    return summary


# The demo.* keys that must agree with the asset's config.json (they size the 'train' path).
_ASSET_WIDTHS = {
    "hidden_size": ("text_config", "hidden_size"),
    "num_layers": ("text_config", "num_hidden_layers"),
    "vision_width": ("vision_config", "embed_dim"),
}


def copy_generator(
    config: ml_collections.ConfigDict, paths: DemoPaths, out: pathlib.Path
) -> dict[str, Any]:
    """demo.generator='asset': copies the committed pre-trained generator (g2e.demo.pretrain)."""
    del paths
    asset = pretrain.ASSET_DIR
    if not (asset / "MANIFEST.json").is_file():
        raise FileNotFoundError(
            f"demo.generator='asset' but {asset} has no MANIFEST.json; make it with "
            f"`{pretrain.REGENERATE}` or set --config.demo.generator=train"
        )
    hf_config = json.loads((asset / "config.json").read_text())
    for key, (section, name) in _ASSET_WIDTHS.items():
        if config.demo[key] != hf_config[section][name]:
            raise ValueError(
                f"demo.{key}={config.demo[key]} but the committed generator has "
                f"{section}.{name}={hf_config[section][name]}; with demo.generator='asset' "
                f"leave demo.{key} at the asset's, or set --config.demo.generator=train"
            )
    shutil.copytree(asset, out, dirs_exist_ok=True)
    manifest = json.loads((asset / "MANIFEST.json").read_text())
    return {"asset": str(asset), "weights_sha256": manifest["weights_sha256"]}


def train_generator(
    config: ml_collections.ConfigDict, paths: DemoPaths, out: pathlib.Path
) -> dict[str, Any]:
    """demo.generator='train': writes a tiny generator trained on the mini-MMEB into `out`."""
    demo = config.demo
    taught = generator_lessons(
        paths.train_dir, paths.image_root, matching_per_subset=demo.matching_lessons, seed=demo.seed
    )
    tiny.write_generator_assets(
        out,
        [text for lesson in taught for text in (lesson.user, lesson.answer)],
        vocab_size=demo.vocab_size,
        hidden_size=demo.hidden_size,
        layers=demo.num_layers,
        heads=demo.heads,
        kv_heads=demo.kv_heads,
        vision_width=demo.vision_width,
        vision_layers=demo.num_layers,
    )
    model = Qwen2VL(
        Qwen2VLConfig.from_dir(out),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs=nnx.Rngs(demo.seed),
    )
    processor = Processor.from_dir(
        out,
        max_length=config.data.train_max_length,
        image_resolution="processor",
        length_buckets=tuple(config.data.length_buckets),
        patch_buckets=tuple(config.data.patch_buckets),
    )
    pretrain.scale_merger(model, processor, demo.seed)
    draw_batch = _sampled_batches(
        processor, taught, batch_size=demo.generator_batch_size, seed=demo.seed
    )
    losses = pretrain.train(
        model, processor, draw_batch, steps=demo.generator_steps, lr=demo.generator_lr
    )
    hf_io.save_hf(model, out, dtype=np.float32)
    return {
        "lessons": len(taught),
        "steps": demo.generator_steps,
        "first_loss": round(float(np.mean(losses[:10])), 4),
        "last_loss": round(float(np.mean(losses[-10:])), 4),
    }
