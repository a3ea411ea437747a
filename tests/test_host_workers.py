"""Every embedding stage's host work runs in its worker pool, whatever a call's size.

On a host of many cores (os.cpu_count patched to 64) the mine stage (its embeddings and its
judge) and an evaluation stage, each calling the embedder with a few dozen items at a time,
encode nothing in the main process with data.workers >= 1 and say so in their reports.
"""

from __future__ import annotations

import json
import os

import pytest

from g2e import layout
from g2e.data import workers
from g2e.demo import mini_mmeb
from g2e.evaluation import stage as evaluation_stage
from g2e.mining import stage as mining_stage
from g2e.pipeline import Pipeline
from tests.mining.tiny_mine import config_of, mine_settings, write_checkpoint

HOST_KEYS = {"workers", "items_in_workers", "items_in_main", "device_wait_fraction"}


@pytest.mark.slow
def test_mine_eval_and_judge_encode_nothing_in_the_main_process(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert workers.usable_cores() == 64
    model_dir = write_checkpoint(tmp_path / "model")
    mini = tmp_path / "mini"
    mini_mmeb.build(str(mini), seed=0, train_rows=32, eval_queries=4, candidates=2)
    settings = mine_settings(
        model_dir,
        mini,
        tmp_path / "work",
        **{
            # Two real processes on this 2-core machine: the point is the size of the calls.
            "data.workers": 2,
            "mine.judge": True,
            "data.eval_dir": str(mini / "eval"),
            "data.eval_image_root": str(mini),
            "data.eval_subsets": "ShapeCls,ShapeVQA",
            "eval.batch_size": 1,
        },
    )
    pipeline = Pipeline(config_of(settings), tmp_path / "work")

    mine_summary = mining_stage.run(pipeline)
    assert mine_summary["judge_pairs"] > 0  # the judge encoded pairs (in the workers)
    reports = json.loads(layout.mining_report_file(pipeline.workdir).read_text())
    assert reports
    for subset, report in reports.items():
        host = report["host"]
        assert set(host) == HOST_KEYS, subset
        assert host["workers"] == 2 and host["items_in_main"] == 0, (subset, host)
        assert host["items_in_workers"] > 0, (subset, host)
        assert 0.0 <= host["device_wait_fraction"] <= 1.0, (subset, host)

    evaluation_stage.run_eval_zero_shot(pipeline)
    results = json.loads((pipeline.stage_dir(layout.EVAL_ZERO_SHOT) / "results.json").read_text())
    assert sorted(results["host"]) == ["ShapeCls", "ShapeVQA"]
    for subset, host in results["host"].items():
        assert set(host) == HOST_KEYS, subset
        assert host["items_in_main"] == 0 and host["items_in_workers"] > 0, (subset, host)
