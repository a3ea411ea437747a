"""SaHa's greedy cluster construction (SPEC §2), see the package docstring for the rules."""

import dataclasses
import time
from typing import Callable, Hashable, Sequence

import jax
import numpy as np

from g2e.data import rows as rows_lib
from g2e.data import subsets
from g2e.mining.search import CandidateIndex, SimilarityTable, padded_block

# judge(anchor_row, owner_rows) -> P(yes) per owner row, float array [len(owner_rows)].
JudgeFn = Callable[[int, np.ndarray], np.ndarray]


def keeps_retrieval_order(subset: str, data_dir: str | None = None) -> bool:
    """True for the classification subsets, whose owners keep retrieval order (SPEC §2.3c).

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
    report: JSON-ready dict (see `mine_clusters`); deterministic for fixed inputs.
    timing: seconds spent waiting for the similarity/top-pool search (the next block is
        searched while this one is walked) and in the bookkeeping; blocks searched.
    """

    clusters: list[list[int]]
    phases: list[int]
    report: dict
    timing: dict


def build_clusters(query_keys: Sequence[Hashable], positive_keys: Sequence[Hashable],
                   query_embeddings: np.ndarray, positive_embeddings: np.ndarray, *,
                   top_k: int, pool_mult: int, keep_retrieval_order: bool) -> list[list[int]]:
    """SaHa clusters of SPEC §2 (phase 1 then phase 2), without the generative judge.

    Args:
      query_keys, positive_keys: per row, hashable keys; rows may share either.
      query_embeddings, positive_embeddings: float32 [N, D], L2-normalised, per row (rows
        with equal keys carry equal embeddings).
      top_k: owners kept per cluster. pool_mult: first_n = top_k * pool_mult.
      keep_retrieval_order: True for classification subsets (no query-space reordering).

    Returns:
      Clusters of row indices, anchor first; phase-1 clusters in row order, then phase 2.
      The module docstring states how SPEC §2's open points are resolved.
    """
    return mine_clusters(query_keys, positive_keys, query_embeddings, positive_embeddings,
                         top_k=top_k, pool_mult=pool_mult,
                         keep_retrieval_order=keep_retrieval_order).clusters


# ----------------------------------------------------------------------------- keys / owners


def _csr(groups: np.ndarray, members: np.ndarray, num_groups: int):
    """Groups `members` by `groups` (stable): (ptr int64 [G+1], members sorted by group)."""
    order = np.argsort(groups, kind="stable")
    ptr = np.zeros(num_groups + 1, np.int64)
    np.cumsum(np.bincount(groups, minlength=num_groups), out=ptr[1:])
    return ptr, members[order]


def _ranges(ptr: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Concatenated indices ptr[g]:ptr[g+1] for each g in `groups`, in that order."""
    starts, ends = ptr[groups], ptr[groups + 1]
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return offsets + np.arange(total)


@dataclasses.dataclass
class _Owners:
    """The row/key/candidate bookkeeping of one subset, as flat arrays."""

    row_key: np.ndarray        # [N] query-key id of each row
    row_cand: np.ndarray       # [N] candidate id (unique positive) of each row
    rep_row: np.ndarray        # [K] representative (last) row of each query key
    owner_ptr: np.ndarray      # [C+1] CSR: candidate -> owner keys, by representative row
    owner_key: np.ndarray
    cand_ptr: np.ndarray       # [K+1] CSR: query key -> the candidates it owns
    cand_of_key: np.ndarray
    multi_owner: bool          # some key owns several candidates (owner picks may collide)


def _owners(query_keys, positive_keys) -> tuple[_Owners, np.ndarray, np.ndarray]:
    """Builds _Owners; also returns each key's and each candidate's first row."""
    n = len(query_keys)
    if len(positive_keys) != n:
        raise ValueError(f"mining: {n} query keys but {len(positive_keys)} positive keys; "
                         "pass one of each per row.")
    distinct_keys, row_key = rows_lib.index_keys(query_keys)
    distinct_cands, row_cand = rows_lib.index_keys(positive_keys)
    num_keys, num_cands = len(distinct_keys), len(distinct_cands)
    rows = np.arange(n, dtype=np.int64)
    rep_row = np.full(num_keys, -1, np.int64)
    np.maximum.at(rep_row, row_key, rows)             # a key stands for its last row
    first_key_row = np.full(num_keys, n, np.int64)
    np.minimum.at(first_key_row, row_key, rows)
    first_cand_row = np.full(num_cands, n, np.int64)
    np.minimum.at(first_cand_row, row_cand, rows)
    # Unique (candidate, key) pairs, each candidate's owners sorted by representative row.
    pairs = np.unique(row_cand.astype(np.int64) * num_keys + row_key)
    pair_cand, pair_key = pairs // num_keys, pairs % num_keys
    order = np.lexsort((rep_row[pair_key], pair_cand))
    owner_ptr, owner_key = _csr(pair_cand[order], pair_key[order], num_cands)
    cand_ptr, cand_of_key = _csr(pair_key, pair_cand, num_keys)
    multi = bool(np.any(np.diff(cand_ptr) > 1))
    owners = _Owners(row_key, row_cand, rep_row, owner_ptr, owner_key.astype(np.int64),
                     cand_ptr, cand_of_key.astype(np.int64), multi)
    return owners, first_key_row, first_cand_row


# ----------------------------------------------------------------------------- greedy pass


@dataclasses.dataclass
class _State:
    """Which keys are used (skipped as anchors) and which may no longer be owners."""

    used: np.ndarray           # [K] bool: key is in a cluster (or was an anchor)
    excluded: np.ndarray       # [K] bool: key may not be an owner (phase 1: `used` itself)
    available: np.ndarray      # [C] int: owners of each candidate that are not excluded


def _host_similarity(key_vectors: np.ndarray, anchor_key: int) -> Callable:
    """keys -> their query similarity to the anchor, gathered on the host. One dot per row
    (np.vecdot): unlike a BLAS gemv it runs on one thread, not waiting on a busy host, and a
    row's result does not depend on the other rows."""
    anchor_vector = key_vectors[anchor_key]
    return lambda keys: np.vecdot(key_vectors[keys], anchor_vector)


def _similarities_on_device(mode: str, num_keys: int, owners_per_candidate: float,
                            first_n: int, pool: int, dim: int, platform: str) -> bool:
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


def _select_owners(cands: np.ndarray, anchor_key: int, similarity: Callable,
                   owners: _Owners, state: _State, first_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Owner walk of one anchor: (owner keys in retrieval order, their similarity to the
    anchor query), at most first_n. Vectorised; falls back to a sequential walk only when a
    key owning several candidates was picked twice."""
    selectable = state.available[cands]
    start, end = owners.cand_ptr[anchor_key], owners.cand_ptr[anchor_key + 1]
    # The anchor key counts in `available` (it is not used yet) but is never its own owner.
    # A key owning one candidate owns only the anchor's positive, which is dropped already.
    anchor_owns_others = end - start > 1
    if anchor_owns_others:
        own = owners.cand_of_key[start:end]
        selectable = selectable - (cands[:, None] == own[None, :]).any(axis=1)
    chosen = cands[np.flatnonzero(selectable > 0)[:first_n]]
    if chosen.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    starts = owners.owner_ptr[chosen]
    lengths = owners.owner_ptr[chosen + 1] - starts
    ends = np.cumsum(lengths)
    keys = owners.owner_key[np.repeat(starts - ends + lengths, lengths) + np.arange(ends[-1])]
    segment = np.repeat(np.arange(chosen.size), lengths)
    ok = ~state.excluded[keys]
    if anchor_owns_others:
        ok &= keys != anchor_key
    keys, segment = keys[ok], segment[ok]
    sims = similarity(keys)
    # Every chosen candidate has a selectable owner, so no segment is empty; the first maximum
    # of a segment is the owner with the lower representative row.
    bounds = np.searchsorted(segment, np.arange(chosen.size))
    best = np.maximum.reduceat(sims, bounds)
    positions = np.where(sims == best[segment], np.arange(keys.size), keys.size)
    first = np.minimum.reduceat(positions, bounds)
    picked = keys[first]
    if owners.multi_owner and np.unique(picked).size < picked.size:
        return _select_owners_sequential(cands, anchor_key, similarity, owners, state, first_n)
    return picked, sims[first]


def _select_owners_sequential(cands, anchor_key, similarity, owners, state, first_n):
    """The owner walk one candidate at a time, with keys picked earlier taken out."""
    picked, picked_sims = [], []
    for cand in cands:
        keys = owners.owner_key[owners.owner_ptr[cand]:owners.owner_ptr[cand + 1]]
        keys = keys[~state.excluded[keys] & (keys != anchor_key) & ~np.isin(keys, picked)]
        if keys.size == 0:
            continue
        sims = similarity(keys)
        best = int(np.argmax(sims))
        picked.append(int(keys[best]))
        picked_sims.append(sims[best])
        if len(picked) == first_n:
            break
    return np.asarray(picked, np.int64), np.asarray(picked_sims, np.float32)


def _judge_owners(judge: JudgeFn, threshold: float, anchor_row: int, ordered: np.ndarray,
                  rep_row: np.ndarray, top_k: int, counts: dict) -> np.ndarray:
    """Judges owners in order, as many per round as are still needed, until top_k pass."""
    kept: list[int] = []
    start = 0
    while len(kept) < top_k and start < ordered.size:
        batch = ordered[start:start + top_k - len(kept)]
        start += batch.size
        p_yes = np.asarray(judge(int(anchor_row), rep_row[batch]), np.float64)
        if p_yes.shape != batch.shape or not np.all(np.isfinite(p_yes)):
            raise ValueError(
                f"mining judge: for anchor row {anchor_row} and {batch.size} owner rows it "
                f"returned shape {p_yes.shape} (finite: {bool(np.all(np.isfinite(p_yes)))}); "
                "it must return one finite P(yes) per owner row.")
        passed = p_yes <= threshold
        kept.extend(batch[passed].tolist())
        counts["judged"] += batch.size
        counts["dropped"] += int(batch.size - passed.sum())
        counts["calls"] += 1
    return np.asarray(kept, np.int64)


def _next_rows(row_key: np.ndarray, used: np.ndarray, start: int, count: int) -> np.ndarray:
    """The next `count` rows from `start` on whose query key is not used."""
    found, total, window = [], 0, 4 * count
    while start < row_key.size and total < count:
        rows = start + np.flatnonzero(~used[row_key[start:start + window]])
        found.append(rows[:count - total])
        total += found[-1].size
        start += window
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def _run_phase(phase: int, owners: _Owners, key_vectors: np.ndarray,
               query_embeddings: np.ndarray, index: CandidateIndex,
               table: SimilarityTable | None, state: _State, *,
               first_n: int, top_k: int, keep_retrieval_order: bool, judge: JudgeFn | None,
               judge_threshold: float, block_size: int, out: dict) -> None:
    """One greedy pass over the rows (SPEC §2.3 / §2.4); appends to out['clusters'] etc."""
    stats = out["phases"][phase]

    def dispatch(rows):
        out["timing"]["blocks"] += 1
        block = padded_block(query_embeddings[rows], block_size)
        return index.dispatch(block), table.dispatch(block) if table else None

    # Retrieval does not depend on the used state, so blocks of upcoming rows are searched at
    # once, the next block while this one is walked; rows that become used meanwhile are
    # skipped at their turn. Every row unused at its turn is in some block, in row order.
    rows = _next_rows(owners.row_key, state.used, 0, block_size)
    pending = dispatch(rows) if rows.size else None
    while rows.size:
        tick = time.perf_counter()
        _, found = index.fetch(pending[0])
        block_sims = table.fetch(pending[1]) if table else None
        next_rows = _next_rows(owners.row_key, state.used, int(rows[-1]) + 1, block_size)
        if next_rows.size:
            pending = dispatch(next_rows)
        tock = time.perf_counter()
        out["timing"]["search_s"] += tock - tick
        found = found.astype(np.int64)
        for j, (anchor_row, cands) in enumerate(zip(rows.tolist(), found)):
            anchor_key = int(owners.row_key[anchor_row])
            if state.used[anchor_key]:
                continue
            is_own = cands == owners.row_cand[anchor_row]
            rank = int(is_own.argmax()) if is_own.any() else cands.size
            stats["searched"] += 1
            for k in (1, 5, 10):
                stats[f"hits@{k}"] += rank < k
            cands = cands[~is_own]
            if block_sims is None:
                similarity = _host_similarity(key_vectors, anchor_key)
            else:
                similarity = block_sims[j].__getitem__
            picked, sims = _select_owners(cands, anchor_key, similarity, owners, state, first_n)
            if picked.size == 0:
                continue
            if not keep_retrieval_order:
                # Least anchor-like first; ties to the lower representative row.
                picked = picked[np.lexsort((owners.rep_row[picked], sims))]
            if judge is None:
                kept = picked[:top_k]
            else:
                kept = _judge_owners(judge, judge_threshold, anchor_row, picked,
                                     owners.rep_row, top_k, stats["judge"])
                if kept.size == 0:
                    continue
            out["clusters"].append([anchor_row] + owners.rep_row[kept].tolist())
            out["cluster_phases"].append(phase)
            newly_excluded = np.append(kept, anchor_key) if phase == 1 else kept
            state.used[anchor_key] = True
            state.used[kept] = True
            state.excluded[newly_excluded] = True
            np.subtract.at(state.available,
                           owners.cand_of_key[_ranges(owners.cand_ptr, newly_excluded)], 1)
        out["timing"]["bookkeeping_s"] += time.perf_counter() - tock
        rows = next_rows


def mine_clusters(query_keys: Sequence[Hashable], positive_keys: Sequence[Hashable],
                  query_embeddings: np.ndarray, positive_embeddings: np.ndarray, *,
                  top_k: int, pool_mult: int, keep_retrieval_order: bool,
                  judge: JudgeFn | None = None, judge_threshold: float = 0.5,
                  block_size: int = 256, candidate_chunk: int = 2048,
                  mesh: jax.sharding.Mesh | None = None, query_sims: str = "auto",
                  subset: str = "") -> MiningResult:
    """SaHa clusters (as `build_clusters`), optionally with the generative judge, plus a report.

    Args:
      query_keys ... keep_retrieval_order: as in `build_clusters`.
      judge: None (off: exactly `build_clusters`' clusters) or judge(anchor_row, owner_rows)
        -> P(yes) per owner row; owners with P(yes) > judge_threshold are dropped.
      block_size: anchors searched at once (one compiled shape).
      candidate_chunk: candidates per matmul inside a shard (a fixed shape, so the result does
        not depend on the number of devices).
      mesh: candidates are sharded over all its axes; default all devices on one axis.
      query_sims: where anchor-owner query similarities are computed: 'host' (gather the
        owners' vectors), 'device' (each searched row against all queries, sharded like the
        candidates) or 'auto' (by a cost model, see _similarities_on_device). Both give the
        same clusters up to float rounding in near-ties.
      subset: the subset name, recorded in the report.

    Returns:
      MiningResult. The report holds the sizes, phase-1/phase-2 cluster counts, the judge's
      counts per phase, the rows left out of every cluster, and the anchors' zero-shot
      retrieval hit rates @1/@5/@10 (the rank of the own positive among the `pool` retrieved
      candidates, over the rows searched as anchors in phase 1).

    Raises:
      ValueError: for mismatched lengths/shapes or a bad top_k/pool_mult/judge answer.
    """
    if top_k < 1 or pool_mult < 1:
        raise ValueError(f"mining: top_k={top_k} and pool_mult={pool_mult} must be >= 1.")
    query_embeddings = np.asarray(query_embeddings, np.float32)
    positive_embeddings = np.asarray(positive_embeddings, np.float32)
    n = len(query_keys)
    if (query_embeddings.ndim != 2 or query_embeddings.shape[0] != n
            or positive_embeddings.shape != query_embeddings.shape):
        raise ValueError(f"mining: {n} rows need query and positive embeddings of shape [{n}, D];"
                         f" got {query_embeddings.shape} and {positive_embeddings.shape}.")
    owners, first_key_row, first_cand_row = _owners(query_keys, positive_keys)
    num_cands = first_cand_row.size
    first_n = top_k * pool_mult
    pool = min(2 * first_n, num_cands)
    # Per-key query vectors; all keys unique (the common case) needs no copy.
    if first_key_row.size == n:
        key_vectors = query_embeddings
    else:
        key_vectors = query_embeddings[first_key_row]
    out = {"clusters": [], "cluster_phases": [], "query_sims": "host",
           "timing": {"search_s": 0.0, "bookkeeping_s": 0.0, "blocks": 0},
           "phases": {p: {"searched": 0, "hits@1": 0, "hits@5": 0, "hits@10": 0,
                          "judge": {"judged": 0, "dropped": 0, "calls": 0}} for p in (1, 2)}}
    if n:
        index = CandidateIndex(positive_embeddings[first_cand_row], pool, mesh,
                               candidate_chunk)
        platform = (mesh.devices.flat[0].platform if mesh is not None
                    else jax.default_backend())
        on_device = _similarities_on_device(
            query_sims, first_key_row.size, owners.owner_key.size / num_cands, first_n, pool,
            query_embeddings.shape[1], platform)
        table = SimilarityTable(key_vectors, mesh, candidate_chunk) if on_device else None
        out["query_sims"] = "device" if on_device else "host"
        used = np.zeros(first_key_row.size, bool)
        owner_counts = np.diff(owners.owner_ptr)
        settings = dict(top_k=top_k, keep_retrieval_order=keep_retrieval_order, judge=judge,
                        judge_threshold=judge_threshold, block_size=block_size, out=out)
        _run_phase(1, owners, key_vectors, query_embeddings, index, table,
                   _State(used, used, owner_counts.copy()), first_n=first_n, **settings)
        _run_phase(2, owners, key_vectors, query_embeddings, index, table,
                   _State(used, np.zeros_like(used), owner_counts.copy()),
                   first_n=2 * first_n, **settings)
    report = _report(out, subset=subset, num_rows=n, num_keys=first_key_row.size,
                     num_cands=num_cands, top_k=top_k, pool_mult=pool_mult, pool=pool,
                     keep_retrieval_order=keep_retrieval_order, judge=judge,
                     judge_threshold=judge_threshold)
    return MiningResult(out["clusters"], out["cluster_phases"], report, out["timing"])


def _report(out: dict, *, subset, num_rows, num_keys, num_cands, top_k, pool_mult, pool,
            keep_retrieval_order, judge, judge_threshold) -> dict:
    """The JSON-ready mining report of one subset."""
    clusters, phases = out["clusters"], np.asarray(out["cluster_phases"], np.int64)
    sizes = np.asarray([len(c) for c in clusters], np.int64)
    covered = np.unique(np.concatenate([np.asarray(c) for c in clusters])) if clusters else []
    phase1 = out["phases"][1]
    searched = max(phase1["searched"], 1)
    per_phase = {}
    for p, stats in out["phases"].items():
        per_phase[f"phase{p}"] = {
            "clusters": int(np.sum(phases == p)),
            "rows_in_clusters": int(np.sum(sizes[phases == p])),
            "anchors_searched": stats["searched"],
            "judge_pairs": stats["judge"]["judged"],
            "judge_dropped": stats["judge"]["dropped"],
            "judge_calls": stats["judge"]["calls"],
        }
    return {
        "subset": subset,
        "rows": num_rows,
        "unique_queries": num_keys,
        "candidates": num_cands,
        "top_k": top_k,
        "pool_mult": pool_mult,
        "first_n": top_k * pool_mult,
        "pool": pool,
        "keep_retrieval_order": keep_retrieval_order,
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
        **per_phase,
        "judge": {
            "enabled": judge is not None,
            "threshold": float(judge_threshold) if judge is not None else None,
            "pairs": sum(s["judge"]["judged"] for s in out["phases"].values()),
            "dropped": sum(s["judge"]["dropped"] for s in out["phases"].values()),
        },
        "retrieval": {
            "anchors": phase1["searched"],
            "hit@1": phase1["hits@1"] / searched,
            "hit@5": phase1["hits@5"] / searched,
            "hit@10": phase1["hits@10"] / searched,
        },
    }
