"""Host work in Grain worker processes: decode, resize and tokenise in parallel, in input order.

Every host pipeline of g2e (the embedding runner that evaluation, mining, the judge and the
embed command share, and the training batches) maps a picklable function over a random-access
sequence with `stream`:

    for result in stream(inputs, encode, workers=4):      # result: Done(value) or Failed(error)
        ...

- Order: results come in input order whatever the number of workers (Grain's process
  prefetch hands element i to worker i % workers and reads them back round-robin), so outputs
  never depend on `data.workers`.
- Bounded memory: each worker holds at most `buffer` finished elements; nothing else is kept.
- Bad input: a `BadInput` raised in a worker travels back as a value (`Failed`), so the main
  process applies the on_bad_input policy and keeps the counts (a worker's own counters would
  be lost with it).
- Cost: worker processes are started afresh for every stream (Grain uses `spawn`: a few
  seconds), so inputs shorter than `min_items` run in this process.

Worker processes read absl flags, so they are marked parsed here when no `app.run` did it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
from absl import flags

from g2e.data.errors import BadInput

# Below this many inputs per worker the processes' start-up (a few seconds) costs more than
# the parallel work saves.
MIN_ITEMS_PER_WORKER = 256


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # Not Linux.
        return max(1, os.cpu_count() or 1)


def _die_with_parent(worker_index: int, worker_count: int) -> None:
    """Runs in each worker: a SIGKILLed main process (a preemption) takes its workers along
    instead of leaving them holding memory (Linux; elsewhere a no-op)."""
    del worker_index, worker_count
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the call took effect
        os._exit(1)


@dataclasses.dataclass(frozen=True)
class Failed:
    """An input whose function raised BadInput (the error names subset, row and file)."""

    error: BadInput


@dataclasses.dataclass(frozen=True)
class _Catching:
    """function(x), with a BadInput returned as Failed instead of raised (picklable)."""

    function: Callable[[Any], Any]

    def __call__(self, x: Any) -> Any:
        try:
            return self.function(x)
        except BadInput as error:
            return Failed(error)


class Stream:
    """function(x) for x in `inputs`, in order, computed by `workers` processes (see `stream`).

    Iterate it once; `get_state()` is Grain's position (for a checkpoint); `close()` stops the
    workers (also done when the iteration ends).
    """

    def __init__(
        self,
        inputs: Sequence[Any],
        function: Callable[[Any], Any],
        *,
        workers: int,
        buffer: int = 4,
        min_items: int | None = None,
    ):
        if min_items is None:
            min_items = MIN_ITEMS_PER_WORKER * workers
        dataset = grain.MapDataset.source(inputs).map(_Catching(function))
        iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if workers > 0 and len(inputs) >= max(min_items, 1):
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            iterable = iterable.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer),
                worker_init_fn=_die_with_parent,
            )
        self._iterator = iter(iterable)

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self._iterator
        finally:
            self.close()

    def get_state(self) -> dict[str, Any]:
        return self._iterator.get_state()

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def stream(
    inputs: Sequence[Any],
    function: Callable[[Any], Any],
    *,
    workers: int,
    buffer: int = 4,
    min_items: int | None = None,
) -> Iterator[Any]:
    """Yields function(x) for x in `inputs`, in order, computed by `workers` processes.

    Args:
      inputs: a random-access sequence (pickled to the workers; keep elements small: paths,
        texts, row ids, not decoded images).
      function: picklable (module-level functions, bound methods of picklable objects,
        functools.partial of those); a BadInput it raises is yielded as `Failed(error)`.
      workers: worker processes; 0 computes everything in this process.
      buffer: finished elements each worker may hold ahead of the consumer.
      min_items: below this many inputs no process is started (default
        MIN_ITEMS_PER_WORKER x workers).
    """
    return iter(Stream(inputs, function, workers=workers, buffer=buffer, min_items=min_items))
