"""Training batches of whole clusters, as a pure function of (seed, step).

A cluster is an anchor row plus its mined rows (SaHa), or a single row when mining is off. The
global batch of N = train.global_batch rows is cut into slots of
cluster_size rows; clusters are packed into slots whole, in a per-epoch shuffled order. A slot
that the next cluster does not fit into is topped up with rows drawn from outside the batch
(random in-batch negatives), so shapes stay fixed and no row appears twice in a batch.

Because the rows of step s depend only on (seed, s), the data loader's position is the step
number: a restarted run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


class ClusterSchedule:
    """Maps a training step to the row ids of its global batch.

    Args:
      clusters: row-id lists, anchor first (the mining stage's output); single-row lists for
        training on plain rows.
      num_rows: total number of rows (ids are in [0, num_rows)).
      cluster_size: rows per slot; longer clusters are cut to their first cluster_size rows.
      batch_size: global rows per step (a multiple of cluster_size).
      seed: shuffling seed.
    """

    def __init__(self, clusters: Sequence[Sequence[int]], num_rows: int, cluster_size: int,
                 batch_size: int, seed: int):
        if batch_size % cluster_size:
            raise ValueError(f"ClusterSchedule: batch size {batch_size} is not a multiple of "
                             f"train.cluster_size={cluster_size}.")
        self.clusters = [np.asarray(c[:cluster_size], np.int64) for c in clusters if len(c)]
        if not self.clusters:
            raise ValueError("ClusterSchedule: no clusters (the training data is empty).")
        if num_rows < batch_size:
            raise ValueError(f"ClusterSchedule: {num_rows} training rows cannot fill a batch of "
                             f"{batch_size}; lower train.global_batch or cluster_size.")
        self.num_rows = num_rows
        self.cluster_size = cluster_size
        self.batch_size = batch_size
        self.seed = seed
        self._epoch_lengths: list[int] = []
        self._cached_epoch: tuple[int, list[np.ndarray]] | None = None

    def _pack_epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.clusters))
        slots_per_batch = self.batch_size // self.cluster_size
        batches, slots, slot = [], [], []
        for index in order:
            cluster = self.clusters[index]
            if len(slot) + len(cluster) > self.cluster_size:
                slots.append(slot)
                slot = []
                if len(slots) == slots_per_batch:
                    batches.append(self._fill(slots, rng))
                    slots = []
            slot = slot + list(cluster)
        slots.append(slot)
        if len(slots) == slots_per_batch:
            batches.append(self._fill(slots, rng))
        # The last, incomplete batch of an epoch is dropped (its clusters come back reshuffled).
        return batches

    def _fill(self, slots: list[list[int]], rng: np.random.Generator) -> np.ndarray:
        """Tops up short slots with rows not in the batch; returns [batch_size] ids."""
        used = np.zeros(self.num_rows, bool)
        for slot in slots:
            used[slot] = True
        missing = sum(self.cluster_size - len(s) for s in slots)
        spare = rng.choice(np.flatnonzero(~used), size=missing, replace=False) if missing else []
        out, taken = [], 0
        for slot in slots:
            need = self.cluster_size - len(slot)
            out.extend(slot)
            out.extend(spare[taken:taken + need])
            taken += need
        return np.asarray(out, np.int64)

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            batches = self._pack_epoch(epoch)
            if not batches:
                raise ValueError(f"ClusterSchedule: {len(self.clusters)} clusters do not fill "
                                 f"one batch of {self.batch_size} rows in slots of "
                                 f"{self.cluster_size}; use more data or a smaller batch.")
            self._cached_epoch = (epoch, batches)
        return self._cached_epoch[1]

    def rows(self, step: int) -> np.ndarray:
        """Row ids [batch_size] of the global batch of `step` (0-based)."""
        epoch, first = 0, 0
        while True:
            if epoch == len(self._epoch_lengths):
                self._epoch_lengths.append(len(self._epoch(epoch)))
            length = self._epoch_lengths[epoch]
            if step < first + length:
                return self._epoch(epoch)[step - first]
            first += length
            epoch += 1

    def position(self, step: int) -> dict[str, int]:
        """The loader position of `step`, for the checkpoint (informational: step suffices)."""
        self.rows(step)
        epoch, first = 0, 0
        while step >= first + self._epoch_lengths[epoch]:
            first += self._epoch_lengths[epoch]
            epoch += 1
        return {"step": step, "epoch": epoch, "batch_in_epoch": step - first, "seed": self.seed}


class Prefetcher:
    """Builds the host batches of upcoming steps in a background thread (tokenising, images).

    `make(step)` must be a pure function of the step; `get(step)` returns its result and queues
    the next `depth` steps.
    """

    def __init__(self, make: Callable[[int], Any], last_step: int, depth: int = 2):
        self._make = make
        self._last = last_step
        self._depth = depth
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._futures: dict[int, concurrent.futures.Future] = {}

    def get(self, step: int) -> Any:
        for s in range(step, min(step + self._depth + 1, self._last)):
            if s not in self._futures:
                self._futures[s] = self._pool.submit(self._make, s)
        future = self._futures.pop(step, None)
        result = future.result() if future is not None else self._make(step)
        for s in [s for s in self._futures if s < step]:
            self._futures.pop(s).cancel()
        return result

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)
