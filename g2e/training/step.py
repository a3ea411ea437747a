"""The train step: one pure function of (state, frozen, batch), compiled ahead of time per shape.

`train_step` does, in order:
1. `prepare_fn`, once per step: the work that depends on the step's parameters and batch but
   on no chunk of it. For Qwen2VL (`g2e.training.stage.model_step_fns`) that is the frozen
   vision tower's tokens of both sides and the DoRA weight norms; every pass below reuses them,
   and no gradient flows into the tower.
2. The loss and the gradient of the trainable parameters: plain backpropagation through the
   whole batch (`query_chunk == 0`) or GradCache over chunks of rows (g2e.training.gradcache).
3. AdamW. Trainable parameters are float32 (lora.ADAPTER_DTYPE), so their moments are too.
Dropout draws from an 'rbg' key (the backend's fast generator) seeded from the step's threefry
key, so a run is reproducible on one platform.

`CompiledSteps` compiles the step once per batch shape (`jit(...).lower(...).compile()`) and
chooses how it backpropagates (`train.backprop`) and, under 'auto', how the text decoder's
layers are rematerialised:
  'auto':      for each remat policy of REMAT_LADDER, the least recomputation first: the
               direct step, if XLA's memory analysis of it fits the device's memory
               (`train.memory_limit_gb`, 0: what the device reports; CPUs report none, so
               always); else GradCache, with chunks of `train.query_chunk` /
               `train.candidate_chunk` rows per device, or, where those are 0, the largest
               that this direct step's memory per row says fit, if they fit and hold at least
               MIN_CHUNK rows (or the whole side); else the next policy. The last policy
               takes GradCache with the smallest chunks that fit (or 1 row).
  'direct':    always the direct step, with the model's own remat (model.remat);
  'gradcache': always GradCache (chunks as under 'auto'), with the model's own remat.
The choice is made once for each number of rows per device and reused by every later shape
with as many rows, so a run compiles each shape once.
The compiled executable also gives the step's hardware FLOPs (g2e.training.flops.hlo_flops).
The step is traced with the mesh and the logical-axis rules set (`compile_step`), so the model's
activation constraints (`sharding.constrain`) take effect.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from g2e.models import sharding
from g2e.models import text as text_lib
from g2e.training import flops as flops_lib
from g2e.training import gradcache
from g2e.training import loss as loss_lib

PyTree = Any
# prepare_fn(trainable, frozen, batch) -> (what embed_fn gets as `frozen`, the batch to embed).
PrepareFn = Callable[[PyTree, PyTree, Mapping[str, Any]], tuple[PyTree, Mapping[str, Any]]]
BACKPROP = ("auto", "direct", "gradcache")
# Remat policies 'auto' tries, the least recomputation first (g2e.models.text.REMAT_POLICIES).
REMAT_LADDER = ("none", "dots", "full")
# Rows per device of a GradCache chunk below which 'auto' tries a heavier remat policy first:
# thinner chunks leave an accelerator's matmuls too small to run near peak.
MIN_CHUNK = 8
# Share of the device's memory a compiled step may plan to use (the rest: fragmentation).
_MEMORY_HEADROOM = 0.9


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """The static parts of the train step (hashable, closed over by jit).

    mesh, rules: the device mesh (None: one device) and the logical-axis rules; the 'batch'
    rule names the mesh axes the batch is split over, and the step is traced under both, so
    the model's activation constraints apply.
    query_chunk / candidate_chunk: rows per device per GradCache chunk; 0 backpropagates
    through the whole batch at once.
    remat: the text decoder's remat policy in this step (None: the model's own).
    """

    embed_fn: gradcache.EmbedFn
    loss_config: loss_lib.LossConfig
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Mesh | None
    rules: sharding.Rules = sharding.DEFAULT_RULES
    query_chunk: int = 0
    candidate_chunk: int = 0
    prepare_fn: PrepareFn | None = None
    remat: str | None = None

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """The mesh axes the batch is split over (() without a mesh)."""
        if self.mesh is None:
            return ()
        return sharding.batch_axes(self.rules, self.mesh.axis_names)


def init_state(
    trainable: PyTree,
    optimizer: optax.GradientTransformation,
    seed: int,
    loss_config: loss_lib.LossConfig,
) -> PyTree:
    """Fresh train state; adds the log inverse temperature when it is learnable."""
    params = {"model": trainable}
    if loss_config.learnable_temperature:
        params["log_inverse_temperature"] = jnp.asarray(
            math.log(1.0 / loss_config.temperature), jnp.float32
        )
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": jnp.int32(0),
        "rng": jax.random.PRNGKey(seed),
    }


def dropout_key(rng: jax.Array) -> jax.Array:
    """An 'rbg' key (XLA's RngBitGenerator: far fewer ops per random bit than threefry)
    seeded with 128 bits drawn from the threefry key `rng`."""
    return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")


def _norm(tree: PyTree) -> jax.Array:
    return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def train_step(
    setup: StepSetup, state: PyTree, frozen: PyTree, batch: Mapping[str, Any]
) -> tuple[PyTree, dict[str, jax.Array]]:
    """One optimisation step on a global batch {'query', 'candidate', 'ids'}.

    Returns the new state and scalar metrics (loss, accuracy, norms, learning rate).
    """
    rng = dropout_key(jax.random.fold_in(state["rng"], state["step"]))
    params = state["params"]
    if setup.prepare_fn is not None:
        frozen, batch = setup.prepare_fn(params["model"], frozen, batch)
    loss, aux, grads = _loss_and_grads(setup, params, frozen, batch, rng)
    updates, opt_state = setup.optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {
        "loss": loss,
        "accuracy": aux["accuracy"],
        "grad_norm": _norm(grads),
        "param_norm": _norm(new_params),
        "update_norm": _norm(updates),
        "learning_rate": jnp.asarray(setup.schedule(state["step"]), jnp.float32),
    }
    if "log_inverse_temperature" in new_params:
        metrics["temperature"] = jnp.exp(-new_params["log_inverse_temperature"])
    new_state = {
        "params": new_params,
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "rng": state["rng"],
    }
    return new_state, metrics


def _loss_and_grads(
    setup: StepSetup, params: PyTree, frozen: PyTree, batch: Mapping[str, Any], rng: jax.Array
) -> tuple[jax.Array, Mapping[str, jax.Array], PyTree]:
    """The InfoNCE loss of the batch and its float32 gradient, by GradCache when the setup
    has chunks, else by plain backpropagation."""

    def embed(params, frozen_params, model_batch, key):
        return setup.embed_fn(params["model"], frozen_params, model_batch, key)

    def contrastive(queries, candidates, params):
        queries, candidates = (
            _pairs_of(embeddings, batch, side)
            for embeddings, side in ((queries, "query"), (candidates, "candidate"))
        )
        loss, accuracy = loss_lib.infonce(
            queries,
            candidates,
            batch["ids"],
            setup.loss_config,
            mesh=setup.mesh,
            batch_axes=setup.batch_axes,
            log_inverse_temperature=params.get("log_inverse_temperature"),
        )
        return loss, {"accuracy": accuracy}

    if setup.query_chunk and setup.candidate_chunk:
        return gradcache.loss_and_grads(
            embed,
            contrastive,
            params,
            frozen,
            batch,
            rng,
            query_chunk=setup.query_chunk,
            candidate_chunk=setup.candidate_chunk,
            mesh=setup.mesh,
            rules=setup.rules,
        )
    return gradcache.direct_loss_and_grads(embed, contrastive, params, frozen, batch, rng)


def _pairs_of(embeddings: jax.Array, batch: Mapping[str, Any], side: str) -> jax.Array:
    """One side's [N, D] embeddings in pair order. A packed batch (g2e.training.batches.
    RowCodec with data.pack_length) embeds one pool of [rows * S, D] segment slots, and
    batch['<side>_place'] [N, 2] says each pair's (row, segment) within its process's rows
    (processes' rows one after another, as g2e.distributed.put_batch lays them out)."""
    place = batch.get(f"{side}_place")
    if place is None:
        return embeddings
    rows, slots = batch["pool"]["last_index"].shape
    pairs, processes = place.shape[0], jax.process_count()
    process = jnp.arange(pairs) // (pairs // processes)
    row = process * (rows // processes) + place[:, 0]
    return jnp.take(embeddings, row * slots + place[:, 1], axis=0)


def jit_step(setup: StepSetup, state_sharding: PyTree) -> Any:
    """`train_step` jitted with the state donated and returned with `state_sharding` (the
    metrics replicated)."""
    return jax.jit(
        functools.partial(train_step, setup),
        donate_argnums=(0,),
        out_shardings=(state_sharding, NamedSharding(setup.mesh, P())),
    )


def compile_step(jitted: Any, setup: StepSetup, state: PyTree, frozen: PyTree, batch) -> Any:
    """A `jit_step` compiled for these arguments (arrays or ShapeDtypeStructs with shardings),
    traced under the mesh and the logical-axis rules, so the model's activation constraints
    apply: without them GSPMD may, under fsdp, gather a whole chunk's activations onto every
    device rather than the layer's weights."""
    with (
        jax.set_mesh(setup.mesh),
        nnx.logical_axis_rules(setup.rules),
        text_lib.remat_override(setup.remat),
    ):
        return jitted.lower(state, frozen, batch).compile()


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One compiled step: the executable, how it backpropagates, its remat policy (None: the
    model's own), its per-device memory plan (bytes) and hardware FLOPs."""

    executable: Any
    backprop: str
    query_chunk: int
    candidate_chunk: int
    remat: str | None
    memory_bytes: int
    hardware_flops: float

    @property
    def plan(self) -> tuple[int, int, str | None]:
        return self.query_chunk, self.candidate_chunk, self.remat


def memory_bytes(compiled: Any) -> int:
    """Per-device bytes a compiled executable plans to hold (arguments, outputs, temporaries)."""
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def device_memory_limit(limit_gb: float = 0.0) -> int | None:
    """Bytes a step may use on one device: `limit_gb` if set, else the device's reported
    limit, else None (CPU: unknown, no limit)."""
    if limit_gb and limit_gb > 0:
        return int(limit_gb * 2**30)
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


class CompiledSteps:
    """The train step compiled once per batch shape, direct or GradCache (module docstring).

    Args:
      setup: the step's static parts (with a mesh); its chunk fields are replaced by the
        choice made here (one jitted step per choice, compiled once per batch shape).
      state_sharding: shardings of the train state (the donated output has them too).
      backprop: 'auto', 'direct' or 'gradcache'.
      query_chunk, candidate_chunk: GradCache rows per device per chunk; 0 sizes them.
      memory_limit: per-device bytes a step may use (None: no limit).
    """

    def __init__(
        self,
        setup: StepSetup,
        state_sharding: PyTree,
        *,
        backprop: str = "auto",
        query_chunk: int = 0,
        candidate_chunk: int = 0,
        memory_limit: int | None = None,
    ):
        if backprop not in BACKPROP:
            raise ValueError(f"train.backprop is {backprop!r}; use one of {BACKPROP}")
        self.setup, self.state_sharding = setup, state_sharding
        self.backprop, self.memory_limit = backprop, memory_limit
        self.chunks = (query_chunk, candidate_chunk)
        self._jitted: dict[tuple, Any] = {}  # one jit per plan (chunks, remat)
        self._cache: dict[tuple, Compiled] = {}  # one executable per batch shape
        # (query rows, candidate rows) per device -> the plan chosen for the first shape with
        # those rows: later shapes compile only that plan, never one ruled out.
        self._plans: dict[tuple[int, int], tuple[int, int, str | None]] = {}
        self.compilations = 0  # programs compiled, tried plans included

    @property
    def shapes(self) -> int:
        """Batch shapes compiled for so far."""
        return len(self._cache)

    @staticmethod
    def _signature(*trees: PyTree) -> tuple:
        return tuple(
            (str(path), x.shape, str(x.dtype))
            for path, x in jax.tree_util.tree_leaves_with_path(trees)
        )

    def get(self, state: PyTree, frozen: PyTree, batch: Mapping[str, Any]) -> Compiled:
        """The compiled step for these arguments' shapes (compiling it the first time)."""
        key = self._signature(batch)
        if key not in self._cache:
            self._cache[key] = self._choose(state, frozen, batch)
            chosen = self._cache[key]
            logging.info(
                "train step: %s backprop (chunks %d/%d), remat %s, %.2f GiB per device "
                "planned, %.3g hardware FLOPs per device",
                chosen.backprop,
                chosen.query_chunk,
                chosen.candidate_chunk,
                chosen.remat or "of the model",
                chosen.memory_bytes / 2**30,
                chosen.hardware_flops,
            )
        return self._cache[key]

    def __call__(
        self, state: PyTree, frozen: PyTree, batch: Mapping[str, Any]
    ) -> tuple[PyTree, dict[str, jax.Array]]:
        return self.get(state, frozen, batch).executable(state, frozen, batch)

    def _compile(
        self, state, frozen, batch, query_chunk: int, candidate_chunk: int, remat: str | None
    ) -> Compiled:
        plan = (query_chunk, candidate_chunk, remat)
        setup = dataclasses.replace(
            self.setup, query_chunk=query_chunk, candidate_chunk=candidate_chunk, remat=remat
        )
        if plan not in self._jitted:
            self._jitted[plan] = jit_step(setup, self.state_sharding)
        executable = compile_step(self._jitted[plan], setup, state, frozen, batch)
        self.compilations += 1
        return Compiled(
            executable,
            "gradcache" if query_chunk else "direct",
            query_chunk,
            candidate_chunk,
            remat,
            memory_bytes(executable),
            flops_lib.hlo_flops(executable.as_text()),
        )

    def _fits(self, compiled: Compiled) -> bool:
        return (
            self.memory_limit is None
            or compiled.memory_bytes <= _MEMORY_HEADROOM * self.memory_limit
        )

    def _choose(self, state, frozen, batch) -> Compiled:
        devices = sharding.batch_devices(self.setup.mesh, self.setup.rules)
        # Per device; a packed batch's one pool is chunked with the query chunk.
        sides = ("pool", "pool") if "pool" in batch else ("query", "candidate")
        rows = tuple(_rows(batch[side]) // devices for side in sides)
        if rows in self._plans:
            return self._compile(state, frozen, batch, *self._plans[rows])
        compiled = self._search(state, frozen, batch, rows)
        self._plans[rows] = compiled.plan
        return compiled

    def _search(self, state, frozen, batch, rows: tuple[int, int]) -> Compiled:
        """The first plan that fits (module docstring): per remat policy (under 'auto'), the
        direct step, then GradCache with the largest chunks that, by that direct step's
        memory, fit."""
        if self.backprop == "direct":
            return self._compile(state, frozen, batch, 0, 0, None)
        if self.backprop == "gradcache" and all(self.chunks):
            return self._compile(state, frozen, batch, *self.chunks, None)
        ladder = REMAT_LADDER if self.backprop == "auto" else (None,)
        for remat in ladder:
            last = remat == ladder[-1]
            direct = self._compile(state, frozen, batch, 0, 0, remat)
            if self.backprop == "auto" and self._fits(direct):
                return direct
            sized = self._chunk_sizes(direct, rows)
            thin = any(
                not fixed and size[0] < min(MIN_CHUNK, side)
                for fixed, size, side in zip(self.chunks, sized, rows)
            )
            if thin and not last:
                continue  # a heavier policy may fit thicker chunks
            # The three largest fitting chunks of each side, without repeats.
            choices = dict.fromkeys(
                tuple(
                    fixed or size[min(choice, len(size) - 1)]
                    for fixed, size in zip(self.chunks, sized)
                )
                for choice in range(3)
            )
            for query_chunk, candidate_chunk in choices:
                compiled = self._compile(state, frozen, batch, query_chunk, candidate_chunk, remat)
                if self._fits(compiled):
                    break
            if self._fits(compiled) or last:
                break
        if not self._fits(compiled):
            logging.warning(
                "train step: GradCache with chunks %d/%d and remat %s plans %.2f GiB per "
                "device, over the limit of %.2f GiB; lower train.query_chunk / "
                "candidate_chunk",
                compiled.query_chunk,
                compiled.candidate_chunk,
                compiled.remat or "of the model",
                compiled.memory_bytes / 2**30,
                self.memory_limit / 2**30,
            )
        return compiled

    def _chunk_sizes(self, direct: Compiled, rows: tuple[int, int]) -> list[list[int]]:
        """Per side, the divisors of its rows per device, largest first, that `direct`'s
        memory per row says fit in a GradCache chunk (all of them without a memory limit;
        at least [1])."""
        sized = [[d for d in range(side, 0, -1) if side % d == 0] for side in rows]
        if self.memory_limit is None:
            return sized
        # Activations scale with rows (both sides'); a chunk holds one side's T rows, and
        # its backward pass about as much again.
        per_row = max(1, direct.memory_bytes - _argument_bytes(direct)) / sum(rows)
        room = _MEMORY_HEADROOM * self.memory_limit - _argument_bytes(direct)
        return [[d for d in side if d * per_row * 2 <= room] or [1] for side in sized]


def _rows(side: Mapping[str, Any]) -> int:
    """The rows of one side of a batch (its first field's batch dimension)."""
    key, first = next(iter(side.items()))
    return first.shape[sharding.batch_dim(key)]


def _argument_bytes(compiled: Compiled) -> int:
    m = compiled.executable.memory_analysis()
    return int(m.argument_size_in_bytes)
