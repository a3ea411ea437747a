"""The greedy pass of SaHa mining over one subset's rows (docs/method.md §2.3 / §2.4), with the judge.

Rows are searched in blocks (the next block while this one is walked) and walked in order;
see the package docstring for the construction. Without a judge an anchor keeps the first
`top_k` of its ordered owners. With one, its owners are judged in rounds of as many as are
still needed until `top_k` pass, asked one of two ways:

  * sequential (`JudgeFn`, the reference): one call per round of one anchor, in walk order.
  * speculative, batched (`PairJudge`): for a block, the walk is run ahead against the
    answers it has (an in-memory memo keyed by (anchor key, owner's positive): what is
    judged), guessing every missing one as passing (as dropped once most answers so far
    were). That names the pairs the rounds will need, across all anchors of the block: the
    first pass asks every anchor's first round at once. They are judged in one batched
    request, and the walk runs again from the first anchor whose outcome rested on a guess;
    a judged "yes" (a dropped owner) changes what later anchors see, so the next request
    holds the later rounds of every anchor that dropped some, and so on. Anchors are
    committed only once every pair they consulted is answered, so the clusters are exactly
    those of the sequential judge given the same P(yes); speculative pairs that end up
    unconsulted are judged but change nothing. A request's last device call is filled up
    (padding rows cost the device as much as real ones) with the next block's first rounds,
    walked on from the guess, then with the owners that waiting anchors take next if one
    of theirs is dropped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from g2e.mining.owners import Owners, State, host_similarity, select_owners
from g2e.mining.search import CandidateIndex, SimilarityTable, padded_block

# judge(anchor_row, owner_rows) -> P(yes) per owner row, float array [len(owner_rows)].
JudgeFn = Callable[[int, np.ndarray], np.ndarray]

# The status of a judged pair (PairAnswers.status): judged as is; judged with its images at a
# lower resolution (over the judge's max length at full size); unjudged and kept (over the
# max length even at the lowest resolution, or unusable under on_bad_input=skip).
JUDGED, DOWNSCALED, UNJUDGED = 0, 1, 2


@dataclasses.dataclass
class PairAnswers:
    """What a PairJudge returns for n pairs.

    p_yes: float [n], finite; an UNJUDGED pair's is 0.0, so it is kept.
    status: int [n], JUDGED / DOWNSCALED / UNJUDGED.
    judged: how many of the n the model judged now (the others came from a stored answer).
    device_calls: device calls of the judge program this took.
    """

    p_yes: np.ndarray
    status: np.ndarray
    judged: int
    device_calls: int


class PairJudge(Protocol):
    """The batched judge: pair_judge(anchor_rows, owner_rows) -> PairAnswers, P(yes) that
    owner_rows[i]'s positive answers anchor_rows[i]'s query, for many pairs at once. Each
    pair is asked at most once. `pairs_per_call` (pairs in one device call; 1 if absent):
    the walk fills a request up to a multiple of it with pairs it will likely need next."""

    pairs_per_call: int

    def __call__(self, anchor_rows: np.ndarray, owner_rows: np.ndarray) -> PairAnswers: ...


def new_phase_stats() -> dict:
    """The counters of one phase (see greedy's report)."""
    return {
        "searched": 0,
        "hits@1": 0,
        "hits@5": 0,
        "hits@10": 0,
        "judge": {
            "consulted": 0,
            "dropped": 0,
            "downscaled": 0,
            "unjudged": 0,
            "judged": 0,
            "cached": 0,
            "calls": 0,
        },
    }


def next_rows(row_key: np.ndarray, used: np.ndarray, start: int, count: int) -> np.ndarray:
    """The next `count` rows from `start` on whose query key is not used."""
    found, total, window = [], 0, 4 * count
    while start < row_key.size and total < count:
        rows = start + np.flatnonzero(~used[row_key[start : start + window]])
        found.append(rows[: count - total])
        total += found[-1].size
        start += window
    return np.concatenate(found) if found else np.zeros(0, np.int64)


@dataclasses.dataclass
class Walk:
    """What the passes over one subset share: its owners, the device search and the judge.

    `out` collects clusters, phases, stats and timing (see greedy.mine_clusters); `memo` keeps
    the speculative judge's answers, by anchor key * C + the owner's candidate (its
    representative row's positive), over both phases.
    """

    owners: Owners
    key_vectors: np.ndarray
    query_embeddings: np.ndarray
    index: CandidateIndex
    table: SimilarityTable | None
    top_k: int
    keep_retrieval_order: bool
    threshold: float
    block_size: int
    out: dict
    judge: JudgeFn | None = None
    pair_judge: PairJudge | None = None
    memo: dict = dataclasses.field(default_factory=dict)
    answered: list = dataclasses.field(default_factory=lambda: [0, 0])  # [dropped, all]

    def __post_init__(self):
        # The positive of each owner key's representative row: what a pair with it judges.
        self._owner_cand = self.owners.row_cand[self.owners.rep_row]
        self._num_cands = self.owners.owner_ptr.size - 1

    def run_phase(self, phase: int, state: State, first_n: int) -> None:
        """One greedy pass over the rows (docs/method.md §2.3 / §2.4)."""
        timing, row_key = self.out["timing"], self.owners.row_key

        def dispatch(rows):
            timing["blocks"] += 1
            block = padded_block(self.query_embeddings[rows], self.block_size)
            return (self.index.dispatch(block), self.table.dispatch(block) if self.table else None)

        walk_block = self._walk_block_speculative if self.pair_judge else self._walk_block
        # Retrieval does not depend on the used state, so blocks of upcoming rows are searched
        # at once, the next block while this one is walked; rows that become used meanwhile
        # are skipped at their turn. Every row unused at its turn is in some block, in order.
        rows = next_rows(row_key, state.used, 0, self.block_size)
        pending = dispatch(rows) if rows.size else None
        while rows.size:
            tick = time.perf_counter()
            _, found = self.index.fetch(pending[0])
            block_sims = self.table.fetch(pending[1]) if self.table else None
            upcoming = next_rows(row_key, state.used, int(rows[-1]) + 1, self.block_size)
            if upcoming.size:
                pending = dispatch(upcoming)
            tock = time.perf_counter()
            timing["search_s"] += tock - tick
            judge_before = timing["judge_s"]

            def peek(upcoming=upcoming, pending=pending):
                """The next block (rows, their candidates, similarities), for a walk ahead."""
                if not upcoming.size:
                    return None
                block_sims = self.table.fetch(pending[1]) if self.table else None
                return upcoming, self.index.fetch(pending[0])[1].astype(np.int64), block_sims

            walk_block(phase, rows, found.astype(np.int64), block_sims, state, first_n, peek)
            timing["bookkeeping_s"] += (
                time.perf_counter() - tock - (timing["judge_s"] - judge_before)
            )
            rows = upcoming

    # ---- one anchor ----------------------------------------------------------------------

    def _ordered_owners(
        self, j: int, anchor_row: int, cands: np.ndarray, block_sims, state: State, first_n: int
    ) -> tuple[int, np.ndarray]:
        """(rank of the anchor's own positive among its candidates, its owner keys in the
        order they are taken: retrieval order, or least anchor-like first)."""
        owners = self.owners
        anchor_key = int(owners.row_key[anchor_row])
        is_own = cands == owners.row_cand[anchor_row]
        rank = int(is_own.argmax()) if is_own.any() else cands.size
        if block_sims is None:
            similarity = host_similarity(self.key_vectors, anchor_key)
        else:
            similarity = block_sims[j].__getitem__
        picked, sims = select_owners(cands[~is_own], anchor_key, similarity, owners, state, first_n)
        if picked.size and not self.keep_retrieval_order:
            # Least anchor-like first; ties to the lower representative row.
            picked = picked[np.lexsort((owners.rep_row[picked], sims))]
        return rank, picked

    @staticmethod
    def _count_search(stats: dict, rank: int) -> None:
        stats["searched"] += 1
        for k in (1, 5, 10):
            stats[f"hits@{k}"] += rank < k

    def _add_cluster(self, phase: int, anchor_row: int, kept: np.ndarray, state: State) -> None:
        self.out["clusters"].append([anchor_row] + self.owners.rep_row[kept].tolist())
        self.out["cluster_phases"].append(phase)
        state.take(self.owners, int(self.owners.row_key[anchor_row]), kept, phase)

    # ---- the sequential judge (and none) -------------------------------------------------

    def _walk_block(self, phase, rows, found, block_sims, state, first_n, peek) -> None:
        stats = self.out["phases"][phase]
        for j, anchor_row in enumerate(rows.tolist()):
            if state.used[self.owners.row_key[anchor_row]]:
                continue
            rank, ordered = self._ordered_owners(
                j, anchor_row, found[j], block_sims, state, first_n
            )
            self._count_search(stats, rank)
            if ordered.size == 0:
                continue
            if self.judge is None:
                kept = ordered[: self.top_k]
            else:
                kept = self._judge_rounds(anchor_row, ordered, stats["judge"])
            if kept.size:
                self._add_cluster(phase, anchor_row, kept, state)

    def _judge_rounds(self, anchor_row: int, ordered: np.ndarray, counts: dict) -> np.ndarray:
        """Judges owners in order, as many per round as are still needed, until top_k pass."""
        kept: list[int] = []
        start = 0
        while len(kept) < self.top_k and start < ordered.size:
            batch = ordered[start : start + self.top_k - len(kept)]
            start += batch.size
            tick = time.perf_counter()
            p_yes = np.asarray(self.judge(int(anchor_row), self.owners.rep_row[batch]), np.float64)
            self.out["timing"]["judge_s"] += time.perf_counter() - tick
            _check_answers(p_yes, batch.size, int(anchor_row))
            passed = p_yes <= self.threshold
            kept.extend(batch[passed].tolist())
            for key in ("consulted", "judged"):
                counts[key] += batch.size
            counts["dropped"] += int(batch.size - passed.sum())
            counts["calls"] += 1
        return np.asarray(kept, np.int64)

    # ---- the speculative, batched judge --------------------------------------------------

    def _walk_block_speculative(self, phase, rows, found, block_sims, state, first_n, peek) -> None:
        """The block's walk, run ahead until every pair it consults is answered (see the
        module docstring); anchors before the first guess are committed on each pass."""
        stats = self.out["phases"][phase]
        row_key = self.owners.row_key
        start: int | None = 0
        while start is not None:
            requests: dict[int, tuple[int, int]] = {}
            ahead: list[list[tuple[int, tuple[int, int]]]] = []
            walk_state, resume = state, None
            for j in range(start, rows.size):
                anchor_row = int(rows[j])
                anchor_key = int(row_key[anchor_row])
                if walk_state.used[anchor_key]:
                    continue
                rank, ordered = self._ordered_owners(
                    j, anchor_row, found[j], block_sims, walk_state, first_n
                )
                kept, missing, consulted, end = self._rounds_from_memo(anchor_key, ordered)
                if missing and resume is None:
                    resume, walk_state = j, state.copy()
                for owner in missing:
                    requests.setdefault(self._code(anchor_key, owner), (anchor_row, owner))
                if missing:
                    ahead.append(
                        [
                            (self._code(anchor_key, owner), (anchor_row, owner))
                            for owner in ordered[end:].tolist()
                        ]
                    )
                if resume is None:
                    self._count_search(stats, rank)
                    self._count_consulted(stats["judge"], consulted)
                    if kept.size:
                        self._add_cluster(phase, anchor_row, kept, state)
                elif kept.size:
                    walk_state.take(self.owners, anchor_key, kept, phase)
            if requests:
                room = -len(requests) % int(getattr(self.pair_judge, "pairs_per_call", 1))
                room = self._fill_from_next_block(phase, requests, room, walk_state, peek, first_n)
                self._fill(requests, room, ahead)
                self._ask(requests, stats["judge"])
            start = resume

    def _fill_from_next_block(self, phase, requests, room, walk_state, peek, first_n) -> int:
        """Fills the request's last device call (whose padding rows cost the device as much
        as real ones) with the next block's first rounds, walked on from this pass's guess;
        returns the room left."""
        view = peek() if room else None
        if view is None:
            return room
        rows, found, block_sims = view
        for j, anchor_row in enumerate(rows.tolist()):
            anchor_key = int(self.owners.row_key[anchor_row])
            if room == 0:
                break
            if walk_state.used[anchor_key]:
                continue
            _, ordered = self._ordered_owners(
                j, anchor_row, found[j], block_sims, walk_state, first_n
            )
            kept, missing, _, _ = self._rounds_from_memo(anchor_key, ordered)
            for owner in missing[:room]:
                if requests.setdefault(self._code(anchor_key, owner), (anchor_row, owner)) == (
                    anchor_row,
                    owner,
                ):
                    room -= 1
            if kept.size:
                walk_state.take(self.owners, anchor_key, kept, phase)
        return room

    def _fill(
        self, requests: dict, room: int, ahead: list[list[tuple[int, tuple[int, int]]]]
    ) -> None:
        """Fills what room is left with the owners that anchors waiting on an answer take
        next if one of theirs is dropped: one per anchor in walk order, round after round."""
        for depth in range(max(map(len, ahead), default=0)):
            for owners_ahead in ahead:
                if room == 0:
                    return
                if depth < len(owners_ahead):
                    code, pair = owners_ahead[depth]
                    if code not in self.memo and code not in requests:
                        requests[code] = pair
                        room -= 1

    def _code(self, anchor_key: int, owner_key: int) -> int:
        """The pair's memo key: (anchor key, the owner's positive) names what is judged, so
        owners whose representative rows share a positive share the answer."""
        return anchor_key * self._num_cands + int(self._owner_cand[owner_key])

    def _rounds_from_memo(self, anchor_key: int, ordered: np.ndarray):
        """The judge rounds of one anchor against the memo: (kept owner keys, owner keys not
        answered yet, (P(yes), status) of those answered, the position in `ordered` where
        the rounds stopped). A missing answer is guessed as the majority of the answers so
        far: passing, unless most pairs were dropped (then the anchor's later rounds are
        asked at once)."""
        kept: list[int] = []
        missing: list[int] = []
        consulted: list[tuple[float, int]] = []
        guess_passes = 2 * self.answered[0] <= self.answered[1]
        start = 0
        while len(kept) < self.top_k and start < ordered.size:
            batch = ordered[start : start + self.top_k - len(kept)].tolist()
            start += len(batch)
            for owner in batch:
                answer = self.memo.get(self._code(anchor_key, owner))
                if answer is None:
                    missing.append(owner)
                    if guess_passes:
                        kept.append(owner)
                else:
                    consulted.append(answer)
                    if answer[0] <= self.threshold:
                        kept.append(owner)
        return np.asarray(kept, np.int64), missing, consulted, start

    def _count_consulted(self, counts: dict, consulted: list[tuple[float, int]]) -> None:
        for p_yes, status in consulted:
            counts["consulted"] += 1
            counts["dropped"] += p_yes > self.threshold
            counts["downscaled"] += status == DOWNSCALED
            counts["unjudged"] += status == UNJUDGED

    def _ask(self, requests: dict[int, tuple[int, int]], counts: dict) -> None:
        """Judges the requested pairs in one batched call and keeps the answers."""
        anchor_rows = np.asarray([a for a, _ in requests.values()], np.int64)
        owner_keys = np.asarray([o for _, o in requests.values()], np.int64)
        tick = time.perf_counter()
        answers = self.pair_judge(anchor_rows, self.owners.rep_row[owner_keys])
        self.out["timing"]["judge_s"] += time.perf_counter() - tick
        p_yes = np.asarray(answers.p_yes, np.float64)
        status = np.asarray(answers.status, np.int64)
        _check_answers(p_yes, anchor_rows.size, int(anchor_rows[0]))
        if status.shape != p_yes.shape:
            raise ValueError(f"mining judge: {status.shape} statuses for {p_yes.size} pairs.")
        counts["judged"] += int(answers.judged)
        counts["cached"] += anchor_rows.size - int(answers.judged)
        counts["calls"] += int(answers.device_calls)
        self.memo.update(zip(requests, zip(p_yes.tolist(), status.tolist())))
        self.answered[0] += int(np.sum(p_yes > self.threshold))
        self.answered[1] += p_yes.size


def _check_answers(p_yes: np.ndarray, count: int, anchor_row: int) -> None:
    if p_yes.shape != (count,) or not np.all(np.isfinite(p_yes)):
        raise ValueError(
            f"mining judge: for anchor row {anchor_row} and {count} owner rows it returned "
            f"shape {p_yes.shape} (finite: {bool(np.all(np.isfinite(p_yes)))}); it must "
            "return one finite P(yes) per owner row."
        )
