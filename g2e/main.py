"""Runs the g2e recipe: the configured stages in order, each skipped once its outputs are complete.

This module is the only one that knows every stage: STAGES below is their table.

  python -m g2e.main --config=configs/mmeb.py [--config.stages=eval_zero_shot,mine,...]

Stages (each writes under <workdir>/<stage>/ and marks itself complete with DONE.json):
  prepare_demo    the demo's mini-MMEB and tiny generator checkpoint (configs/demo.py)
  eval_plain      zero-shot MMEB with the plain prompt (no system turn, no suffix)
  eval_zero_shot  zero-shot MMEB with the hierarchical prompt
  mine            SaHa clusters per training subset
  judge_quality   the demo's check of the mining judge against the mini-MMEB's truth
  train           contrastive LoRA/DoRA fine-tuning on the clusters (resumes from checkpoints)
  train_random    the same training on random batches (train.use_clusters=False): the SaHa
                  ablation, written under <workdir>/train_random/
  eval            MMEB with the fine-tuned model
  eval_random     MMEB with the model train_random fine-tuned
  eval_sugarcrepe SugarCrepe / SugarCrepe++ of the model `eval` evaluates (data.sugarcrepe_dir)
  export          Hugging Face directory (<workdir>/export/hf) and PEFT adapter (export/peft)
  report          the table of every evaluation (<workdir>/report.md, report.json)
  embed           the embed command (configs/embed.py)
A rerun skips complete stages (`--config.force=STAGE` redoes one), so a preempted run picks up
where it stopped; training resumes from its last checkpoint. Compiled programs are kept in a
persistent compilation cache (<workdir>/compilation_cache by default, `compilation_cache.*`),
so a rerun or a resume loads them instead of compiling again.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import sys
import time

import jax
import ml_collections
from absl import app
from ml_collections import config_flags

from g2e import atomic, configuration, distributed, embedding, export
from g2e.demo import judge_quality
from g2e.demo import prepare as demo
from g2e.evaluation import stage as evaluation
from g2e.mining import stage as mining
from g2e.pipeline import Pipeline
from g2e.training import stage as training

# Every stage, in the order a recipe runs them: (name, function of the Pipeline -> summary).
STAGES = (
    ("prepare_demo", demo.run),
    ("eval_plain", evaluation.run_eval_plain),
    ("eval_zero_shot", evaluation.run_eval_zero_shot),
    ("mine", mining.run),
    ("judge_quality", judge_quality.run),
    ("train", training.run),
    ("train_random", training.run_random),
    ("eval", evaluation.run_eval),
    ("eval_random", evaluation.run_eval_random),
    ("eval_sugarcrepe", evaluation.run_eval_sugarcrepe),
    ("export", export.run),
    ("report", evaluation.run_report),
    ("embed", embedding.run_embed),
)
STAGE_NAMES = tuple(name for name, _ in STAGES)

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


def _setup_compilation_cache(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Points JAX's persistent compilation cache at compilation_cache.dir (default under the
    workdir); must run before the first compilation. Only process 0 writes entries (JAX's
    rule); every process reads them, so the folder is best on storage all hosts share."""
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
    # A bad key fails here, before any device is touched.
    configuration.validate(config, STAGE_NAMES)
    workdir = _local_workdir(config.workdir)
    _setup_compilation_cache(config, workdir)
    distributed.initialize(config)
    _setup_logging(workdir, distributed.is_primary())
    names = configuration.split_list(config.stages)
    force = set(configuration.split_list(config.force))
    if "prepare_demo" in names:
        demo.point_at_demo(config, workdir)
    pipeline = Pipeline(config, workdir)
    run_stage = dict(STAGES)
    logging.info("g2e: stages %s, workdir %s", ", ".join(names), workdir)
    for name in names:
        done = workdir / name / "DONE.json"
        # The embed command always runs: its input may have changed since the last run.
        if name != "embed" and done.exists() and name not in force:
            logging.info("== %s: complete (%s), skipped", name, done)
            continue
        logging.info("== %s", name)
        start = time.time()
        summary = run_stage[name](pipeline) or {}
        distributed.barrier(f"stage-{name}")
        if distributed.is_primary() and name != "embed":
            record = {"stage": name, "seconds": round(time.time() - start, 1), **summary}
            atomic.write_json(done, record, indent=2)
        logging.info("== %s: done in %.0f s", name, time.time() - start)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    app.run(main)
