"""Embedding: the jitted step and the `Embedder` that feeds it fixed-shape batches (the embed
command, g2e.embed_stage, runs it over a JSONL file).

An embedding is the last-layer hidden state of the last non-pad token (the `\\n` after
`assistant`), L2-normalised (docs/method.md §1). Items are encoded on the host by a `Processor`, grouped
by (length, patch) bucket so a run compiles a bounded number of programs, padded to a fixed
batch size, sharded over the mesh's batch axes and embedded by one jitted function of
`(graphdef, state, batch)`. Results come back in input order.

Multi-host: each process encodes and embeds its `host_slice` of the items; the processes agree
on the number of steps and the (length, patches) shape of each step, feed their rows into one
global batch, and gather the results in input order.

Evaluation and mining keep what they embed in `g2e.embedding_cache.EmbeddingCache`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from g2e import configuration, distributed, encode_inputs
from g2e.data import workers as workers_lib
from g2e.data.batching import Encoded, fine_bucket, pack_rows, segment_bucket
from g2e.data.preprocess import EmbedItem, Processor
from g2e.models import sharding
from g2e.models.qwen2_vl import Qwen2VL
from g2e.pipeline import Pipeline

__all__ = ["BatchRunner", "EmbedItem", "Embedder", "embed_step", "unit_rows"]


def embed_step(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
    """L2-normalised float32 embeddings [B, D] of one batch (pure; jit with graphdef static)."""
    model = nnx.merge(graphdef, state)
    return model.embed(batch)


def rows_per_step(per_device: int, mesh: jax.sharding.Mesh | None, rules: sharding.Rules | None):
    """This process's rows in one step for `per_device` rows on each of its batch devices
    (eval.batch_size and mine.batch_size are per device; BatchRunner takes rows per process)."""
    return int(per_device) * sharding.batch_devices(mesh, rules, per_process=True)


_END = object()  # the end of an encoding stream


def unit_rows(embeddings: Any) -> np.ndarray:
    """float32 [N, D] of `embeddings` ([D] or [N, D]), each row L2-normalised (zero stays zero)."""
    rows = np.atleast_2d(np.asarray(embeddings, np.float32))
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


class BatchRunner:
    """Runs a jitted `step(graphdef, state, batch) -> [B, ...]` over host-encoded inputs.

    A stream, not a load: inputs are encoded by the runner's worker pool (one per runner, so
    one per stage: `g2e.data.workers.Pool`, in input order, whatever a call's size), taken in
    windows of `window` batches (packed: inputs whose tokens fill `window` batches of rows),
    grouped inside a window by (length, patch) bucket, padded to a fixed batch size, sharded
    over the mesh's batch axes and run; each batch's result is fetched while the next one runs.
    At most one window of prepared inputs is held (plus the workers' small buffers), whatever
    the number of inputs. Outputs come back in input order (rows of skipped inputs are NaN).

    Multi-host: each process runs its `host_slice` of the inputs; per window the processes
    agree on whether any of them has inputs left, on the number of steps and on each step's
    shape, so all of them run the same programs in the same order.

    Args:
      model: the (possibly adapter-carrying) Qwen2VL, its parameters already placed/sharded.
      processor: the host-side Processor (prompt options, image policy, buckets); its report
        applies the on_bad_input policy to what the workers could not encode.
      step: the pure per-batch function, jitted here with graphdef static.
      mesh: a device mesh (None: default device). Batches are sharded over the mesh axes of
        the 'batch' rule.
      rules: the logical-axis rule table (config.sharding_rules; default
        sharding.DEFAULT_RULES).
      batch_size: rows per step on each process (`rows_per_step` of a per-device size);
        rounded up to a multiple of this process's devices on the batch axes.
      workers: encoding processes (data.workers); 0 encodes in this process.
      window: batches per window (the bucketing horizon and the memory bound).
      pool: a worker pool shared with another runner of the stage (then `workers` is unused).
      pack_length: 0, or pack each window's encodings into rows of this many tokens
        (data.pack_length; `g2e.data.batching.pack_rows`): a step is `batch_size` such rows,
        and `step` must give one output per segment ([B, S, ...], as `embed_step` does).
      pack_patches: patches per vision row of a packed step (data.pack_patches), or the patch
        bucket of its largest input where that is more (0: always that bucket;
        `Batcher.vision_shape`).

    `host_snapshot()` before and `host_report(snapshot)` after a subset give what its report
    records of the host side; `close()` stops the pool's workers.
    """

    def __init__(
        self,
        model: Qwen2VL,
        processor: Processor,
        step,
        *,
        mesh: jax.sharding.Mesh | None,
        rules: sharding.Rules | None = None,
        batch_size: int = 16,
        progress: bool = True,
        workers: int = 0,
        window: int = 8,
        pool: workers_lib.Pool | None = None,
        pack_length: int = 0,
        pack_patches: int = 0,
    ):
        self.processor = processor
        self.mesh = mesh
        self.rules = sharding.rules_or_default(rules)
        self.progress = progress
        self.workers = workers
        self.window = window
        self.pack_length = pack_length
        self.pack_patches = pack_patches
        self.graphdef, self.state = nnx.split(model)
        self.output_width = model.config.text.hidden_size
        self.devices = sharding.batch_devices(mesh, self.rules, per_process=True)
        self.batch_size = -(-batch_size // self.devices) * self.devices
        self._step = jax.jit(step, static_argnums=0)
        self.peak_prepared = 0  # the most prepared inputs this runner held at once
        self.pool = workers_lib.Pool(workers) if pool is None else pool

    def host_snapshot(self) -> workers_lib.HostCounts:
        """The pool's counts so far (give them to `host_report` later)."""
        return dataclasses.replace(self.pool.counts)

    def host_report(self, since: workers_lib.HostCounts) -> dict[str, Any]:
        """The host side since `since` (a `host_snapshot()`): worker processes, items encoded in
        workers and in this process, and the fraction of the run time spent waiting for
        encodings (the devices idle for want of input)."""
        counts = self.pool.counts.minus(since)
        wait = counts.wait_s / counts.run_s if counts.run_s > 0 else 0.0
        return {
            "workers": self.pool.workers,
            "items_in_workers": counts.items_in_workers,
            "items_in_main": counts.items_in_main,
            "device_wait_fraction": round(wait, 4),
        }

    @property
    def call_size(self) -> int:
        """Inputs a caller should hand `run` at a time (an evaluation's chunk): 64 batches, so
        that with packing most windows fill and only a call's last one is partial."""
        return 64 * self.batch_size

    def close(self) -> None:
        """Stops the encoding workers (a later call starts them again)."""
        self.pool.close()

    def reload(self, model: Qwen2VL) -> None:
        """Takes `model`'s current weights (after they changed in place, e.g. in training);
        the compiled step is kept."""
        self.graphdef, self.state = nnx.split(model)

    def run(
        self, inputs: Sequence[Any], encode: Callable[[Any], Encoded | None], *, desc: str
    ) -> np.ndarray:
        """Encodes and runs every input; returns float32 [len(inputs), ...] in input order.

        `encode(input)` returns an Encoded, None (skipped), or raises BadInput (the processor's
        report then applies the on_bad_input policy); it must pickle when workers > 0.
        """
        share = distributed.host_slice(len(inputs))
        began = time.perf_counter()
        try:
            local = self._run_local(inputs[share], encode, desc=desc)
        finally:
            self.pool.counts.run_s += time.perf_counter() - began
        return distributed.gather_in_order(local, len(inputs))

    def _context(self):
        stack = contextlib.ExitStack()
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
            stack.enter_context(nnx.logical_axis_rules(self.rules))
        return stack

    def _shape(self, encoded: Encoded) -> tuple[int, int, int]:
        """(length bucket, patch bucket, frames per patch) of one encoding: a video's patches
        are two frames wide, so steps with video are their own programs and image-only steps
        keep one frame."""
        batcher = self.processor.batcher
        return (*batcher.shape_of([encoded]), batcher.frames_of([encoded]))

    def _plan(self, window: list[tuple[int, Encoded]]) -> list[_Step]:
        """Groups a window's encodings into steps: of one (frames, patch, length) bucket each,
        or packed into rows (`pack_length`)."""
        if self.pack_length:
            return self._plan_packed(window)
        order = sorted(window, key=lambda x: (self._shape(x[1])[::-1], x[1].length))
        steps = []
        for _, group in itertools.groupby(order, key=lambda x: self._shape(x[1])[2]):
            group = list(group)  # one frame width: video apart from images
            for start in range(0, len(group), self.batch_size):
                chunk = group[start : start + self.batch_size]
                shape = np.max([self._shape(e) for _, e in chunk], axis=0)
                indices, rows = [[i] for i, _ in chunk], [[e] for _, e in chunk]
                steps.append(_Step(indices, rows, tuple(int(v) for v in shape)))
        return steps

    def _plan_packed(self, window: list[tuple[int, Encoded]]) -> list[_Step]:
        """The window's encodings packed into text rows of `pack_length` tokens, cut into
        steps of at most `batch_size` rows, a step the fewest rows that hold its own
        (`fine_bucket` of this process's devices); each step's patches packed into vision rows
        (`Batcher.vision_shape`, at most `pack_patches` patches a row unless its largest
        input needs more); videos (two frames a patch) are packed apart from the rest. A step's
        shape is (pack_length, patches per vision row, segment slots, rows, vision rows,
        frames)."""
        batcher = self.processor.batcher
        steps = []
        for frames in (1, 2):  # videos share rows only with videos
            members = [(i, e) for i, e in window if batcher.frames_of([e]) == frames]
            rows = pack_rows([e for _, e in members], length=self.pack_length)
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                items = [members[i][1] for row in chunk for i in row]
                patches, vision_rows = batcher.vision_shape(items, self.pack_patches, self.devices)
                shape = (
                    self.pack_length,
                    patches,
                    segment_bucket(max(len(row) for row in chunk)),
                    min(fine_bucket(len(chunk), self.devices), self.batch_size),
                    vision_rows,
                    frames,
                )
                indices = [[members[i][0] for i in row] for row in chunk]
                rows_here = [[members[i][1] for i in row] for row in chunk]
                steps.append(_Step(indices, rows_here, shape))
        return steps

    def _agree(self, steps: list[_Step], taken: int) -> tuple[list[tuple[int, ...]], bool]:
        """(the shape of every step of this window, whether any process took inputs into it),
        the same on all processes: per dimension the largest any process's step needs (not
        the largest pair)."""
        count, more = distributed.max_across_processes([len(steps), int(taken > 0)])
        width = 6 if self.pack_length else 3
        shapes = np.zeros((count, width), np.int32)  # Steps past a process's own feed padding.
        for number, step in enumerate(steps):
            shapes[number] = step.shape
        if count:
            shapes = np.asarray(distributed.max_across_processes(shapes.reshape(-1)))
        return [tuple(int(v) for v in s) for s in shapes.reshape(-1, width)], bool(more)

    def _collate(self, step: _Step | None, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        """One step's host batch of the agreed `shape` (None: a step of dummy rows only)."""
        rows = [] if step is None else step.rows
        batcher = self.processor.batcher
        if self.pack_length:
            length, patches, segments, step_rows, vision_rows, frames = shape
            batch = batcher.pack(
                rows,
                pad_to_batch=step_rows,
                length=length,
                num_patches=patches,
                segments=segments,
                frames=frames,
                vision_rows=vision_rows,
            )
            return batcher.for_process(batch, jax.process_index())
        return batcher.collate(
            [e for (e,) in rows],
            pad_to_batch=self.batch_size,
            length=shape[0],
            num_patches=shape[1],
            frames=shape[2],
        )

    def _take_window(
        self, results: Iterator[Any], start: int
    ) -> tuple[list[tuple[int, Encoded]], int]:
        """(the next window's usable encodings as (local index, Encoded), the inputs taken);
        bad ones go to the processor's report (which raises under on_bad_input='error'). A
        window is `window` batches: so many inputs, or packed, inputs until their tokens fill
        that many rows of `pack_length`."""
        rows = self.batch_size * self.window
        window, taken, tokens = [], 0, 0
        while (tokens < rows * self.pack_length) if self.pack_length else (taken < rows):
            value = next(results, _END)
            if value is _END:
                break
            value = self._received(start + taken, value)
            if isinstance(value, workers_lib.Failed):
                self.processor.report.handle(value.error)
            elif value is not None:
                window.append((start + taken, value))
                tokens += value.length
            taken += 1
        self.peak_prepared = max(self.peak_prepared, len(window))
        return window, taken

    def _received(self, index: int, value: Any) -> Encoded | workers_lib.Failed | None:
        """What `encode` returned for local input `index`, as an Encoded, Failed or None
        (a hook for runners whose encode returns more)."""
        del index
        return value

    def _run_local(self, inputs: Sequence[Any], encode, *, desc: str) -> np.ndarray:
        out = np.full((len(inputs), self.output_width), np.nan, np.float32)
        pending = None  # (indices, result on device): fetched while the next batch runs
        results = self.pool.map(inputs, encode)
        with tqdm.tqdm(
            total=len(inputs),
            desc=desc,
            unit="ex",
            dynamic_ncols=True,
            disable=not (self.progress and distributed.is_primary()),
        ) as bar:
            start, more = 0, True
            while more:
                window, taken = self._take_window(results, start)
                start += taken
                steps = self._plan(window)
                shapes, more = self._agree(steps, taken)
                for index, shape in enumerate(shapes):
                    step = steps[index] if index < len(steps) else None
                    result = self._dispatch(self._collate(step, shape))
                    if pending is not None:
                        out = self._store(out, *pending)
                        bar.update(pending[0].count)
                    pending = (step or _Step([], [], shape), result)
            if pending is not None:
                out = self._store(out, *pending)
                bar.update(pending[0].count)
        return out

    def _dispatch(self, batch: dict[str, np.ndarray]) -> jax.Array:
        """Starts one batch on the devices; returns without waiting."""
        with self._context():
            if self.mesh is not None:
                device_batch = distributed.put_batch(batch, self.mesh, self.rules)
            else:
                device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
            return self._step(self.graphdef, self.state, device_batch)

    def _store(self, out: np.ndarray, step: _Step, result: jax.Array) -> np.ndarray:
        """Waits for a step's result and writes its real rows (or segments) into `out`
        (widened to the result's trailing shape on first use)."""
        rows = distributed.local_rows(result) if self.mesh is not None else np.asarray(result)
        rows = np.asarray(rows, np.float32)
        slots = step.slots(rows_of=rows.shape[1] if self.pack_length else 1)
        if self.pack_length:  # [B, S, ...] -> one output per segment slot
            rows = rows.reshape((-1,) + rows.shape[2:])
        if out.shape[1:] != rows.shape[1:]:
            out = np.full((len(out),) + rows.shape[1:], np.nan, np.float32)
        out[slots[slots >= 0]] = rows[: len(slots)][slots >= 0]
        return out


@dataclasses.dataclass
class _Step:
    """One step of a window: the local input index of each segment of each row (one segment
    per row unless packed), the rows' encodings, and the step's shape before agreement."""

    indices: list[list[int]]
    rows: list[list[Encoded]]
    shape: tuple[int, ...]

    @property
    def count(self) -> int:
        return sum(len(row) for row in self.indices)

    def slots(self, rows_of: int) -> np.ndarray:
        """The input index of every output slot, row-major with `rows_of` slots per row (-1
        where a slot holds no input)."""
        slots = np.full((len(self.indices), rows_of), -1, np.int64)
        for row, indices in enumerate(self.indices):
            slots[row, : len(indices)] = indices
        return slots.reshape(-1)


class Embedder(BatchRunner):
    """Embeds texts and images with a Qwen2-VL checkpoint: L2-normalised float32 vectors.

    As a library (the same prompts, preprocessing and batching as the embed command):

        embedder = Embedder.from_pretrained(model_dir, adapter_dir=None)  # mesh optional
        vectors = embedder.embed(texts, images=None, role="query")       # [N, D]

    The stages call it on `EmbedItem`s: `embedder(items) -> float32 [N, D]` in input order.
    Bad items follow the processor's on_bad_input policy; a skipped item's row is NaN.
    """

    def __init__(self, model: Qwen2VL, processor: Processor, **kwargs):
        super().__init__(model, processor, embed_step, **kwargs)
        self._pooled_runner: BatchRunner | None = None  # encode(normalize_embeddings=False)

    @staticmethod
    def pooled_step(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array]):
        """float32 [B, D] ([B, S, D] packed) last-token hidden states before the L2
        normalisation of `embed_step` (pure; jit with graphdef static)."""
        return nnx.merge(graphdef, state).pooled_hidden(batch).astype(jnp.float32)

    def reload(self, model: Qwen2VL) -> None:
        super().reload(model)
        self._pooled_runner = None

    @classmethod
    def for_stage(
        cls,
        pipeline: Pipeline,
        model: Qwen2VL,
        processor: Processor,
        *,
        per_device: int,
        progress: bool = False,
    ) -> Embedder:
        """A stage's embedder of `model`: the pipeline's mesh, rules and workers,
        `per_device` rows on each batch device, packed rows when data.pack_length is set."""
        return cls(
            model,
            processor,
            mesh=pipeline.mesh,
            rules=pipeline.rules,
            batch_size=rows_per_step(per_device, pipeline.mesh, pipeline.rules),
            workers=pipeline.workers,
            progress=progress,
            pack_length=pipeline.config.data.pack_length,
            pack_patches=pipeline.config.data.pack_patches,
        )

    @classmethod
    def from_pipeline(cls, pipeline: Pipeline) -> Embedder:
        """The embed command's embedder: the base model, its config's processor and batch."""
        return cls.for_stage(
            pipeline,
            pipeline.model(trained=False),
            pipeline.processor(),  # data.image_resolution: "processor" by default
            per_device=pipeline.config.eval.batch_size,
        )

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | pathlib.Path,
        adapter_dir: str | None = None,
        *,
        mesh: jax.sharding.Mesh | None = None,
        **settings: Any,
    ) -> Embedder:
        """An embedder for a Hugging Face Qwen2-VL / Qwen2.5-VL directory.

        Args:
          model_dir: the checkpoint (config.json, safetensors, tokenizer, preprocessor config).
          adapter_dir: a PEFT LoRA/DoRA adapter applied on top (ours or the release's).
          mesh: the device mesh; default all devices on the data axis.
          settings: config keys to change from the embed command's (configs/embed.py), dotted
            as on the command line, e.g. `**{"data.image_resolution": "random"}`.
        Raises:
          configuration.ConfigError: a setting names no key or has a bad value.
        """
        config = configuration.embed_config()
        config.model_dir, config.adapter_dir = str(model_dir), str(adapter_dir or "")
        for key, value in settings.items():
            *parents, leaf = key.split(".")
            node = config
            for parent in parents:
                node = node[parent]
            if leaf not in node:
                raise configuration.ConfigError(
                    f"Embedder.from_pretrained: no config key {key!r}; see g2e/configuration.py"
                )
            node[leaf] = value
        configuration.validate_settings(config, ["embed"])
        pipeline = Pipeline(config, pathlib.Path.cwd(), mesh=mesh)
        return cls.from_pipeline(pipeline)

    def embed(
        self,
        texts: Sequence[str],
        images: Sequence[Any] | None = None,
        *,
        role: str = "query",
        subset: str = "",
    ) -> np.ndarray:
        """float32 [len(texts), D] L2-normalised embeddings, in order.

        Args:
          texts: each input's text (its task instruction included; "" for an image alone).
          images: None, or per text an image path (relative to the working directory), a PIL
            image, encoded bytes, or None.
          role: 'query' (with the one-word suffix) or 'candidate' (docs/method.md §1).
          subset: an MMEB subset name, where prompts depend on it ('...Matching').
        Raises:
          ValueError: images and texts differ in length, or a bad role.
          BadInput: a missing or broken image (names it), under on_bad_input='error'.
        """
        images = [None] * len(texts) if images is None else list(images)
        if len(images) != len(texts):
            raise ValueError(f"Embedder.embed: {len(texts)} texts but {len(images)} images")
        items = [
            EmbedItem(text, image, role, subset, row=index)
            for index, (text, image) in enumerate(zip(texts, images))
        ]
        return self.embed_items(items)

    def encode(
        self,
        inputs: Any,
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
        normalize_embeddings: bool = True,
        *,
        role: str | None = None,
        subset: str = "",
    ) -> np.ndarray | list[np.ndarray]:
        """Embeds inputs the way sentence-transformers' `SentenceTransformer.encode` does.

        Args:
          inputs: one input or a list of them: a str (text), a PIL image, image bytes or a
            pathlib.Path (image), a (text, image) pair, or a dict {"text", "image", "video",
            "role"} as an embed command line (g2e.encode_inputs).
          prompt_name: 'query', or 'document' / 'passage' / 'corpus' / 'candidate' (g2e's
            candidate role); the role's prompt is docs/method.md §1's.
          prompt: text put before each input's text (a task instruction).
          batch_size: rows per step on this process (default: the embedder's).
          show_progress_bar: None keeps the embedder's setting.
          convert_to_numpy: True: one float32 array; False: a list of 1-D arrays.
          normalize_embeddings: True: L2-normalised, the embed command's vectors; False: the
            last-token hidden states before normalisation.
          role: 'query' or 'candidate', instead of prompt_name (default 'query').
          subset: an MMEB subset name, where prompts depend on it ('...Matching').
        Returns:
          float32 [D] for a single input, [N, D] for a list (NaN rows for skipped inputs).
        Raises:
          ValueError / TypeError: an input of no known form, a bad role or prompt name.
          NotImplementedError: a video, where this build cannot embed one.
        """
        items, single = encode_inputs.to_items(
            inputs,
            role=encode_inputs.call_role(role, prompt_name),
            prompt=prompt,
            subset=subset,
        )
        runner = self if normalize_embeddings else self._unnormalised()
        saved = runner.batch_size, runner.progress
        if batch_size is not None:
            runner.batch_size = -(-int(batch_size) // runner.devices) * runner.devices
        if show_progress_bar is not None:
            runner.progress = bool(show_progress_bar)
        try:
            encode = functools.partial(self.processor.encode, strict=True)
            vectors = runner.run(items, encode, desc="encode")
        finally:
            runner.batch_size, runner.progress = saved
        if single:
            return vectors[0]
        return vectors if convert_to_numpy else list(vectors)

    def encode_query(self, inputs: Any, **kwargs: Any) -> np.ndarray | list[np.ndarray]:
        """`encode` with the query role (sentence-transformers' `encode_query`)."""
        return self.encode(inputs, role="query", **kwargs)

    def encode_document(self, inputs: Any, **kwargs: Any) -> np.ndarray | list[np.ndarray]:
        """`encode` with the candidate role (sentence-transformers' `encode_document`)."""
        return self.encode(inputs, role="candidate", **kwargs)

    @staticmethod
    def similarity(embeddings1: Any, embeddings2: Any) -> np.ndarray:
        """Cosine similarity [N1, N2] of two sets of embeddings ([D] or [N, D])."""
        return unit_rows(embeddings1) @ unit_rows(embeddings2).T

    def _unnormalised(self) -> BatchRunner:
        """A runner of `pooled_step` on this embedder's weights, workers and batch layout."""
        if self._pooled_runner is None:
            self._pooled_runner = BatchRunner(
                nnx.merge(self.graphdef, self.state),
                self.processor,
                self.pooled_step,
                mesh=self.mesh,
                rules=self.rules,
                batch_size=self.batch_size,
                progress=self.progress,
                window=self.window,
                pool=self.pool,
                pack_length=self.pack_length,
                pack_patches=self.pack_patches,
            )
        return self._pooled_runner

    def embed_items(self, items: Sequence[EmbedItem], *, desc: str = "embed") -> np.ndarray:
        """float32 [len(items), D] in input order (NaN rows for skipped bad items)."""
        return self.run(items, functools.partial(self.processor.encode, strict=True), desc=desc)

    __call__ = embed_items
