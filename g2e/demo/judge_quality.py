"""The demo's `judge_quality` stage: how right the mining judge's "yes" is, against the truth.

The mine stage's judge says "yes" when it takes an owner's positive to answer an anchor's
query too (a false negative, so the owner leaves the cluster). On a mini-MMEB that truth is
known by construction (`g2e.demo.mini_mmeb.answers`: same label, same answer, same caption).
For every pair the judge answered (its cache, `<workdir>/mine/cache/<subset>/judge/`), this
stage compares the answer (P(yes) > mine.judge_threshold) with the truth and writes, per
training subset, `<workdir>/judge_quality/results.json`:

  {subset: {"pairs", "true_pairs", "base_rate", "yes", "precision", "precision_ci95",
            "recall"}}

base_rate is the share of judged pairs that are truly false negatives (what a judge saying
"yes" at random would reach as precision), precision the share of "yes" that are true, with
its Wilson 95% interval [lo, hi] (a judge beats chance when lo > base_rate), recall the share
of true pairs the judge caught; percentages, None where undefined. Pairs judged
unanswerable (over-length, kept unjudged) are left out. The `report` stage adds the table.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from g2e import atomic, distributed, layout
from g2e.data import mmeb
from g2e.data import rows as rows_lib
from g2e.data.errors import BadInputReport
from g2e.demo import mini_mmeb
from g2e.mining.judge_cache import JudgeCache, judge_fingerprint, key_hashes
from g2e.mining.walk import UNJUDGED
from g2e.pipeline import Pipeline


def run(pipeline: Pipeline) -> dict[str, Any]:
    """Runs the stage; returns the summary for DONE.json.

    Raises:
      ValueError: the judge is off, or a training subset is not a mini-MMEB one (no truth).
      FileNotFoundError: the mine stage has not judged a subset yet.
    """
    config = pipeline.config
    data = config.data
    if not config.mine.judge:
        raise ValueError(
            "judge_quality: --config.mine.judge is False, so nothing was judged; "
            "turn the judge on or drop the stage"
        )
    report = BadInputReport(data.on_bad_input)
    results = {}
    for subset in rows_lib.train_subsets(data):
        if subset not in mini_mmeb.SUBSETS:
            raise ValueError(
                f"judge_quality: training subset {subset} is not a mini-MMEB "
                "subset; the judge's quality is measured only where the truth is "
                "known by construction (configs/demo.py)"
            )
        directory = layout.judge_cache_dir(pipeline.workdir, subset)
        if not (directory / "index.json").is_file():
            raise FileNotFoundError(
                f"judge_quality: {directory} holds no judge answers; run "
                "the mine stage first (--config.stages=mine)"
            )
        cache = JudgeCache(directory, judge_fingerprint(pipeline), writable=False)
        rows = rows_lib.train_rows(data, subset, report)
        results[subset] = subset_quality(rows, cache.answers, config.mine.judge_threshold)
        logging.info("judge_quality %s: %s", subset, results[subset])
    if distributed.is_primary():
        atomic.write_json(layout.judge_quality_file(pipeline.workdir), results, indent=2)
    return {
        subset: {k: r[k] for k in ("base_rate", "precision", "recall")}
        for subset, r in results.items()
    }


def subset_quality(
    rows: Sequence[mmeb.TrainRow], answers: dict[tuple[int, int], tuple], threshold: float
) -> dict[str, Any]:
    """The judge's answers on one subset's rows against mini_mmeb.answers.

    Args:
      rows: the subset's training rows, as the mine stage read them.
      answers: {(query hash, positive hash): (P(yes), status)} (JudgeCache.answers).
      threshold: P(yes) above it is a "yes" (mine.judge_threshold).
    """
    query_keys, positive_keys = rows_lib.train_row_keys(rows)
    anchor_of = _first_row_of(key_hashes(query_keys))
    owner_of = _first_row_of(key_hashes(positive_keys))
    truth, yes = [], []
    for (query, positive), (p_yes, status) in answers.items():
        if status == UNJUDGED or query not in anchor_of or positive not in owner_of:
            continue
        truth.append(mini_mmeb.answers(rows[anchor_of[query]], rows[owner_of[positive]]))
        yes.append(p_yes > threshold)
    truth, yes = np.asarray(truth, bool), np.asarray(yes, bool)
    return {
        "pairs": int(truth.size),
        "true_pairs": int(truth.sum()),
        "base_rate": _percent(truth.sum(), truth.size),
        "yes": int(yes.sum()),
        "precision": _percent((truth & yes).sum(), yes.sum()),
        "precision_ci95": wilson_ci95(int((truth & yes).sum()), int(yes.sum())),
        "recall": _percent((truth & yes).sum(), truth.sum()),
    }


def _first_row_of(hashes: np.ndarray) -> dict[int, int]:
    """{hash: the first row carrying it}."""
    first: dict[int, int] = {}
    for row, value in enumerate(hashes.tolist()):
        first.setdefault(value, row)
    return first


def _percent(part: int, whole: int) -> float | None:
    return round(100.0 * float(part) / float(whole), 1) if whole else None


# The normal quantile of a two-sided 95% interval.
Z95 = 1.959963984540054


def wilson_ci95(successes: int, trials: int) -> list[float] | None:
    """The Wilson score 95% interval of a proportion, in percent ([lo, hi]; None for 0 trials).

    Unlike p +- z sqrt(p(1-p)/n) it stays inside [0, 100] and is not empty at p = 0 or 1:
    centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    """
    if not trials:
        return None
    p, n, z2 = successes / trials, trials, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [round(100.0 * max(0.0, centre - half), 1), round(100.0 * min(1.0, centre + half), 1)]
