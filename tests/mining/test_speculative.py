"""The speculative, batched judge of the greedy walk against the sequential reference, with
judges given as functions of (anchor row, owner row): same clusters, every pair asked once,
the first round of a block in one request, unjudged pairs kept and counted."""

import numpy as np
import pytest

from g2e import mining
from tests.mining.test_greedy import class_case, random_case, reference_clusters


class RecordingPairJudge:
    """A PairJudge answering p(anchor_row, owner_row); records every request."""

    def __init__(self, p, status=None, batch=8):
        self.p, self.status, self.batch = p, status, batch
        self.pairs_per_call = batch
        self.requests: list[list[tuple[int, int]]] = []

    def __call__(self, anchor_rows, owner_rows):
        pairs = list(zip(anchor_rows.tolist(), owner_rows.tolist()))
        self.requests.append(pairs)
        p_yes = np.asarray([self.p(a, o) for a, o in pairs], np.float32)
        status = np.asarray(
            [self.status(a, o) if self.status else mining.JUDGED for a, o in pairs], np.int8
        )
        return mining.PairAnswers(
            p_yes, status, judged=len(pairs), device_calls=-(-len(pairs) // self.batch)
        )

    def pairs(self):
        return [pair for request in self.requests for pair in request]


def sequential(p):
    return lambda anchor_row, owner_rows: np.asarray([p(anchor_row, o) for o in owner_rows])


# Judges of (anchor row, owner row). A pair's P(yes) depends on what is judged only: the
# anchor's query and the owner row's positive (rows sharing them ask the same question), so
# these read the keys' numbers.
def by_content(p, case):
    query_ids = [int(key[1:]) for key in case[0]]
    positive_ids = [int(key[1:]) for key in case[1]]
    return lambda anchor_row, owner_row: p(query_ids[anchor_row], positive_ids[owner_row])


JUDGES = {
    "drops a third": lambda a, o: 0.8 if (o + a) % 3 == 0 else 0.2,
    "drops most": lambda a, o: 0.1 if (3 * o + a) % 5 == 0 else 0.9,
    "drops none": lambda a, o: 0.0,
    "drops all": lambda a, o: 1.0,
}


@pytest.mark.parametrize("name", sorted(JUDGES))
@pytest.mark.parametrize("keep_order, block_size", [(False, 16), (True, 64)])
def test_batched_judge_gives_the_sequential_clusters(name, keep_order, block_size):
    case = random_case(seed=4)
    p = by_content(JUDGES[name], case)
    settings = dict(
        top_k=3,
        pool_mult=3,
        keep_retrieval_order=keep_order,
        block_size=block_size,
        candidate_chunk=8,
    )
    reference = mining.mine_clusters(*case, judge=sequential(p), **settings)
    expected, _ = reference_clusters(
        *case, top_k=3, pool_mult=3, keep_order=keep_order, judge=sequential(p)
    )
    assert reference.clusters == expected
    pair_judge = RecordingPairJudge(p)
    batched = mining.mine_clusters(*case, pair_judge=pair_judge, **settings)
    assert batched.clusters == reference.clusters and batched.phases == reference.phases
    # No question asked twice, over both phases: (anchor query, owner positive) are unique.
    asked = [(case[0][a], case[1][o]) for a, o in pair_judge.pairs()]
    assert len(asked) == len(set(asked))
    for phase in ("phase1", "phase2"):
        ours, theirs = batched.report[phase], reference.report[phase]
        for key in ("clusters", "anchors_searched", "judge_dropped", "judge_consulted"):
            assert ours[key] == theirs[key], (phase, key)
    assert batched.report["judge"]["pairs"] == len(asked)
    assert batched.report["judge"]["mode"] == "batched"
    assert batched.report["judge"]["calls"] == sum(-(-len(r) // 8) for r in pair_judge.requests)
    # Batching: far fewer requests than the sequential judge's calls (one per anchor round).
    assert len(pair_judge.requests) < reference.report["judge"]["calls"] / 2


def test_a_block_asks_the_first_rounds_of_all_its_anchors_at_once():
    # A judge that drops nothing: the first request holds every phase-1 anchor's first round
    # (one block holds all rows), and it is the only phase-1 request.
    case = random_case(seed=6, rows=60, num_queries=60)
    pair_judge = RecordingPairJudge(lambda a, o: 0.0)
    result = mining.mine_clusters(
        *case,
        pair_judge=pair_judge,
        top_k=3,
        pool_mult=2,
        keep_retrieval_order=False,
        block_size=64,
    )
    phase1 = [c for c, p in zip(result.clusters, result.phases) if p == 1]
    first = pair_judge.requests[0]
    assert {(c[0], o) for c in phase1 for o in c[1:]} <= set(first)
    assert len({a for a, _ in first}) > len(phase1) / 2
    assert result.report["phase1"]["judge_calls"] == -(-len(first) // 8)


def test_unjudged_pairs_are_kept_and_counted():
    # The judge cannot judge owner row 4 (e.g. over the max length): it answers 0.0 with
    # status UNJUDGED, so row 4 is kept where the "yes" judge of test_greedy dropped it.
    pair_judge = RecordingPairJudge(
        lambda a, o: 0.1,
        status=lambda a, o: (
            mining.UNJUDGED if o == 4 else mining.DOWNSCALED if o == 2 else mining.JUDGED
        ),
    )
    result = mining.mine_clusters(
        *class_case(), top_k=2, pool_mult=1, keep_retrieval_order=False, pair_judge=pair_judge
    )
    assert result.clusters == [[0, 4, 2], [1, 3, 5], [6, 2, 4]]
    judge = result.report["judge"]
    assert (judge["unjudged"], judge["downscaled"], judge["dropped"]) == (2, 2, 0)
    assert result.report["phase2"]["judge_unjudged"] == 1


def test_a_bad_pair_judge_answer_names_the_anchor():
    def nan_judge(anchor_rows, owner_rows):
        return mining.PairAnswers(
            np.full(anchor_rows.size, np.nan),
            np.zeros(anchor_rows.size),
            judged=anchor_rows.size,
            device_calls=1,
        )

    with pytest.raises(ValueError, match="anchor row 0"):
        mining.mine_clusters(
            *class_case(), top_k=2, pool_mult=1, keep_retrieval_order=True, pair_judge=nan_judge
        )
    with pytest.raises(ValueError, match="not both"):
        mining.mine_clusters(
            *class_case(),
            top_k=2,
            pool_mult=1,
            keep_retrieval_order=True,
            pair_judge=nan_judge,
            judge=lambda a, o: np.zeros(len(o)),
        )
