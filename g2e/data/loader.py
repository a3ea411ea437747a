"""A deterministic, checkpointable, host-sharded iterator over a random-access source.

The source is anything with `__len__` and `__getitem__`: a tfds_builders.RowSource, a list
of rows or of clusters, or `range(n)` to iterate indices. Each epoch visits the source in
the order of a permutation drawn from (seed, epoch) (or in order, with shuffle=False); host
`process_index` of `process_count` takes positions process_index, process_index +
process_count, ... of that order, so the hosts together visit every element once.

The position is a small JSON-serialisable dict (`get_state()` / `set_state()`), saved in the
checkpoint next to the train state. It counts elements taken by all hosts together, so while
the hosts move in lockstep (drop_remainder=True gives every host the same number of elements
per epoch) every host has the same state, and a run may even resume on a different number of
hosts: the remaining elements of the epoch are then dealt out among the new hosts.
"""

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

STATE_VERSION = 1


class Loader(Iterator):
    """Iterates `source` deterministically for `seed`, sharded over hosts, resumable.

    Args:
      source: random-access elements (`len(source)`, `source[i]`).
      seed: the shuffling seed; the order of every epoch is a function of (seed, epoch).
      shuffle: False visits the source in order (evaluation).
      num_epochs: epochs to run; None repeats forever (training counts steps instead).
      process_index, process_count: this host and the number of hosts; default
        jax.process_index() / jax.process_count(). Tests pass them to simulate hosts.
      drop_remainder: drop the last `len % process_count` elements of each epoch's order so
        that every host takes the same number (training: hosts stay in lockstep). False keeps
        every element (evaluation); hosts then differ by at most one element.
    """

    def __init__(
        self,
        source: Sequence,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = 1,
        process_index: int | None = None,
        process_count: int | None = None,
        drop_remainder: bool = False,
    ):
        if process_index is None or process_count is None:
            import jax  # the data modules stay importable without initialising a backend

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
        if num_epochs is not None and num_epochs < 0:
            raise ValueError(f"num_epochs={num_epochs}; use a count >= 0 or None (forever).")
        self.source = source
        self.seed, self.shuffle, self.num_epochs = int(seed), bool(shuffle), num_epochs
        self.process_index, self.process_count = process_index, process_count
        self.drop_remainder = drop_remainder
        self._epoch = 0
        self._offset = 0  # position in the epoch's order where the current dealing started
        self._taken = 0  # elements this host took since `_offset`
        self._order_epoch, self._order = -1, np.arange(0)

    def __len__(self) -> int:
        """Elements this host takes per epoch from the start of an epoch."""
        return max(0, -(-(self._end(0) - self.process_index) // self.process_count))

    def _end(self, offset: int) -> int:
        """End (exclusive) of the usable part of an epoch's order when dealing from `offset`."""
        n = len(self.source)
        if not self.drop_remainder:
            return n
        return offset + (max(0, n - offset) // self.process_count) * self.process_count

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self._epoch:
            n = len(self.source)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self._epoch])
                self._order = rng.permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = self._epoch
        return self._order

    def __next__(self) -> Any:
        while self.num_epochs is None or self._epoch < self.num_epochs:
            position = self._offset + self._taken * self.process_count + self.process_index
            if position < self._end(self._offset):
                self._taken += 1
                return self.source[int(self._epoch_order()[position])]
            if self.num_epochs is None and self._end(0) <= self.process_index:
                raise ValueError(
                    f"The source has {len(self.source)} elements, too few for "
                    f"{self.process_count} hosts (drop_remainder={self.drop_remainder})."
                )
            self._epoch, self._offset, self._taken = self._epoch + 1, 0, 0
        raise StopIteration

    def get_state(self) -> dict:
        """Returns the position as a JSON-serialisable dict (same on all hosts in lockstep)."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_records": len(self.source),
            "epoch": self._epoch,
            "position": self._offset + self._taken * self.process_count,
        }

    def set_state(self, state: dict) -> None:
        """Restores a position saved by get_state (on any number of hosts).

        Raises:
          ValueError: when the state belongs to another seed, order or source size.
        """
        expected = {
            "version": STATE_VERSION,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_records": len(self.source),
        }
        wrong = {k: state.get(k) for k, v in expected.items() if state.get(k) != v}
        if wrong:
            raise ValueError(
                f"Loader state {wrong} does not match this loader {expected}: the "
                "checkpoint was saved with another seed or data; restore with the "
                "same data and seed, or start a fresh workdir."
            )
        self._epoch, self._offset, self._taken = int(state["epoch"]), int(state["position"]), 0
