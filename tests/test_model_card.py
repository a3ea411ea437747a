"""The export's model card (README.md): it lists the evaluation the `report` stage wrote, with
the same numbers, whether export runs before or after report; it shows the run's prompts, and
a fine-tuned export's recipe and training data; a report.json older than an evaluation is not
taken for the latest."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from g2e import configuration, model_card
from g2e.data import prompts
from g2e.demo import mini_mmeb
from g2e.evaluation import report
from tests import assets
from tests.evaluation.test_report import results, subset

REPO = pathlib.Path(__file__).resolve().parents[1]


def card_rows(card: str) -> dict[str, list[str]]:
    """{row name: cells} of the card's evaluation table."""
    section = card.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("Model",) and not cells[0].startswith("---"):
            rows[cells[0]] = cells[1:]
    return rows


def report_cells(row: dict) -> list[str]:
    """A report.json row as "score (low-high)" cells in report.GROUPS order."""
    values = [row["meta_tasks"].get(t) for t in report.META_TASKS]
    values += [row["IND"], row["OOD"], row["overall"]]
    cells = []
    for group, value in zip(report.GROUPS, values):
        if value is None:  # no subset of that meta-task was evaluated
            cells.append("-")
            continue
        low, high = row["ci95"][group]
        cells.append(f"{value:.1f} ({low:.1f}-{high:.1f})")
    return cells


def _chance_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """eval_zero_shot, export, report through g2e.main on a small mini-MMEB and a tiny
    checkpoint (export before report: the card collects the table report then writes); then
    export again after report (the card reads report.json)."""
    tmp = tmp_path_factory.mktemp("card_run")
    _, checkpoint = assets.tiny_checkpoint(tmp / "ckpt", seed=4)
    mini_mmeb.build(str(tmp / "mini"), seed=2, train_rows=1, eval_queries=6, candidates=3)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    command = [
        sys.executable,
        "-m",
        "g2e.main",
        f"--config={REPO / 'configs' / 'embed.py'}",
        f"--config.model_dir={checkpoint}",
        f"--config.data.eval_dir={tmp / 'mini' / 'eval'}",
        f"--config.data.eval_image_root={tmp / 'mini'}",
        "--config.data.eval_subsets=ShapeCls,ShapeVQA,ShapeCaption_t2i",
        "--config.eval.batch_size=4",
        "--config.workdir=work",
    ]
    cards = []
    for stages in ("eval_zero_shot,export,report", "export"):
        extra = [f"--config.stages={stages}", "--config.force=export"]
        result = subprocess.run(
            command + extra, cwd=tmp, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        cards.append((tmp / "work" / "export" / "hf" / "README.md").read_text())
    return tmp / "work", cards


def test_the_card_lists_the_evaluation_report_wrote(run):
    workdir, cards = run
    written = json.loads((workdir / "report.json").read_text())
    assert [row["stage"] for row in written["rows"]] == ["eval_zero_shot"]
    for card in cards:  # exported before report, and after it
        rows = card_rows(card)
        assert set(rows) == {row["name"] for row in written["rows"]} | {"chance"}
        for row in written["rows"]:
            assert rows[row["name"]] == report_cells(row), row["name"]
        chance = [_chance_cell(written["chance"].get(g)) for g in report.GROUPS]
        assert rows["chance"] == chance
    assert cards[0] == cards[1]


def test_the_card_shows_the_prompts_of_the_run(run):
    _, cards = run
    card = cards[0]
    assert prompts.SYSTEM_PROMPT in card
    assert prompts.QUERY_SUFFIX_WITH_IMAGE.strip() in card
    assert prompts.QUERY_SUFFIX_TEXT_ONLY.strip() in card
    assert "## Recipe" not in card  # zero-shot: nothing was trained


def test_a_fine_tuned_card_gives_the_recipe_and_training_data():
    config = configuration.base_config()
    config.data.train_dir = "/data/MMEB-train"
    config.train.lr = 2e-5
    config.prompt.suffix = False
    card = model_card.model_card(
        base_model="Qwen/Qwen2-VL-2B-Instruct", config=config, trained=True
    )
    for key in model_card.RECIPE_KEYS + model_card.DATA_KEYS:
        assert f"| `{key}` |" in card, key
    assert "| `train.lr` | `2e-05` |" in card
    assert "| `data.train_dir` | `/data/MMEB-train` |" in card
    assert "| `data.train_subsets` | '' |" in card  # '' (every subset), not an empty cell
    assert "| `train.adapter.targets` | `q_proj, k_proj, v_proj, o_proj, down_proj` |" in card
    # prompt.suffix=False: the card's prompts have no suffix.
    assert prompts.QUERY_SUFFIX_TEXT_ONLY.strip() not in card
    assert "`Qwen/Qwen2-VL-2B-Instruct`" in card


def test_a_report_older_than_an_evaluation_is_not_the_latest(tmp_path):
    rng = np.random.default_rng(0)
    for stage in ("eval_zero_shot", "eval"):
        (tmp_path / stage).mkdir()
        content = results(
            {
                "A": subset("Classification", "IND", rng.random(40) < 0.5, 4),
                "B": subset("Retrieval", "OOD", rng.random(40) < 0.3, 8),
            }
        )
        (tmp_path / stage / "results.json").write_text(json.dumps(content))
    report.write_report(tmp_path)
    assert [r["stage"] for r in model_card.latest_evaluation(tmp_path)["rows"]] == [
        "eval_zero_shot",
        "eval",
    ]
    # A later evaluation (newer results.json): the card collects it, as report will.
    (tmp_path / "eval_random").mkdir()
    content = results(
        {
            "A": subset("Classification", "IND", rng.random(40) < 0.9, 4),
            "B": subset("Retrieval", "OOD", rng.random(40) < 0.8, 8),
        }
    )
    newer = tmp_path / "eval_random" / "results.json"
    newer.write_text(json.dumps(content))
    stamp = (tmp_path / "report.json").stat().st_mtime + 10
    os.utime(newer, (stamp, stamp))
    latest = model_card.latest_evaluation(tmp_path)
    assert [r["stage"] for r in latest["rows"]] == ["eval_zero_shot", "eval", "eval_random"]
    assert latest["rows"][2]["overall"] == pytest.approx(content["overall"])
    assert model_card.latest_evaluation(tmp_path / "eval_random") is None  # nothing evaluated
    card = model_card.model_card(base_model="b", evaluation=latest)
    first_cell = f"{content['meta_tasks']['Classification']:.1f} ("
    assert f"| fine-tuned, random batches | {first_cell}" in card
