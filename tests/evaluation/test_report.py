"""The run's report: rows in order, 95% bootstrap intervals, paired differences, chance,
SugarCrepe columns, charts."""

import json

import numpy as np
import pytest

from g2e.evaluation import charts, report


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
        ("eval_plain_random", 0.45),
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
        "eval_plain_random",
        "eval_extra",
    ]
    assert [r["name"] for r in content["rows"]][:4] == [
        "zero-shot, hierarchical prompt",
        "fine-tuned (SaHa)",
        "fine-tuned, random batches",
        "fine-tuned, plain prompt, random batches",
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


def test_paired_bootstrap_equals_a_hand_computation():
    a = results(
        {
            "A": subset("Classification", "IND", [1, 1, 0, 0], 4),
            "B": subset("Retrieval", "OOD", [1, 0, 0, 0], 4),
        }
    )
    b = results(
        {
            "A": subset("Classification", "IND", [1, 0, 0, 0], 4),
            "B": subset("Retrieval", "OOD", [0, 0, 0, 0], 4),
        }
    )
    # Three resamples, the same query indices for both rows.
    draws = {
        "A": np.array([[0, 0, 1, 1], [2, 3, 2, 3], [0, 1, 2, 3]]),
        "B": np.array([[0, 0, 0, 0], [1, 2, 3, 0], [0, 1, 2, 3]]),
    }
    # overall = mean of the subsets' means. a: (100+100)/2, (0+25)/2, (50+25)/2 = 100, 12.5,
    # 37.5; b: (50+0)/2, (0+0)/2, (25+0)/2 = 25, 0, 12.5; a - b = 75, 12.5, 25. Sorted
    # [12.5, 25, 75]: the 2.5th percentile at rank 0.05, the 97.5th at rank 1.95.
    diff, (low, high) = report.paired_difference(a, b, "overall", draws)
    assert diff == 25.0  # (50+25)/2 - (25+0)/2 on every query
    assert low == pytest.approx(12.5 + 0.05 * (25 - 12.5), abs=0.006)
    assert high == pytest.approx(25 + 0.95 * (75 - 25), abs=0.006)
    # IND is subset A alone: a - b = 50, 0, 25 -> sorted [0, 25, 50].
    diff, (low, high) = report.paired_difference(a, b, "IND", draws)
    assert (diff, low, high) == (25.0, 1.25, 48.75)
    # The same draws give each row's own interval (one bootstrap routine).
    assert report.bootstrap_ci95(a, draws)["IND"] == [
        pytest.approx(0 + 0.05 * 50),
        pytest.approx(50 + 0.95 * 50),
    ]


def test_paired_bootstrap_refuses_evaluations_of_different_queries():
    a = results({"A": subset("VQA", "IND", [1, 0, 1], 2)})
    b = results({"A": subset("VQA", "IND", [1, 0], 2)})
    with pytest.raises(ValueError, match="same eval set"):
        report.paired_difference(a, b, "overall")


def test_paired_rows_cover_the_pairs_whose_rows_exist(workdir):
    content = report.collect(workdir)
    pairs = [(p["a"], p["b"], p["metric"]) for p in content["paired"]]
    saha, zero_shot = "fine-tuned (SaHa)", "zero-shot, hierarchical prompt"
    random_batches = "fine-tuned, random batches"
    assert pairs == [
        (saha, zero_shot, "overall"),
        (saha, zero_shot, "IND"),
        (saha, zero_shot, "OOD"),
        (saha, random_batches, "overall"),
        (random_batches, "fine-tuned, plain prompt, random batches", "overall"),
    ]  # no eval_plain here: the 2 - 1 pair is left out
    rows = {row["name"]: row for row in content["rows"]}
    for pair in content["paired"]:
        a, b = rows[pair["a"]], rows[pair["b"]]
        assert pair["diff"] == pytest.approx(a[pair["metric"]] - b[pair["metric"]], abs=0.01)
        assert pair["ci95"][0] <= pair["diff"] <= pair["ci95"][1]
    text = report.markdown(content)
    assert f"| {saha} | {zero_shot} | IND |" in text


def test_write_report_draws_the_rows_and_the_training_runs(workdir, capsys):
    for stage, accuracies in (("train", (0.1, 0.5)), ("train_random", (0.1, 0.3))):
        (workdir / stage).mkdir()
        lines = [
            {"step": 5 * (i + 1), "loss": 1.0, "accuracy": a} for i, a in enumerate(accuracies)
        ]
        lines.append({"step": 10, "heldout_accuracy": 40.0})
        (workdir / stage / "train_metrics.jsonl").write_text(
            "".join(json.dumps(line) + "\n" for line in lines)
        )
    summary = report.write_report(workdir)
    png = b"\x89PNG"
    assert (workdir / "report.png").read_bytes().startswith(png)
    assert (workdir / "train.png").read_bytes().startswith(png)
    assert json.loads((workdir / "report.json").read_text())["paired"]
    assert len(summary["paired"]) == 5
    assert "Paired differences" in capsys.readouterr().out
    curves = charts.read_train_metrics(workdir / "train" / "train_metrics.jsonl")
    assert curves == {"in-batch": {5: 10.0, 10: 50.0}, "held-out": {10: 40.0}}
