"""Training inputs: which rows form each step (`ClusterSchedule`), how a row becomes arrays
(`RowCodec`: row -> `Encoded` query and positive -> collated arrays) and the host side that runs
both, ahead of the devices (`StepInputs`).

Batches are made of whole clusters, as a pure function of (seed, step). A cluster is an anchor
row plus its mined rows (SaHa), or a single row when mining is off. The global batch of
N = train.global_batch rows is cut into slots of cluster_size rows; clusters are packed into
slots whole, in a per-epoch shuffled order. A slot that the next cluster does not fit into is topped up with rows drawn from outside the batch
(random in-batch negatives), so shapes stay fixed and no row appears twice in a batch.

Because the rows of step s depend only on (seed, s), the data loader's position is the step
number: a restarted run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from g2e import distributed
from g2e.data import prompts
from g2e.data import workers as workers_lib
from g2e.data.batching import Encoded, pack_rows, segment_bucket
from g2e.data.errors import BadInput, BadInputReport
from g2e.data.images import image_key
from g2e.data.preprocess import Processor, positive_item, query_item


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

    def __init__(
        self,
        clusters: Sequence[Sequence[int]],
        num_rows: int,
        cluster_size: int,
        batch_size: int,
        seed: int,
    ):
        if batch_size % cluster_size:
            raise ValueError(
                f"ClusterSchedule: batch size {batch_size} is not a multiple of "
                f"train.cluster_size={cluster_size}."
            )
        self.clusters = [np.asarray(c[:cluster_size], np.int64) for c in clusters if len(c)]
        if not self.clusters:
            raise ValueError("ClusterSchedule: no clusters (the training data is empty).")
        if num_rows < batch_size:
            raise ValueError(
                f"ClusterSchedule: {num_rows} training rows cannot fill a batch of "
                f"{batch_size}; lower train.global_batch or cluster_size."
            )
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
            out.extend(spare[taken : taken + need])
            taken += need
        return np.asarray(out, np.int64)

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            batches = self._pack_epoch(epoch)
            if not batches:
                raise ValueError(
                    f"ClusterSchedule: {len(self.clusters)} clusters do not fill "
                    f"one batch of {self.batch_size} rows in slots of "
                    f"{self.cluster_size}; use more data or a smaller batch."
                )
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


def positive_id(row: Any) -> np.ndarray:
    """int32 [2]: a 62-bit digest of what the row's positive embeds as (text, image and the
    candidate prompt). Rows whose positives are identical share it, so the loss masks them as
    duplicates instead of scoring them as negatives (two rows of a classification subset with
    the same label). A digest, not a number from a pass over all rows: each worker computes
    its rows' ids, and equal positives on different hosts get equal ids."""
    key = json.dumps(
        [row.pos_text, image_key(row.pos_image), prompts.uses_suffix("candidate", row.subset)]
    )
    digest = np.frombuffer(hashlib.sha1(key.encode()).digest()[:8], np.uint32)
    return (digest & 0x7FFFFFFF).astype(np.int32)


class RowCodec:
    """Training rows -> host batches {'query': batch, 'candidate': batch, 'ids': [n, 2]}.

    The one path of a training row: `encode` (in a Grain worker) turns row id -> its query
    (query prompt: qry_text, qry_image) and positive (candidate prompt: pos_text, pos_image) as
    `Encoded` items, and its positive id; `collate` pads this process's rows to their own
    buckets; `shape` gives a collated batch's shape (the length and patch buckets of both
    sides), which the processes agree on per step (`StepInputs.agree`), and `widen` pads to the
    agreed one; `report` (a g2e.data.errors.BadInputReport) applies data.on_bad_input to rows
    that fail to encode. The train loop needs only these four methods and `report` (the tests'
    toy codec has the same).

    `pack_length` (data.pack_length): the queries and the candidates are packed together, one
    pool of rows of that many tokens (g2e.data.batching.pack_rows; the fewest rows that hold
    them, a multiple of `row_multiple`, this process's devices on the batch axes), embedded in
    one pass; their patches go to vision rows (`Batcher.vision_shape` with `fit`: at most
    `pack_patches` patches a row unless one item needs more; 0: its largest item's bucket).
    The batch is {'pool', 'query_place', 'candidate_place', 'ids'}: each pair's query and
    candidate as (row, segment) of the pool; the shape is [patches, segments, rows, vision
    rows] of the pool.
    """

    def __init__(
        self,
        processor: Processor,
        rows: Sequence[Any],
        *,
        image_root: str | None,
        pack_length: int = 0,
        pack_patches: int = 0,
        row_multiple: int = 1,
    ):
        self.processor, self.rows, self.image_root = processor, rows, image_root
        self.pack_length, self.row_multiple = pack_length, row_multiple
        self.pack_patches = pack_patches

    @property
    def report(self) -> BadInputReport:
        """The BadInputReport that applies data.on_bad_input to rows that fail to encode."""
        return self.processor.report

    def encode(self, row_id: int) -> tuple[Encoded, Encoded, np.ndarray]:
        """One row's (query, positive, positive id); runs in a Grain worker (it must pickle)."""
        row = self.rows[int(row_id)]
        encode = functools.partial(self.processor.encode, image_root=self.image_root, strict=True)
        return encode(query_item(row)), encode(positive_item(row)), positive_id(row)

    def shape(self, batch: Mapping[str, Any]) -> list[int]:
        """The collated `batch`'s shape (see the class docstring)."""
        if self.pack_length:
            pool = batch["pool"]
            return [
                pool["pixel_values"].shape[1],
                pool["last_index"].shape[1],
                pool["input_ids"].shape[0],
                pool["pixel_values"].shape[0],
            ]
        query, candidate = batch["query"], batch["candidate"]
        return [
            query["input_ids"].shape[1],
            query["pixel_values"].shape[1],
            candidate["input_ids"].shape[1],
            candidate["pixel_values"].shape[1],
        ]

    def collate(self, encoded: Sequence[tuple]) -> dict[str, Any]:
        """This process's encoded rows as a host batch of their own buckets."""
        ids = np.stack([e[2] for e in encoded])
        queries, candidates = [e[0] for e in encoded], [e[1] for e in encoded]
        batcher = self.processor.batcher
        if not self.pack_length:
            query, candidate = batcher.collate(queries), batcher.collate(candidates)
            return {"query": query, "candidate": candidate, "ids": ids}
        pool = queries + candidates
        groups = pack_rows(pool, length=self.pack_length)
        patches, vision_rows = batcher.vision_shape(
            pool, self.pack_patches, self.row_multiple, fit=True
        )
        place = np.zeros((len(pool), 2), np.int32)
        for row, group in enumerate(groups):
            for segment, i in enumerate(group):
                place[i] = row, segment
        pool_batch = batcher.pack(
            [[pool[i] for i in group] for group in groups],
            pad_to_batch=-(-len(groups) // self.row_multiple) * self.row_multiple,
            length=self.pack_length,
            num_patches=patches,
            segments=segment_bucket(max(len(group) for group in groups)),
            vision_rows=vision_rows,
        )
        return {
            "pool": pool_batch,
            "query_place": place[: len(encoded)],
            "candidate_place": place[len(encoded) :],
            "ids": ids,
        }

    def widen(self, batch: Mapping[str, Any], shape: Sequence[int]) -> dict[str, Any]:
        """A collated host batch padded to the agreed (larger or equal) `shape`; a packed
        pool's merged_token_index then counts the vision rows of the processes before this
        one (`Batcher.for_process`)."""
        batcher = self.processor.batcher
        if self.pack_length:
            patches, segments, rows, vision_rows = shape
            pool = batcher.widen_packed(
                batch["pool"],
                rows=rows,
                num_patches=patches,
                segments=segments,
                vision_rows=vision_rows,
            )
            return {**batch, "pool": batcher.for_process(pool, jax.process_index())}
        query_length, query_patches, candidate_length, candidate_patches = shape
        return {
            **batch,
            "query": batcher.widen(batch["query"], length=query_length, num_patches=query_patches),
            "candidate": batcher.widen(
                batch["candidate"], length=candidate_length, num_patches=candidate_patches
            ),
        }


class _StepRows(Sequence):
    """Row ids of this process's rows of steps first..last, flattened (Grain's source)."""

    def __init__(self, schedule: ClusterSchedule, rows_here: slice, first: int, last: int):
        self.schedule, self.rows_here, self.first = schedule, rows_here, first
        self.per_step = rows_here.stop - rows_here.start
        self.count = max(last - first, 0) * self.per_step

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise IndexError(index)
        step, position = divmod(index, self.per_step)
        return int(self.schedule.rows(self.first + step)[self.rows_here][position])


# The codec's shape (e.g. length and patch buckets of both sides) is agreed on as a fixed-size
# vector, so that a process without one (it met a bad row) still takes part in the agreement.
MAX_SHAPE_VALUES = 8


@dataclasses.dataclass
class Prepared:
    """One step's rows on this process: global row ids, the collated local rows and their shape,
    or `error` (then `batch` is None) when one of its rows is bad."""

    step: int
    rows: np.ndarray
    batch: Mapping[str, Any] | None
    shape: np.ndarray
    error: str | None


class StepInputs:
    """The host side of training: every step's rows, encoded by Grain worker processes.

    Rows of step s are a pure function of (seed, s) (`ClusterSchedule`), so the input of a run
    that resumes at step s is exactly the input the uninterrupted run had from s on; Grain's
    own position is kept in the checkpoint too (`state`). Each process encodes only its rows
    (`rows_here`); per step the processes agree on a few integers (the codec's `shape`, e.g.
    the length and patch buckets of each side) and pad to them, never to the largest buckets.

    Use: `prepare(step)` collates the step's local rows (while the devices run the previous
    step), then `agree(prepared, stop_requested=...)` widens them to the shape all processes
    agreed on and tells whether any process asked to stop (SIGINT, or SIGTERM where JAX's
    preemption notifier does not handle it), so all stop after the same step.
    """

    def __init__(
        self,
        schedule: ClusterSchedule,
        codec: RowCodec,
        *,
        rows_here: slice,
        first_step: int,
        last_step: int,
        workers: int,
    ):
        self.schedule, self.codec = schedule, codec
        self.rows = _StepRows(schedule, rows_here, first_step, last_step)
        self.next_step = first_step
        self._stream = workers_lib.Stream(self.rows, codec.encode, workers=workers, min_items=0)
        self._results = iter(self._stream)

    def prepare(self, step: int) -> Prepared:
        """This process's rows of `step` (the next one) encoded and collated.

        A row that fails to encode (an image that does not decode) is, under
        data.on_bad_input='skip', counted in the codec's processor report and replaced by a spare
        row from outside the step's batch (`_spare`); under 'error' it does not raise here but
        travels in `Prepared.error`, so that `agree` stops every process."""
        if step != self.next_step:
            raise ValueError(f"StepInputs: asked for step {step}, the next is {self.next_step}")
        encoded = list(itertools.islice(self._results, self.rows.per_step))
        rows = self.schedule.rows(step).copy()
        self.next_step += 1
        local = np.arange(len(rows))[self.rows.rows_here]
        for index, (position, value) in enumerate(zip(local, encoded)):
            if not isinstance(value, workers_lib.Failed):
                continue
            report = self.codec.report
            if report.policy != "skip":
                error = (
                    f"training step {step}, row {rows[position]}: {value.error}; fix or remove "
                    "the row, or set data.on_bad_input=skip to train without it"
                )
                return Prepared(step, rows, None, np.zeros(0, np.int32), error)
            report.handle(value.error)
            rows[position], encoded[index] = self._spare(step, position, rows)
        batch = self.codec.collate(encoded)
        shape = np.asarray(self.codec.shape(batch), np.int32)
        if shape.size > MAX_SHAPE_VALUES:
            raise ValueError(
                f"StepInputs: the codec's shape has {shape.size} values, at most "
                f"{MAX_SHAPE_VALUES} are agreed on"
            )
        return Prepared(step, rows, batch, shape, None)

    def _spare(self, step: int, position: int, rows: np.ndarray) -> tuple[int, Any]:
        """A row from outside the batch `rows` and its encoding, in place of the bad row at
        `position` of step `step`: drawn from a stream of (seed, step, position), so a resumed
        run takes the same one; rows that fail too are counted and passed over."""
        rng = np.random.default_rng([self.schedule.seed, step, position])
        for row in rng.permutation(self.schedule.num_rows):
            if row in rows:
                continue
            try:
                return int(row), self.codec.encode(int(row))
            except BadInput as error:
                self.codec.report.handle(error)
        raise ValueError(f"training step {step}: no row outside the batch encodes")

    def agree(self, prepared: Prepared, *, stop_requested: bool) -> tuple[Mapping[str, Any], bool]:
        """The step's local batch widened to the shape all processes need, and whether any
        process asked to stop; one small agreement (distributed.every_process, through the
        coordination service, not the devices), the same decision on every process.

        Raises:
          ValueError: a process met a bad row in this step; every process raises the error of
            the first such process (so none is left waiting in the next step's collectives).
        """
        vector = np.zeros(2 + MAX_SHAPE_VALUES, np.int32)
        vector[0], vector[1] = prepared.error is not None, stop_requested
        vector[2 : 2 + prepared.shape.size] = prepared.shape
        table = distributed.every_process(vector)  # [processes, 2 + MAX_SHAPE_VALUES]
        failed = np.flatnonzero(table[:, 0])
        if failed.size:
            source = int(failed[0])
            raise ValueError(
                distributed.text_from_process(
                    source, prepared.error, key=f"train-bad-input-step-{prepared.step}"
                )
            )
        stop = bool(table[:, 1].any())
        agreed = table[:, 2 : 2 + prepared.shape.size].max(axis=0)
        # Always widened (maybe to its own shape): a packed pool's index also moves past the
        # processes before this one there.
        return self.codec.widen(prepared.batch, [int(v) for v in agreed]), stop

    def state(self) -> dict[str, Any]:
        """The input position for a checkpoint: the next step and Grain's iterator state."""
        return {"next_step": self.next_step, "grain": self._stream.get_state()}

    def close(self) -> None:
        self._stream.close()
