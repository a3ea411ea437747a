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
        "recall": 50.0,
    }
    # Undefined shares are None, not 0.
    none_yes = judge_quality.subset_quality(rows, answers, threshold=0.95)
    assert none_yes["yes"] == 0 and none_yes["precision"] is None and none_yes["recall"] == 0.0
