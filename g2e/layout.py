"""The workdir's layout: every stage's name, the folder it writes, and the files stages share.

Each stage writes under `<workdir>/<stage name>/` and marks itself complete there with
DONE.json. A stage that reads another's outputs asks this module where they are (or
`Pipeline.stage_dir`), so no module spells another stage's folder. `g2e.main.STAGES` binds these
names to the functions that run them; this module imports nothing of g2e, so every stage, the
configuration and the report may use it.
"""

from __future__ import annotations

import pathlib

# The stages, in the order a recipe runs them (g2e.main.STAGES says what each does).
PREPARE_DEMO = "prepare_demo"
EVAL_PLAIN = "eval_plain"
EVAL_ZERO_SHOT = "eval_zero_shot"
MINE = "mine"
JUDGE_QUALITY = "judge_quality"
TRAIN = "train"
TRAIN_RANDOM = "train_random"
TRAIN_PLAIN_RANDOM = "train_plain_random"
EVAL = "eval"
EVAL_RANDOM = "eval_random"
EVAL_PLAIN_RANDOM = "eval_plain_random"
EVAL_SUGARCREPE = "eval_sugarcrepe"
EVAL_MMEB_V2 = "eval_mmeb_v2"
EXPORT = "export"
REPORT = "report"
EMBED = "embed"

# What the start-up validation checks a stage's inputs against: stages that read MMEB-train
# rows, stages that evaluate on MMEB-eval.
READS_TRAIN_DATA = (MINE, JUDGE_QUALITY, TRAIN, TRAIN_RANDOM, TRAIN_PLAIN_RANDOM)
READS_EVAL_DATA = (EVAL_PLAIN, EVAL_ZERO_SHOT, EVAL, EVAL_RANDOM, EVAL_PLAIN_RANDOM)
TRAINING_STAGES = (TRAIN, TRAIN_RANDOM, TRAIN_PLAIN_RANDOM)

DONE_FILE = "DONE.json"
# A training stage leaves its fine-tuned weights in one of these two folders.
TRAINED_ADAPTER = "adapter"  # PEFT LoRA/DoRA adapter
TRAINED_MODEL = "hf"  # full fine-tuning: a Hugging Face checkpoint
# Per-step metrics a training stage appends (g2e.training.trainer).
TRAIN_METRICS = "train_metrics.jsonl"
# What an evaluation stage writes (g2e.evaluation.report.write_results).
RESULTS = "results.json"


def stage_dir(workdir: str | pathlib.Path, stage: str) -> pathlib.Path:
    """The folder stage `stage` writes under."""
    return pathlib.Path(workdir) / stage


def done_file(workdir: str | pathlib.Path, stage: str) -> pathlib.Path:
    """The marker a complete stage leaves (the summary its function returned)."""
    return stage_dir(workdir, stage) / DONE_FILE


def results_file(workdir: str | pathlib.Path, stage: str) -> pathlib.Path:
    """An evaluation stage's results.json."""
    return stage_dir(workdir, stage) / RESULTS


def train_metrics_file(workdir: str | pathlib.Path, stage: str) -> pathlib.Path:
    """A training stage's per-step metrics (JSON lines)."""
    return stage_dir(workdir, stage) / TRAIN_METRICS


def clusters_file(workdir: str | pathlib.Path, subset: str) -> pathlib.Path:
    """The SaHa clusters the mine stage wrote for a training subset."""
    return stage_dir(workdir, MINE) / f"{subset}.clusters.json"


def mine_cache_dir(workdir: str | pathlib.Path, subset: str) -> pathlib.Path:
    """The mine stage's embedding cache of a subset."""
    return stage_dir(workdir, MINE) / "cache" / subset


def judge_cache_dir(workdir: str | pathlib.Path, subset: str) -> pathlib.Path:
    """The mine stage's judge answers of a subset (read by judge_quality)."""
    return mine_cache_dir(workdir, subset) / "judge"


def mining_report_file(workdir: str | pathlib.Path) -> pathlib.Path:
    """The mine stage's report over every subset."""
    return stage_dir(workdir, MINE) / "report.json"


def judge_quality_file(workdir: str | pathlib.Path) -> pathlib.Path:
    """The judge_quality stage's results."""
    return stage_dir(workdir, JUDGE_QUALITY) / "results.json"


def export_dirs(workdir: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(Hugging Face directory, PEFT adapter directory) the export stage writes."""
    out = stage_dir(workdir, EXPORT)
    return out / "hf", out / "peft"
