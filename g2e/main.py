"""Runs the g2e recipe: the configured stages in order, each skipped once its outputs are complete.

This module is the only one that knows every stage: STAGES below is their table, each with its
name, its output folder and the function that runs it.

  python -m g2e.main --config=configs/mmeb.py [--config.stages=eval_zero_shot,mine,...]

Each stage writes under <workdir>/<stage>/ (g2e.layout) and marks itself complete there with
DONE.json. A rerun skips complete stages (`--config.force=STAGE` redoes one), so a preempted
run picks up where it stopped; training resumes from its last checkpoint. Compiled programs are
kept in a persistent compilation cache (<workdir>/compilation_cache by default,
`compilation_cache.*`), so a rerun or a resume loads them instead of compiling again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import app
from ml_collections import config_flags

from g2e import atomic, configuration, distributed, embed_stage, layout
from g2e import export as export_stage
from g2e.demo import judge_quality as judge_quality_stage
from g2e.demo import prepare as prepare_demo_stage
from g2e.evaluation import stage as evaluation_stage
from g2e.mining import stage as mining_stage
from g2e.pipeline import Pipeline
from g2e.training import stage as training_stage


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the recipe: its name, what it does, and the function that runs it.

    `run(pipeline)` returns a JSON-ready summary, which becomes the stage's DONE.json; a stage
    that `always_runs` (the embed command, whose input may change) leaves no marker.
    """

    name: str
    run: Callable[[Pipeline], dict[str, Any] | None]
    description: str
    always_runs: bool = False

    def output_dir(self, workdir: pathlib.Path) -> pathlib.Path:
        """The folder the stage writes under."""
        return layout.stage_dir(workdir, self.name)

    def done_file(self, workdir: pathlib.Path) -> pathlib.Path:
        """The marker of a complete stage."""
        return layout.done_file(workdir, self.name)


# Every stage, in the order a recipe runs them.
STAGES = (
    Stage(
        layout.PREPARE_DEMO,
        prepare_demo_stage.run,
        "the demo's mini-MMEB and tiny generator checkpoint (configs/demo.py)",
    ),
    Stage(
        layout.EVAL_PLAIN,
        evaluation_stage.run_eval_plain,
        "zero-shot MMEB with the plain prompt (no system turn, no suffix)",
    ),
    Stage(
        layout.EVAL_ZERO_SHOT,
        evaluation_stage.run_eval_zero_shot,
        "zero-shot MMEB with the hierarchical prompt",
    ),
    Stage(layout.MINE, mining_stage.run, "SaHa clusters per training subset"),
    Stage(
        layout.JUDGE_QUALITY,
        judge_quality_stage.run,
        "the demo's check of the mining judge against the mini-MMEB's truth",
    ),
    Stage(
        layout.TRAIN,
        training_stage.run,
        "contrastive LoRA/DoRA fine-tuning on the clusters (resumes from checkpoints)",
    ),
    Stage(
        layout.TRAIN_RANDOM,
        training_stage.run_random,
        "the same training on random batches: the SaHa ablation",
    ),
    Stage(
        layout.TRAIN_PLAIN_RANDOM,
        training_stage.run_plain_random,
        "training on random batches with the plain prompt: the paper's in-batch baseline",
    ),
    Stage(layout.EVAL, evaluation_stage.run_eval, "MMEB with the model `train` fine-tuned"),
    Stage(
        layout.EVAL_RANDOM,
        evaluation_stage.run_eval_random,
        "MMEB with the model `train_random` fine-tuned",
    ),
    Stage(
        layout.EVAL_PLAIN_RANDOM,
        evaluation_stage.run_eval_plain_random,
        "MMEB, plain prompt, with the model `train_plain_random` fine-tuned",
    ),
    Stage(
        layout.EVAL_SUGARCREPE,
        evaluation_stage.run_eval_sugarcrepe,
        "SugarCrepe / SugarCrepe++ of the model `eval` evaluates (data.sugarcrepe_dir)",
    ),
    Stage(
        layout.EVAL_MMEB_V2,
        evaluation_stage.run_eval_mmeb_v2,
        "MMEB-V2's image, video and visual-document tasks (data.mmeb_v2_dir)",
    ),
    Stage(
        layout.EXPORT,
        export_stage.run,
        "Hugging Face directory (export/hf) and PEFT adapter (export/peft)",
    ),
    Stage(
        layout.REPORT,
        evaluation_stage.run_report,
        "the table of every evaluation (<workdir>/report.md, report.json, report.png)",
    ),
    Stage(
        layout.EMBED,
        embed_stage.run_embed,
        "the embed command (configs/embed.py)",
        always_runs=True,
    ),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)

_DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Recipe file.", lock_config=True
)


def _local_workdir(workdir: str) -> pathlib.Path:
    """config.workdir as an absolute local path; a URL (gs://...) is refused before JAX starts.

    The stages write with ordinary file I/O (pathlib, numpy, json), so a URL would silently become
    a wrong local directory such as ./gs:/bucket/path.
    """
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", workdir):
        raise configuration.ConfigError(
            f"--config.workdir: is the URL {workdir!r}, but g2e writes its outputs with local file "
            "I/O; mount the bucket (e.g. gcsfuse --implicit-dirs BUCKET /gcs/BUCKET) and give "
            "the mounted path, e.g. --config.workdir=/gcs/BUCKET/path. launch/tpu_vm.sh "
            "--workdir=gs://BUCKET/path mounts the bucket on every worker and does this for you."
        )
    return pathlib.Path(workdir).resolve()


def setup_compilation_cache(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Points JAX's persistent compilation cache at compilation_cache.dir (default under the
    workdir); must run before the first compilation. Only process 0 writes entries (JAX's
    rule); every process reads them, so the folder is best on storage all hosts share.

    A program's cache key does not depend on where the folder is: a workdir copied, renamed or
    mounted at another path (a resume on a new machine) still finds its programs.
    """
    cache = config.compilation_cache
    if not cache.enabled:
        return
    directory = cache.dir or str(workdir / "compilation_cache")
    if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", directory):  # gs://... goes through as is
        directory = str(pathlib.Path(directory).resolve())
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs", float(cache.min_compile_time_secs)
    )
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(cache.min_entry_size_bytes))
    # By default JAX also points XLA's GPU autotuning cache at <dir>/xla_gpu_..., and that
    # path goes into the compile options every key hashes: the same program then has one key
    # per cache path. Without it the keys depend on the program alone; a GPU still loads whole
    # compiled programs from the cache and autotunes only the ones it has to compile.
    jax.config.update("jax_persistent_cache_enable_xla_caches", "none")


def _setup_logging(workdir: pathlib.Path, primary: bool) -> None:
    handlers = [logging.StreamHandler(sys.stdout)]
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(workdir / "log.txt"))
    logging.basicConfig(
        level=logging.INFO,
        handlers=handlers,
        force=True,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.KEY=VALUE")
    config = _CONFIG.value
    workdir = _local_workdir(config.workdir)
    names = configuration.split_list(config.stages)
    if layout.PREPARE_DEMO in names:
        # The demo's model and data are what its first stage writes: point at them, then
        # validate the config as it will run.
        prepare_demo_stage.point_at_demo(config, workdir)
    # A bad key fails here, before any device is touched.
    configuration.validate(config, STAGE_NAMES)
    setup_compilation_cache(config, workdir)
    distributed.initialize(config)
    _setup_logging(workdir, distributed.is_primary())
    force = set(configuration.split_list(config.force))
    pipeline = Pipeline(config, workdir)
    stages = {stage.name: stage for stage in STAGES}
    logging.info("g2e: stages %s, workdir %s", ", ".join(names), workdir)
    for name in names:
        _run_stage(stages[name], pipeline, force=name in force)


def _run_stage(stage: Stage, pipeline: Pipeline, *, force: bool) -> None:
    """Runs one stage unless its DONE.json says it is complete; writes the marker after."""
    done = stage.done_file(pipeline.workdir)
    if not stage.always_runs and done.exists() and not force:
        logging.info("== %s: complete (%s), skipped", stage.name, done)
        return
    logging.info("== %s", stage.name)
    start = time.time()
    summary = stage.run(pipeline) or {}
    distributed.barrier(f"stage-{stage.name}")
    if distributed.is_primary() and not stage.always_runs:
        record = {"stage": stage.name, "seconds": round(time.time() - start, 1), **summary}
        atomic.write_json(done, record, indent=2)
    logging.info("== %s: done in %.0f s", stage.name, time.time() - start)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    app.run(main)
