"""The judge's quality against the mini-MMEB's truth, on hand-built rows and answers."""

from g2e.data import mmeb
from g2e.data import rows as rows_lib
from g2e.demo import judge_quality
from g2e.mining.judge_cache import key_hashes
from g2e.mining.walk import DOWNSCALED, JUDGED, UNJUDGED


def _row(index, query, label):
    return mmeb.TrainRow(
        "ColorCls",
        index,
        f"<|image_1|>\nclassify {query}",
        f"/img/{query}.jpg",
        label,
        None,
        "",
        None,
    )


def test_precision_recall_and_base_rate_of_the_judges_yes():
    rows = [_row(0, "a", "red"), _row(1, "b", "red"), _row(2, "c", "blue"), _row(3, "d", "blue")]
    query_keys, positive_keys = rows_lib.train_row_keys(rows)
    query, positive = key_hashes(query_keys).tolist(), key_hashes(positive_keys).tolist()
    # Rows 0 and 1 share the label "red": row 1's positive answers row 0's query (true pair).
    answers = {
        (query[0], positive[1]): (0.9, JUDGED),  # yes, true
        (query[0], positive[2]): (0.7, DOWNSCALED),  # yes, false
        (query[1], positive[2]): (0.2, JUDGED),  # no, false
        (query[2], positive[1]): (0.1, JUDGED),  # no, false
        (query[3], positive[2]): (0.4, JUDGED),  # no, true: a miss
        (query[3], positive[0]): (0.0, UNJUDGED),
    }  # left out
    quality = judge_quality.subset_quality(rows, answers, threshold=0.5)
    assert quality == {
        "pairs": 5,
        "true_pairs": 2,
        "base_rate": 40.0,
        "yes": 2,
        "precision": 50.0,
        # Wilson, 1 of 2: centre (0.5 + z^2/4) / (1 + z^2/2) = 0.5, half-width
        # z sqrt(1/8 + z^2/16) / (1 + z^2/2) = 0.4055.
        "precision_ci95": [9.5, 90.5],
        "recall": 50.0,
    }
    # Undefined shares are None, not 0.
    none_yes = judge_quality.subset_quality(rows, answers, threshold=0.95)
    assert none_yes["yes"] == 0 and none_yes["precision"] is None and none_yes["recall"] == 0.0
    assert none_yes["precision_ci95"] is None


def test_wilson_interval_equals_a_hand_computation():
    z2 = 1.959963984540054**2
    # 0 of 10: centre = half-width = (z^2 / 20) / (1 + z^2 / 10), so [0, z^2/10 / (1 + z^2/10)].
    assert judge_quality.wilson_ci95(0, 10) == [0.0, round(100 * (z2 / 10) / (1 + z2 / 10), 1)]
    # Newcombe (1998), 81 of 263: 0.2553 to 0.3662.
    assert judge_quality.wilson_ci95(81, 263) == [25.5, 36.6]
    assert judge_quality.wilson_ci95(5, 0) is None
