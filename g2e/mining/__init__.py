"""SaHa hard-negative mining (docs/method.md §2): clusters of mutually hard rows per training subset.

A training row i is a pair (query i, positive i). Mining groups rows into clusters (an anchor
row plus up to `top_k` owner rows) whose positives are each other's hard negatives; a
cluster is one unit of the training batch.

`build_clusters` is the construction of docs/method.md §2 without a judge (the contract); `mine_clusters`
is the same construction with the optional generative judge, a report and timings. The
construction, in the words used below:
  * key: a query key (the row's query) or a positive key (the row's positive). Rows may share
    either. A query key stands for the LAST row that carries it (its "representative row").
  * candidate: a unique positive key, numbered in order of first appearance.
  * owner map: candidate -> the query keys of the rows whose positive it is.
  * first_n = top_k * pool_mult, pool = min(2 * first_n, number of candidates).
  * phase 1: rows are visited in order; a row whose query key is used is skipped. The visited
    row (the anchor) retrieves its `pool` nearest candidates by inner product (ties go to the
    lower candidate index) and drops its own positive. Each remaining candidate, in retrieval
    order, maps to its selectable owner keys; the one most similar to the anchor query wins
    (ties: lower representative row); candidates without a selectable owner are passed over;
    the walk stops at `first_n` owners. Unless `keep_retrieval_order` (the classification
    subsets), the owners are then ordered by query-query similarity ascending, the least
    anchor-like first (ties: lower representative row). The first `top_k` form the cluster
    [anchor row, owner representative rows...], and the anchor key and the owner keys become
    used.
  * phase 2: rows whose key is still unused are visited the same way with first_n doubled
    (same pool). Owners may now be keys used in phase 1, but not keys already taken as owners
    in phase 2; phase-2 anchors and owners become used (so they are not visited again).

Decisions where docs/method.md §2 leaves room (each follows the release's code unless it would build a
broken cluster):
  * "Used" is a property of query KEYS, as in the release: rows sharing a query key are
    skipped together, and an owner is a key (placed in the cluster as its representative row).
  * The anchor's own key is never its own owner (it can own a retrieved candidate when rows
    with the anchor's query have other positives): that would repeat the anchor's query in the
    cluster with a positive that is a false negative by construction.
  * Owners within one cluster are distinct keys: once a key is picked for one candidate, the
    next candidates pick among their other owners (the release could repeat a key here).
  * An anchor that finds no owner forms no cluster and is not marked used (as in the release):
    a later row with the same query key is visited again, and the key can still be an owner.
  * A phase-2 anchor is not "taken as an owner in phase 2", so it may be an owner of a later
    phase-2 anchor (as in the release).
  * The anchor is the visited row itself (the first unused row with its key), owners are
    placed as their representative rows; the pool is clipped to the number of candidates.
Rows that end up in no cluster are counted in the report ("rows_uncovered").

Generative judge (g2e's addition, beyond the release): the model is asked whether an owner
row's positive answers the anchor row's query; P(yes) comes from its Yes/No logits. Owners are
judged in their selected order, in rounds of as many as are still needed, until `top_k` have
passed; owners with P(yes) > threshold are dropped from this cluster as false negatives and
stay unused. If every owner is dropped, the anchor forms no cluster (as if it had found none).
A pair's answer depends only on (anchor query key, owner key), so it is asked once.
  * Decision: the judge is asked speculatively, in batches (walk.py): for a block of
    anchors the walk runs ahead against the answers it has, guessing the missing ones (as
    passing, or as dropped once most answers were), which names every pair the rounds will
    need across the block; those are judged in one batched request spread over every device,
    and the walk runs again from the first anchor that rested on a guess. Anchors are
    committed only on answers, never guesses, so the clusters are exactly those of judging
    one anchor round at a time (the `judge=` reference kept for tests), given the same P(yes).
    Speculative pairs that the walk never consults cost device time but change nothing; the
    report counts them (judge_pairs vs. judge_consulted).
  * Decision: a pair over the judge's max length is judged with its images downscaled
    (1/2, 1/4, 1/8 of their pixels), else kept unjudged (P(yes) 0.0) and counted; never NaN,
    never a stopped stage (judge.py).
  * The `mine` stage keeps every answer on disk as it is judged (judge_cache.py), so a killed
    stage resumes mid-subset without judging a stored pair again.

Device scoring: the query-candidate similarities and the top-`pool` are computed for blocks
of upcoming anchors at once (the retrieval does not depend on which keys are used; only the
owner walk does), jitted, with the candidates sharded over all axes of the mesh. Each shard
scans its candidates in chunks of a fixed size that does not depend on the number of
devices, so every similarity is computed by the same matmul shape and the result does not
depend on the number of devices; per-shard top-pools are then merged (ties keep the lower
index because shards and chunks are concatenated in index order). The anchor-owner query
similarities come either from the host (each anchor gathers its owners' vectors: cheap when
candidates have few owners) or, for owner-dense subsets such as classification, from the
device (each searched row against all queries, sharded and chunked the same way); a cost
model picks one (`mine_clusters(query_sims=...)` overrides it).

Modules: greedy.py (the construction's entry points, report), owners.py (keys, owner maps,
one anchor's owner walk), walk.py (the passes over the rows, the sequential and speculative
judge), search.py (device top-pool), files.py (the versioned cluster file the training stage
reads), judge.py (the model's yes/no judgement, over-length policy), judge_cache.py (the
judge's answers on disk; the stage's batched judge over rows), stage.py (the `mine` stage:
embedding, the judge and the files per subset, resumable).
"""

from g2e.mining.files import FORMAT_NAME, FORMAT_VERSION, ClusterFile, read_clusters, write_clusters
from g2e.mining.greedy import MiningResult, build_clusters, keeps_retrieval_order, mine_clusters
from g2e.mining.search import top_pool
from g2e.mining.walk import DOWNSCALED, JUDGED, UNJUDGED, JudgeFn, PairAnswers, PairJudge

__all__ = [
    "DOWNSCALED",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "JUDGED",
    "UNJUDGED",
    "ClusterFile",
    "JudgeFn",
    "MiningResult",
    "PairAnswers",
    "PairJudge",
    "build_clusters",
    "keeps_retrieval_order",
    "mine_clusters",
    "read_clusters",
    "top_pool",
    "write_clusters",
]
