"""SaHa's greedy cluster construction (docs/method.md §2), see the package docstring for the rules."""

import dataclasses
from collections.abc import Hashable, Sequence

import jax
import numpy as np

from g2e.data import subsets
from g2e.mining.owners import Owners, State, build_owners
from g2e.mining.search import CandidateIndex, SimilarityTable
from g2e.mining.walk import JudgeFn, PairJudge, Walk, new_phase_stats


def keeps_retrieval_order(subset: str, data_dir: str | None = None) -> bool:
    """True for the classification subsets, whose owners keep retrieval order (docs/method.md §2.3c).

    Uses the subset table of g2e.data.subsets (the data set's manifest first, then MMEB);
    raises its UnknownSubsetError for a name neither knows.
    """
    return subsets.subset_info(subset, data_dir).is_classification


@dataclasses.dataclass
class MiningResult:
    """What `mine_clusters` returns.

    clusters: row indices, anchor first, then the kept owners' rows in their selected order;
        phase-1 clusters first (in anchor row order), then phase-2 ones.
    phases: the phase (1 or 2) of each cluster.
    report: JSON-ready dict: the sizes, phase-1/phase-2 cluster counts, the judge's counts per
        phase, the rows left out of every cluster, and the anchors' zero-shot retrieval hit
        rates @1/@5/@10 (the rank of the own positive among the `pool` retrieved candidates,
        over the rows searched as anchors in phase 1). Deterministic for fixed inputs and
        fixed judge answers, except the judge's work counts (pairs judged, cached, device
        calls).
    timing: seconds spent waiting for the similarity/top-pool search (the next block is
        searched while this one is walked), in the judge, and in the bookkeeping; blocks
        searched.
    """

    clusters: list[list[int]]
    phases: list[int]
    report: dict
    timing: dict


def build_clusters(
    query_keys: Sequence[Hashable],
    positive_keys: Sequence[Hashable],
    query_embeddings: np.ndarray,
    positive_embeddings: np.ndarray,
    *,
    top_k: int,
    pool_mult: int,
    keep_retrieval_order: bool,
) -> list[list[int]]:
    """SaHa clusters of docs/method.md §2 (phase 1 then phase 2), without the generative judge.

    Args:
      query_keys, positive_keys: per row, hashable keys; rows may share either.
      query_embeddings, positive_embeddings: float32 [N, D], L2-normalised, per row (rows
        with equal keys carry equal embeddings).
      top_k: owners kept per cluster. pool_mult: first_n = top_k * pool_mult.
      keep_retrieval_order: True for classification subsets (no query-space reordering).

    Returns:
      Clusters of row indices, anchor first; phase-1 clusters in row order, then phase 2.
      The module docstring states how docs/method.md §2's open points are resolved.
    """
    return mine_clusters(
        query_keys,
        positive_keys,
        query_embeddings,
        positive_embeddings,
        top_k=top_k,
        pool_mult=pool_mult,
        keep_retrieval_order=keep_retrieval_order,
    ).clusters


def _similarities_on_device(
    mode: str,
    num_keys: int,
    owners_per_candidate: float,
    first_n: int,
    pool: int,
    dim: int,
    platform: str,
) -> bool:
    """Whether the anchor-owner query similarities come from the device (each searched row
    against all K queries, one matmul per block) or from the host (each anchor gathers the
    vectors of the ~E owners it looks at, E = first_n x owners per candidate).

    'auto' compares costs: on CPU a matmul over K queries costs about as much as gathering
    K/25 vectors; on an accelerator the matmul is free and K floats per row cross to the host
    instead of E x D floats gathered there. Classification subsets (a few candidates, each
    owned by thousands of queries) go to the device, sparse retrieval subsets stay on the host.
    """
    if mode in ("host", "device"):
        return mode == "device"
    if mode != "auto":
        raise ValueError(f"mining: query_sims={mode!r}; use 'auto', 'host' or 'device'.")
    expected = min(first_n, pool - 1) * owners_per_candidate
    return num_keys <= (25 if platform == "cpu" else dim) * expected


def mine_clusters(
    query_keys: Sequence[Hashable],
    positive_keys: Sequence[Hashable],
    query_embeddings: np.ndarray,
    positive_embeddings: np.ndarray,
    *,
    top_k: int,
    pool_mult: int,
    keep_retrieval_order: bool,
    judge: JudgeFn | None = None,
    pair_judge: PairJudge | None = None,
    judge_threshold: float = 0.5,
    block_size: int = 256,
    candidate_chunk: int = 2048,
    mesh: jax.sharding.Mesh | None = None,
    query_sims: str = "auto",
    subset: str = "",
) -> MiningResult:
    """SaHa clusters (as `build_clusters`), optionally with the generative judge, plus a report.

    Args:
      query_keys ... keep_retrieval_order: as in `build_clusters`.
      judge: the sequential reference judge, judge(anchor_row, owner_rows) -> P(yes) per owner
        row, called once per round of one anchor; owners with P(yes) > judge_threshold are dropped.
      pair_judge: the speculative, batched judge (g2e.mining.walk): pair_judge(anchor_rows,
        owner_rows) -> PairAnswers for the pairs of many anchors at once. Given the same
        P(yes) it gives the sequential judge's clusters. At most one of judge / pair_judge;
        neither: exactly `build_clusters`' clusters.
      block_size: anchors searched at once (one compiled shape); the speculative judge walks
        ahead over one block.
      candidate_chunk: candidates per matmul inside a shard (a fixed shape, so the result does
        not depend on the number of devices).
      mesh: candidates are sharded over all its axes; default all devices on one axis.
      query_sims: where anchor-owner query similarities are computed: 'host' (gather the
        owners' vectors), 'device' (each searched row against all queries, sharded like the
        candidates) or 'auto' (by a cost model, see _similarities_on_device). Both give the
        same clusters up to float rounding in near-ties.
      subset: the subset name, recorded in the report.

    Returns:
      MiningResult (its docstring describes the report).

    Raises:
      ValueError: for mismatched lengths/shapes or a bad top_k/pool_mult/judge answer.
    """
    options = _Options(
        top_k=top_k,
        pool_mult=pool_mult,
        keep_retrieval_order=keep_retrieval_order,
        judge=judge,
        pair_judge=pair_judge,
        judge_threshold=judge_threshold,
        block_size=block_size,
        candidate_chunk=candidate_chunk,
        mesh=mesh,
        query_sims=query_sims,
        subset=subset,
    )
    return _mine(query_keys, positive_keys, query_embeddings, positive_embeddings, options)


@dataclasses.dataclass(frozen=True)
class _Options:
    """`mine_clusters`' keyword arguments, checked on creation and passed down together."""

    top_k: int
    pool_mult: int
    keep_retrieval_order: bool
    judge: JudgeFn | None
    pair_judge: PairJudge | None
    judge_threshold: float
    block_size: int
    candidate_chunk: int
    mesh: jax.sharding.Mesh | None
    query_sims: str
    subset: str

    def __post_init__(self):
        if self.top_k < 1 or self.pool_mult < 1:
            raise ValueError(
                f"mining: top_k={self.top_k} and pool_mult={self.pool_mult} must be >= 1."
            )
        if self.judge is not None and self.pair_judge is not None:
            raise ValueError(
                "mining: pass the sequential `judge` or the batched `pair_judge`, not both."
            )

    @property
    def first_n(self) -> int:
        """Owners a phase-1 anchor walks to (twice as many in phase 2)."""
        return self.top_k * self.pool_mult

    @property
    def judge_mode(self) -> str | None:
        """'sequential' (`judge`), 'batched' (`pair_judge`) or None (no judge)."""
        if self.judge is not None:
            return "sequential"
        return "batched" if self.pair_judge is not None else None


def _mine(
    query_keys: Sequence[Hashable],
    positive_keys: Sequence[Hashable],
    query_embeddings: np.ndarray,
    positive_embeddings: np.ndarray,
    options: _Options,
) -> MiningResult:
    """`mine_clusters`, its keyword arguments checked and gathered in `options`."""
    query_embeddings, positive_embeddings = _checked_embeddings(
        len(query_keys), query_embeddings, positive_embeddings
    )
    n = len(query_keys)
    owners, first_key_row, first_cand_row = build_owners(query_keys, positive_keys)
    num_cands = first_cand_row.size
    first_n = options.first_n
    pool = min(2 * first_n, num_cands)
    # Per-key query vectors; all keys unique (the common case) needs no copy.
    if first_key_row.size == n:
        key_vectors = query_embeddings
    else:
        key_vectors = query_embeddings[first_key_row]
    out = _new_out(options.judge_mode)
    if n:
        candidate_embeddings = positive_embeddings[first_cand_row]
        walk = _new_walk(
            out, owners, key_vectors, query_embeddings, candidate_embeddings, pool, options
        )
        used = np.zeros(first_key_row.size, bool)
        owner_counts = np.diff(owners.owner_ptr)
        walk.run_phase(1, State(used, used, owner_counts.copy()), first_n)
        walk.run_phase(2, State(used, np.zeros_like(used), owner_counts.copy()), 2 * first_n)
    report = _report(
        out, options, num_rows=n, num_keys=first_key_row.size, num_cands=num_cands, pool=pool
    )
    return MiningResult(out["clusters"], out["cluster_phases"], report, out["timing"])


def _checked_embeddings(
    n: int, query_embeddings: np.ndarray, positive_embeddings: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings as float32 [n, D]; raises ValueError for other shapes."""
    query_embeddings = np.asarray(query_embeddings, np.float32)
    positive_embeddings = np.asarray(positive_embeddings, np.float32)
    if (
        query_embeddings.ndim != 2
        or query_embeddings.shape[0] != n
        or positive_embeddings.shape != query_embeddings.shape
    ):
        raise ValueError(
            f"mining: {n} rows need query and positive embeddings of shape [{n}, D];"
            f" got {query_embeddings.shape} and {positive_embeddings.shape}."
        )
    return query_embeddings, positive_embeddings


def _new_walk(
    out: dict,
    owners: Owners,
    key_vectors: np.ndarray,
    query_embeddings: np.ndarray,
    candidate_embeddings: np.ndarray,
    pool: int,
    options: _Options,
) -> Walk:
    """The walk over the candidate index, its query similarities on the host or the device
    (recorded in `out`)."""
    num_cands = candidate_embeddings.shape[0]
    mesh, chunk = options.mesh, options.candidate_chunk
    index = CandidateIndex(candidate_embeddings, pool, mesh, chunk)
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    on_device = _similarities_on_device(
        options.query_sims,
        key_vectors.shape[0],
        owners.owner_key.size / num_cands,
        options.first_n,
        pool,
        query_embeddings.shape[1],
        platform,
    )
    table = SimilarityTable(key_vectors, mesh, chunk) if on_device else None
    out["query_sims"] = "device" if on_device else "host"
    return Walk(
        owners,
        key_vectors,
        query_embeddings,
        index,
        table,
        top_k=options.top_k,
        keep_retrieval_order=options.keep_retrieval_order,
        threshold=options.judge_threshold,
        block_size=options.block_size,
        out=out,
        judge=options.judge,
        pair_judge=options.pair_judge,
    )


def _new_out(judge_mode: str | None) -> dict:
    """What the walk collects: clusters, their phases, per-phase counters and timing."""
    return {
        "clusters": [],
        "cluster_phases": [],
        "query_sims": "host",
        "judge_mode": judge_mode,
        "timing": {"search_s": 0.0, "judge_s": 0.0, "bookkeeping_s": 0.0, "blocks": 0},
        "phases": {p: new_phase_stats() for p in (1, 2)},
    }


# The judge's counters, per phase and in all: pairs judged by the model in this run (speculative
# ones included), device calls of the judge program, answers read back from a store instead,
# and of the pairs the walk consulted: how many, dropped, judged downscaled, unjudged (kept).
_JUDGE_COUNTS = (
    ("judge_pairs", "judged"),
    ("judge_calls", "calls"),
    ("judge_cached", "cached"),
    ("judge_consulted", "consulted"),
    ("judge_dropped", "dropped"),
    ("judge_downscaled", "downscaled"),
    ("judge_unjudged", "unjudged"),
)


def _report(
    out: dict, options: _Options, *, num_rows: int, num_keys: int, num_cands: int, pool: int
) -> dict:
    """The JSON-ready mining report of one subset (see `MiningResult`)."""
    clusters, phases = out["clusters"], np.asarray(out["cluster_phases"], np.int64)
    sizes = np.asarray([len(c) for c in clusters], np.int64)
    covered = np.unique(np.concatenate([np.asarray(c) for c in clusters])) if clusters else []
    return {
        "subset": options.subset,
        "rows": num_rows,
        "unique_queries": num_keys,
        "candidates": num_cands,
        "top_k": options.top_k,
        "pool_mult": options.pool_mult,
        "first_n": options.first_n,
        "pool": pool,
        "keep_retrieval_order": options.keep_retrieval_order,
        "query_similarities": out["query_sims"],
        "clusters": len(clusters),
        "cluster_size": {
            "min": int(sizes.min()) if sizes.size else 0,
            "mean": float(sizes.mean()) if sizes.size else 0.0,
            "max": int(sizes.max()) if sizes.size else 0,
            "histogram": {str(s): int(c) for s, c in zip(*np.unique(sizes, return_counts=True))},
        },
        "rows_covered": int(len(covered)),
        "rows_uncovered": int(num_rows - len(covered)),
        **_phase_reports(out["phases"], phases, sizes),
        "judge": _judge_report(out, options.judge_threshold),
        "retrieval": _retrieval_report(out["phases"][1]),
    }


def _phase_reports(stats_by_phase: dict, phases: np.ndarray, sizes: np.ndarray) -> dict:
    """Per phase ("phase1", "phase2"): its clusters, the rows in them, the anchors it
    searched and its judge counters; `phases` and `sizes` are per cluster."""
    return {
        f"phase{p}": {
            "clusters": int(np.sum(phases == p)),
            "rows_in_clusters": int(np.sum(sizes[phases == p])),
            "anchors_searched": stats["searched"],
            **{name: stats["judge"][key] for name, key in _JUDGE_COUNTS},
        }
        for p, stats in stats_by_phase.items()
    }


def _judge_report(out: dict, judge_threshold: float) -> dict:
    """Whether and how the judge ran, and its counters summed over both phases."""
    return {
        "enabled": out["judge_mode"] is not None,
        "mode": out["judge_mode"],
        "threshold": float(judge_threshold) if out["judge_mode"] else None,
        **{
            name.removeprefix("judge_"): sum(s["judge"][key] for s in out["phases"].values())
            for name, key in _JUDGE_COUNTS
        },
    }


def _retrieval_report(phase1: dict) -> dict:
    """The phase-1 anchors' zero-shot hit rates: their own positive at rank 1, 5 or 10."""
    searched = max(phase1["searched"], 1)
    return {
        "anchors": phase1["searched"],
        "hit@1": phase1["hits@1"] / searched,
        "hit@5": phase1["hits@5"] / searched,
        "hit@10": phase1["hits@10"] / searched,
    }
