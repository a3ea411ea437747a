"""A `mine` stage killed (SIGKILL) mid-subset and rerun: byte-identical cluster files, and no
pair whose answer was stored before the kill is judged again."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from g2e.demo import mini_mmeb
from tests import compilation_cache, killing
from tests.mining.tiny_mine import flags_of, mine_settings, write_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[2]
SUBSET = "ShapeCaption_t2i"


def _command(settings: dict) -> list[str]:
    return [
        sys.executable,
        "-m",
        "g2e.main",
        f"--config={REPO}/configs/mmeb.py",
        *flags_of(settings),
        # The three runs compile the same programs: the later ones load them.
        *compilation_cache.main_flags(),
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # One CPU device.
    env.update(JAX_PLATFORMS="cpu")
    return env


def _shards(workdir: pathlib.Path) -> list[pathlib.Path]:
    return sorted((workdir / "mine" / "cache" / SUBSET / "judge").glob("pairs-*.npz"))


def _pairs(shards) -> set[tuple[int, int]]:
    pairs = set()
    for path in shards:
        with np.load(path) as shard:
            pairs.update(zip(shard["query"].tolist(), shard["positive"].tolist()))
    return pairs


@pytest.mark.slow
def test_mine_killed_mid_subset_resumes_to_identical_clusters(tmp_path):
    model_dir = write_checkpoint(tmp_path / "model")
    mini_mmeb.build(str(tmp_path / "data"), seed=0, train_rows=96, eval_queries=2, candidates=2)
    # The tiny model's P(yes) on this subset lie in 0.53-0.59 (median 0.559): this threshold
    # drops some of the owners, so blocks take several judge rounds.
    overrides = {
        "data.train_subsets": SUBSET,
        "mine.judge_threshold": 0.57,
        "mine.block_size": 16,
        "mine.judge_batch_size": 8,
        # Host work in the main process: a pool of Grain workers costs each run seconds to
        # start on a 2-core machine, and results do not depend on it.
        "data.workers": 0,
    }
    env = _env()
    fresh, killed = tmp_path / "fresh", tmp_path / "killed"
    run = subprocess.run(
        _command(mine_settings(model_dir, tmp_path / "data", fresh, **overrides)),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    clusters = f"mine/{SUBSET}.clusters.json"
    assert len(_shards(fresh)) >= 3, "too few judge calls to kill the stage in between"

    command = _command(mine_settings(model_dir, tmp_path / "data", killed, **overrides))
    # Killed where it waits after writing its second judge shard (g2e.killpoints).
    killing.kill_at(command, f"judge_shard_{SUBSET}_1", tmp_path / "killed.log", env=env)
    assert not (killed / clusters).exists(), "the subset was mined before the kill"
    stored = _shards(killed)
    assert [p.name for p in stored] == ["pairs-000000.npz", "pairs-000001.npz"]
    before = _pairs(stored)

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert (killed / clusters).read_bytes() == (fresh / clusters).read_bytes()
    rejudged = _pairs([p for p in _shards(killed) if p not in stored])
    assert rejudged and not rejudged & before
    report = json.loads((killed / "mine" / f"{SUBSET}.report.json").read_text())
    assert report["judge"]["cached"] > 0 and report["judge"]["pairs"] == len(rejudged)
    assert 0 < report["judge"]["dropped"] < report["judge"]["consulted"] / 2, (
        "retune mine.judge_threshold to the tiny model's P(yes)",
        report["judge"],
    )
    reference = json.loads((fresh / "mine" / f"{SUBSET}.report.json").read_text())
    for key in ("consulted", "dropped", "unjudged"):
        assert report["judge"][key] == reference["judge"][key], key
