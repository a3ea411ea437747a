"""The whole recipe through `python -m g2e.main` on a trimmed demo: every stage runs and writes
its outputs; a run killed during `train` resumes, skipping the stages it had finished, to the
adapter bytes and losses of an uninterrupted run."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from g2e.demo import mini_mmeb
from tests import compilation_cache
from tests.killing import kill_at

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_STEPS = 6

# The demo, trimmed: a tenth of the mini-MMEB's training rows and 4 queries per evaluation
# subset (all 10 subsets), a smaller generator trained for two steps, 6 steps of DoRA
# fine-tuning with a checkpoint every 2, each step's loss logged; no Grain worker processes.
TRIMMED = [
    "--config.demo.scale=0.1",
    "--config.demo.eval_queries=40",  # x scale: 4 queries per evaluation subset
    "--config.demo.generator=train",
    "--config.demo.generator_steps=2",
    "--config.demo.hidden_size=64",
    "--config.demo.num_layers=2",
    "--config.demo.vision_width=32",
    f"--config.train.steps={TRAIN_STEPS}",
    "--config.train.checkpoint_every=2",
    "--config.train.warmup_steps=2",
    "--config.train.log_every=1",
    "--config.eval.batch_size=2",  # per device: 16 a step on 8 devices
    "--config.mine.batch_size=2",
    "--config.mine.judge_batch_size=8",
    # Host work in the main process: a pool of Grain workers costs a stage ~15 s to start on a
    # 2-core machine, and results do not depend on it (tests/training/test_trainer.py).
    "--config.data.workers=0",
]


def _command(workdir: pathlib.Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "g2e.main",
        f"--config={REPO}/configs/demo.py",
        f"--config.workdir={workdir}",
        *TRIMMED,
        # The three runs (and the stages inside each) load what an earlier one compiled.
        *compilation_cache.main_flags(),
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # One CPU device, like a laptop.
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    """step -> training loss in train_metrics.jsonl (a step logged twice, before a kill and
    after the resume, keeps its last line)."""
    lines = (workdir / "train" / "train_metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.slow
def test_demo_runs_every_stage_and_resumes_after_a_kill_during_train(tmp_path):
    workdir = tmp_path / "demo"
    kill_at(_command(workdir), "train_step_4", tmp_path / "first.log", env=_env(), timeout=900)
    assert not (workdir / "train" / "DONE.json").exists(), "training finished before the kill"
    for stage in ("prepare_demo", "eval_plain", "eval_zero_shot", "mine"):
        assert (workdir / stage / "DONE.json").is_file(), stage
    # The reference: the same training, uninterrupted, on a copy of the finished stages.
    reference = tmp_path / "reference"
    shutil.copytree(
        workdir, reference, ignore=lambda folder, _: ["train"] if folder == str(workdir) else []
    )
    uninterrupted = subprocess.run(
        [*_command(reference), "--config.stages=prepare_demo,train"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert uninterrupted.returncode == 0, (uninterrupted.stdout + uninterrupted.stderr)[-4000:]

    second = subprocess.run(
        _command(workdir), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900
    )
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    for stage in ("prepare_demo", "eval_plain", "eval_zero_shot", "mine"):
        assert f"== {stage}: complete" in output, stage
    assert "resumed from step" in output
    assert "adapted projections of" in output  # evaluation runs the merged model
    done = json.loads((workdir / "train" / "DONE.json").read_text())
    assert done["steps"] == TRAIN_STEPS
    # The real model (DoRA, Adam, GradCache, the row encoder) resumes bit for bit.
    adapter = pathlib.Path("train", "adapter", "adapter_model.safetensors")
    assert (workdir / adapter).read_bytes() == (reference / adapter).read_bytes()
    assert _losses(workdir) == _losses(reference) and len(_losses(workdir)) >= 3

    # Every output of every stage.
    for stage in ("eval_plain", "eval_zero_shot", "eval", "eval_random", "eval_plain_random"):
        results = json.loads((workdir / stage / "results.json").read_text())
        assert len(results["subsets"]) == 10 and results["overall"] is not None
        assert (workdir / stage / "results.md").is_file()
        assert (workdir / stage / "results.png").stat().st_size > 0
    assert list((workdir / "mine").glob("*.clusters.json"))
    assert (workdir / "train" / "adapter" / "adapter_model.safetensors").is_file()
    assert (workdir / "export" / "hf" / "config.json").is_file()
    assert (workdir / "export" / "hf" / "model.safetensors.index.json").is_file()
    assert (workdir / "export" / "hf" / "tokenizer.json").is_file()
    assert (workdir / "export" / "peft" / "adapter_config.json").is_file()
    report = json.loads((workdir / "report.json").read_text())
    assert [row["stage"] for row in report["rows"]] == [
        "eval_plain",
        "eval_zero_shot",
        "eval",
        "eval_random",
        "eval_plain_random",
    ]
    assert {(p["metric"], p["a"], p["b"]) for p in report["paired"]} >= {
        ("overall", "zero-shot, hierarchical prompt", "zero-shot, plain prompt"),
        ("overall", "fine-tuned (SaHa)", "zero-shot, hierarchical prompt"),
        ("IND", "fine-tuned (SaHa)", "zero-shot, hierarchical prompt"),
        ("overall", "fine-tuned (SaHa)", "fine-tuned, random batches"),
        ("overall", "fine-tuned, random batches", "fine-tuned, plain prompt, random batches"),
    }
    for name in ("report.png", "train.png"):
        assert (workdir / name).read_bytes().startswith(b"\x89PNG"), name
    assert all("precision_ci95" in q for q in report["judge_quality"].values())
    assert set(report["judge_quality"]) == {
        name for name, (_, group, _) in mini_mmeb.SUBSETS.items() if group == "IND"
    }
    for run in ("train_random", "train_plain_random"):
        assert (workdir / run / "adapter" / "adapter_model.safetensors").is_file(), run
    metrics = (workdir / "train" / "train_metrics.jsonl").read_text()
    assert '"heldout_accuracy"' in metrics
    table = (workdir / "report.md").read_text()
    assert "zero-shot, hierarchical prompt" in table and "fine-tuned" in table
    assert "zero-shot, hierarchical prompt" in second.stdout  # The table is printed too.
