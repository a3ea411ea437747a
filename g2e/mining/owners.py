"""The owner bookkeeping of SaHa mining: keys, candidates, owner maps, the used state and one
anchor's owner walk (docs/method.md §2.3a-b), as flat arrays. See the package docstring for the rules."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from g2e.data import rows as rows_lib


def csr(groups: np.ndarray, members: np.ndarray, num_groups: int):
    """Groups `members` by `groups` (stable): (ptr int64 [G+1], members sorted by group)."""
    order = np.argsort(groups, kind="stable")
    ptr = np.zeros(num_groups + 1, np.int64)
    np.cumsum(np.bincount(groups, minlength=num_groups), out=ptr[1:])
    return ptr, members[order]


def ranges(ptr: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Concatenated indices ptr[g]:ptr[g+1] for each g in `groups`, in that order."""
    starts, ends = ptr[groups], ptr[groups + 1]
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return offsets + np.arange(total)


@dataclasses.dataclass
class Owners:
    """The row/key/candidate bookkeeping of one subset, as flat arrays."""

    row_key: np.ndarray  # [N] query-key id of each row
    row_cand: np.ndarray  # [N] candidate id (unique positive) of each row
    rep_row: np.ndarray  # [K] representative (last) row of each query key
    owner_ptr: np.ndarray  # [C+1] CSR: candidate -> owner keys, by representative row
    owner_key: np.ndarray
    cand_ptr: np.ndarray  # [K+1] CSR: query key -> the candidates it owns
    cand_of_key: np.ndarray
    multi_owner: bool  # some key owns several candidates (owner picks may collide)


def build_owners(query_keys, positive_keys) -> tuple[Owners, np.ndarray, np.ndarray]:
    """Builds Owners; also returns each key's and each candidate's first row."""
    n = len(query_keys)
    if len(positive_keys) != n:
        raise ValueError(
            f"mining: {n} query keys but {len(positive_keys)} positive keys; "
            "pass one of each per row."
        )
    distinct_keys, row_key = rows_lib.index_keys(query_keys)
    distinct_cands, row_cand = rows_lib.index_keys(positive_keys)
    num_keys, num_cands = len(distinct_keys), len(distinct_cands)
    rows = np.arange(n, dtype=np.int64)
    rep_row = np.full(num_keys, -1, np.int64)
    np.maximum.at(rep_row, row_key, rows)  # a key stands for its last row
    first_key_row = np.full(num_keys, n, np.int64)
    np.minimum.at(first_key_row, row_key, rows)
    first_cand_row = np.full(num_cands, n, np.int64)
    np.minimum.at(first_cand_row, row_cand, rows)
    # Unique (candidate, key) pairs, each candidate's owners sorted by representative row.
    pairs = np.unique(row_cand.astype(np.int64) * num_keys + row_key)
    pair_cand, pair_key = pairs // num_keys, pairs % num_keys
    order = np.lexsort((rep_row[pair_key], pair_cand))
    owner_ptr, owner_key = csr(pair_cand[order], pair_key[order], num_cands)
    cand_ptr, cand_of_key = csr(pair_key, pair_cand, num_keys)
    multi = bool(np.any(np.diff(cand_ptr) > 1))
    owners = Owners(
        row_key,
        row_cand,
        rep_row,
        owner_ptr,
        owner_key.astype(np.int64),
        cand_ptr,
        cand_of_key.astype(np.int64),
        multi,
    )
    return owners, first_key_row, first_cand_row


@dataclasses.dataclass
class State:
    """Which keys are used (skipped as anchors) and which may no longer be owners."""

    used: np.ndarray  # [K] bool: key is in a cluster (or was an anchor)
    excluded: np.ndarray  # [K] bool: key may not be an owner (phase 1: `used` itself)
    available: np.ndarray  # [C] int: owners of each candidate that are not excluded

    def copy(self) -> State:
        """A copy to walk ahead on (phase 1's `excluded` stays the same array as `used`)."""
        used = self.used.copy()
        excluded = used if self.excluded is self.used else self.excluded.copy()
        return State(used, excluded, self.available.copy())

    def take(self, owners: Owners, anchor_key: int, kept: np.ndarray, phase: int) -> None:
        """Marks a cluster's anchor and kept owner keys used (docs/method.md §2.3d / §2.4)."""
        newly_excluded = np.append(kept, anchor_key) if phase == 1 else kept
        self.used[anchor_key] = True
        self.used[kept] = True
        self.excluded[newly_excluded] = True
        np.subtract.at(
            self.available, owners.cand_of_key[ranges(owners.cand_ptr, newly_excluded)], 1
        )


def host_similarity(key_vectors: np.ndarray, anchor_key: int) -> Callable:
    """keys -> their query similarity to the anchor, gathered on the host. One dot per row
    (np.vecdot): unlike a BLAS gemv it runs on one thread, not waiting on a busy host, and a
    row's result does not depend on the other rows."""
    anchor_vector = key_vectors[anchor_key]
    return lambda keys: np.vecdot(key_vectors[keys], anchor_vector)


def select_owners(
    cands: np.ndarray,
    anchor_key: int,
    similarity: Callable,
    owners: Owners,
    state: State,
    first_n: int,
) -> tuple[np.ndarray, np.ndarray]:
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
    picked, picked_sims, taken = [], [], {anchor_key}
    for cand in cands.tolist():
        keys = owners.owner_key[owners.owner_ptr[cand] : owners.owner_ptr[cand + 1]]
        keys = keys[~state.excluded[keys]]
        keys = np.asarray([k for k in keys.tolist() if k not in taken], np.int64)
        if keys.size == 0:
            continue
        sims = similarity(keys)
        best = int(np.argmax(sims))
        picked.append(int(keys[best]))
        picked_sims.append(sims[best])
        taken.add(picked[-1])
        if len(picked) == first_n:
            break
    return np.asarray(picked, np.int64), np.asarray(picked_sims, np.float32)
