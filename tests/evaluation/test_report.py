"""The run's report: rows in order, 95% bootstrap intervals, chance, SugarCrepe columns."""

import json

import numpy as np
import pytest

from g2e.evaluation import report


def subset(meta_task, split, outcomes, candidates):
    correct = "".join("1" if o else "0" for o in outcomes)
    return {
        "precision_at_1": 100.0 * np.mean(outcomes),
        "meta_task": meta_task,
        "split": split,
        "num_queries": len(outcomes),
        "chance": 100.0 / candidates,
        "correct": correct,
    }


def results(subsets):
    def mean(keep):
        values = [s["precision_at_1"] for s in subsets.values() if keep(s)]
        return float(np.mean(values)) if values else None

    return {
        "subsets": subsets,
        "meta_tasks": {
            t: mean(lambda s, t=t: s["meta_task"] == t)
            for t in {s["meta_task"] for s in subsets.values()}
        },
        "IND": mean(lambda s: s["split"] == "IND"),
        "OOD": mean(lambda s: s["split"] == "OOD"),
        "overall": mean(lambda s: True),
    }


@pytest.fixture
def workdir(tmp_path):
    rng = np.random.default_rng(0)
    for stage, rate in (
        ("eval", 0.6),
        ("eval_zero_shot", 0.4),
        ("eval_random", 0.5),
        ("eval_extra", 0.1),
    ):
        folder = tmp_path / stage
        folder.mkdir()
        content = results(
            {
                "A": subset("Classification", "IND", rng.random(60) < rate, 4),
                "B": subset("Retrieval", "OOD", rng.random(60) < rate, 10),
                "C": subset("Retrieval", "IND", [True] * 60, 10),
            }
        )
        (folder / "results.json").write_text(json.dumps(content))
    (tmp_path / "eval_sugarcrepe").mkdir()
    (tmp_path / "eval_sugarcrepe" / "results.json").write_text(
        json.dumps({"model": "fine-tuned", "sugarcrepe": {"average": 61.5}})
    )
    return tmp_path


def test_rows_intervals_chance_and_sugarcrepe(workdir):
    content = report.collect(workdir)
    assert [r["stage"] for r in content["rows"]] == [
        "eval_zero_shot",
        "eval",
        "eval_random",
        "eval_extra",
    ]
    assert [r["name"] for r in content["rows"]][:3] == [
        "zero-shot, hierarchical prompt",
        "fine-tuned (SaHa)",
        "fine-tuned, random batches",
    ]
    for row in content["rows"]:
        for key in ("overall", "IND", "OOD"):
            low, high = row["ci95"][key]
            assert low <= row[key] <= high and high - low < 40
        assert set(row["meta_tasks"]) == {"Classification", "Retrieval"}
    fine_tuned = content["rows"][1]
    # A subset every query gets right has no spread; chance is 1 / candidates.
    assert fine_tuned["ci95"]["Retrieval"][1] <= 100.0
    assert content["chance"] == {
        "Classification": 25.0,
        "Retrieval": 10.0,
        "IND": 17.5,
        "OOD": 10.0,
        "overall": 15.0,
    }
    assert fine_tuned["sugarcrepe"] == {"SugarCrepe": 61.5}
    assert "sugarcrepe" not in content["rows"][0]
    text = report.markdown(content)
    assert "| chance | 25.0 |" in text and "SugarCrepe" in text
    again = report.collect(workdir)
    assert again["rows"][1]["ci95"] == fine_tuned["ci95"]  # a fixed seed


def test_bootstrap_interval_narrows_with_more_queries():
    small = results({"A": subset("VQA", "IND", [True, False] * 10, 2)})
    large = results({"A": subset("VQA", "IND", [True, False] * 500, 2)})
    width = lambda r: np.subtract(*report.bootstrap_ci95(r)["overall"][::-1])  # noqa: E731
    assert width(large) < width(small) / 4


def test_judge_quality_joins_the_report(workdir):
    assert report.collect(workdir)["judge_quality"] is None
    quality = {
        "ColorCls": {
            "pairs": 5,
            "true_pairs": 2,
            "base_rate": 40.0,
            "yes": 2,
            "precision": 50.0,
            "recall": 50.0,
        }
    }
    (workdir / "judge_quality").mkdir()
    (workdir / "judge_quality" / "results.json").write_text(json.dumps(quality))
    content = report.collect(workdir)
    assert content["judge_quality"] == quality
    assert "| ColorCls | 5 | 2 (40.0) | 2 | 50.0 | 50.0 |" in report.markdown(content)
