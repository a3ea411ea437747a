"""Host work in Grain worker processes: decode, resize and tokenise in parallel, in input order.

Two ways to map a picklable function over a random-access sequence of inputs, in input order:

- `Stream` / `stream` (training): a Grain pipeline over one sequence, whose position goes into
  the checkpoint; its worker processes live as long as the stream.
- `Pool` (the embedding runner that evaluation, mining, the judge and the embed command share):
  one set of worker processes for a whole stage, fed call after call (a mine stage embeds one
  cache shard per call); `Pool.map` keeps `workers x buffer` chunks in flight, so preparation
  overlaps the device work, and counts the items computed in workers and in this process.

    for result in pool.map(inputs, encode):   # result: encode(x), or Failed(error)
        ...

- Order: results come in input order whatever the number of workers (Grain's process
  prefetch hands element i to worker i % workers and reads them back round-robin), so outputs
  never depend on `data.workers`.
- Bounded memory: each worker holds at most `buffer` finished elements; nothing else is kept.
- Bad input: a `BadInput` raised in a worker travels back as a value (`Failed`), so the main
  process applies the on_bad_input policy and keeps the counts (a worker's own counters would
  be lost with it).
- Cost: worker processes start with `spawn` (a few seconds): a Stream's once per stream (so
  inputs shorter than `min_items` run in this process), a Pool's once per stage.

Worker processes read absl flags, so they are marked parsed here when no `app.run` did it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import dataclasses
import hashlib
import multiprocessing
import os
import pathlib
import pickle
import signal
import tempfile
import time
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


# ---------------------------------------------------------------------------------------------
# A stage's long-lived pool.

# Per worker process: the functions it was given (by digest), loaded once from their file.
_WORKER_FUNCTIONS: dict[str, Callable[[Any], Any]] = {}


def _start_pool_worker() -> None:
    _die_with_parent(0, 0)


def _apply_chunk(digest: str, function_file: str, chunk: list[Any]) -> list[Any]:
    """Runs in a pool worker: the function (read from its file once per worker) over a chunk."""
    function = _WORKER_FUNCTIONS.get(digest)
    if function is None:
        if len(_WORKER_FUNCTIONS) > 8:  # a stage uses a few functions; drop the stale ones
            _WORKER_FUNCTIONS.clear()
        function = _WORKER_FUNCTIONS[digest] = pickle.loads(
            pathlib.Path(function_file).read_bytes()
        )
    return [function(x) for x in chunk]


@dataclasses.dataclass
class HostCounts:
    """Where a pool's items were computed, how long its consumers waited for them (`wait_s`)
    and how long they ran in all (`run_s`, added by the consumer)."""

    items_in_workers: int = 0
    items_in_main: int = 0
    wait_s: float = 0.0
    run_s: float = 0.0

    def minus(self, before: HostCounts) -> HostCounts:
        return HostCounts(
            *(getattr(self, f.name) - getattr(before, f.name) for f in dataclasses.fields(self))
        )


class Pool:
    """`workers` processes for one stage's host work, started on first use and kept until
    `close()`; `map(inputs, function)` yields function(x) (a BadInput as `Failed`) in order.

    Whatever a call's size, its inputs go to the workers when workers >= 1 (0: this process).
    A function is pickled once per call into a file of the pool's folder; a chunk of inputs
    carries only its digest and path, and each worker loads it once.

    Args:
      workers: worker processes (data.workers resolved; 0 computes in this process).
      chunk: inputs per task.
      buffer: chunks in flight per worker (how far preparation runs ahead of the consumer).
    """

    def __init__(self, workers: int, *, chunk: int = 8, buffer: int = 4):
        self.workers, self.chunk, self.buffer = workers, chunk, buffer
        self.counts = HostCounts()
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._folder: tempfile.TemporaryDirectory | None = None

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._executor is None:
            self._folder = tempfile.TemporaryDirectory(prefix="g2e-pool-")
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_pool_worker,
            )
        return self._executor

    def _function_file(self, function: Callable[[Any], Any]) -> tuple[str, str]:
        payload = pickle.dumps(function)
        digest = hashlib.sha1(payload).hexdigest()
        path = pathlib.Path(self._folder.name, digest)
        if not path.exists():
            path.write_bytes(payload)
        return digest, str(path)

    def map(self, inputs: Sequence[Any], function: Callable[[Any], Any]) -> Iterator[Any]:
        """function(x) for x in inputs, in order (a BadInput it raises comes as Failed)."""
        catching = _Catching(function)
        if self.workers < 1:
            for x in inputs:
                self.counts.items_in_main += 1
                yield catching(x)
            return
        executor = self._start()
        digest, path = self._function_file(catching)
        starts = iter(range(0, len(inputs), self.chunk))
        in_flight: collections.deque = collections.deque()

        def submit() -> None:
            start = next(starts, None)
            if start is not None:
                chunk = [inputs[i] for i in range(start, min(start + self.chunk, len(inputs)))]
                in_flight.append(executor.submit(_apply_chunk, digest, path, chunk))

        for _ in range(self.workers * self.buffer):
            submit()
        while in_flight:
            future = in_flight.popleft()
            submit()
            began = time.perf_counter()
            results = future.result()
            self.counts.wait_s += time.perf_counter() - began
            self.counts.items_in_workers += len(results)
            yield from results

    def close(self) -> None:
        """Stops the workers (a later `map` starts them again)."""
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
            self._executor = None
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None
