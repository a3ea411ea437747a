"""The contrastive train loop: one jitted `train_step`, a plain loop, checkpoints, logs.

State is a plain pytree {'params', 'opt_state', 'step', 'rng'} holding only the trainable
parameters (adapters, or all weights for full fine-tuning) and their optimizer state; the frozen
base weights are a separate, non-donated argument. `fit` is generic over an
`embed_fn(trainable, frozen, batch, rng) -> [b, D]`; the train stage
(`g2e.training.stage.train_model`) binds it to a Qwen2VL.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from g2e import distributed
from g2e.models import sharding
from g2e.training import batches as batches_lib
from g2e.training import checkpointing, gradcache
from g2e.training import loss as loss_lib
from g2e.training import optimizer as optimizer_lib

PyTree = Any

# Peak dense bf16 FLOP/s per chip, for the MFU estimate (device_kind prefixes).
PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("TPU v6", 918e12),
              ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
              ("TPU v4", 275e12))


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """The static parts of the train step (hashable, closed over by jit)."""

    embed_fn: gradcache.EmbedFn
    loss_config: loss_lib.LossConfig
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Mesh
    query_chunk: int
    candidate_chunk: int
    batch_axes: tuple[str, ...]


def init_state(trainable: PyTree, optimizer: optax.GradientTransformation, seed: int,
               loss_config: loss_lib.LossConfig) -> PyTree:
    """Fresh train state; adds the log inverse temperature when it is learnable."""
    params = {"model": trainable}
    if loss_config.learnable_temperature:
        params["log_inverse_temperature"] = jnp.asarray(math.log(1.0 / loss_config.temperature),
                                                        jnp.float32)
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0),
            "rng": jax.random.PRNGKey(seed)}


def _norm(tree: PyTree) -> jax.Array:
    return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def train_step(setup: StepSetup, state: PyTree, frozen: PyTree, batch: Mapping[str, Any]
               ) -> tuple[PyTree, dict[str, jax.Array]]:
    """One optimisation step on a global batch {'query', 'candidate', 'ids'}.

    Returns the new state and scalar metrics (loss, accuracy, norms, learning rate).
    """
    rng = jax.random.fold_in(state["rng"], state["step"])

    def embed(params, frozen_params, model_batch, key):
        return setup.embed_fn(params["model"], frozen_params, model_batch, key)

    def contrastive(queries, candidates, params):
        loss, accuracy = loss_lib.infonce(
            queries, candidates, batch["ids"], setup.loss_config, mesh=setup.mesh,
            batch_axes=setup.batch_axes,
            log_inverse_temperature=params.get("log_inverse_temperature"))
        return loss, {"accuracy": accuracy}

    params = state["params"]
    loss, aux, grads = gradcache.loss_and_grads(
        embed, contrastive, params, frozen, batch, rng, query_chunk=setup.query_chunk,
        candidate_chunk=setup.candidate_chunk, mesh=setup.mesh, batch_axes=setup.batch_axes)
    updates, opt_state = setup.optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "accuracy": aux["accuracy"], "grad_norm": _norm(grads),
               "param_norm": _norm(new_params), "update_norm": _norm(updates),
               "learning_rate": jnp.asarray(setup.schedule(state["step"]), jnp.float32)}
    if "log_inverse_temperature" in new_params:
        metrics["temperature"] = jnp.exp(-new_params["log_inverse_temperature"])
    new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": state["rng"]}
    return new_state, metrics


def _peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    for prefix, flops in PEAK_FLOPS:
        if kind.startswith(prefix) or prefix in kind:
            return flops
    return None


class MetricsWriter:
    """JSONL + TensorBoard (tensorboardX) + progress bar; only process 0 writes."""

    def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.bar = None
        if not enabled:
            return
        import tensorboardX
        import tqdm
        os.makedirs(workdir, exist_ok=True)
        self.jsonl = open(os.path.join(workdir, "train_metrics.jsonl"), "a")
        self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.bar = tqdm.tqdm(total=total_steps, initial=start_step, desc="train",
                             dynamic_ncols=True)

    def write(self, step: int, metrics: Mapping[str, float]):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            self.tb.add_scalar(f"train/{key}", value, step)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}")

    def advance(self):
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
            self.bar.close()


@dataclasses.dataclass
class FitResult:
    """What `fit` returns: the trained parameters and how the run ended."""

    trainable: PyTree
    params: PyTree
    step: int
    stopped_early: bool
    last_metrics: dict[str, float]


def _check_finite(step: int, metrics: Mapping[str, float], rows: np.ndarray,
                  subsets: Any):
    bad = [k for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])]
    if bad:
        names = sorted({subsets[r] for r in rows}) if subsets is not None else ["(unknown)"]
        raise FloatingPointError(
            f"training step {step}: {', '.join(f'{k}={metrics[k]}' for k in bad)}; subsets in "
            f"the batch: {', '.join(names)}. Lower train.lr or check these subsets' rows; the "
            "last checkpoint is untouched.")


def fit(embed_fn: gradcache.EmbedFn, trainable: PyTree, frozen: PyTree, *, train_cfg: Any,
        mesh: Mesh, schedule: batches_lib.ClusterSchedule, codec: batches_lib.RowCodec,
        workdir: str, rules: sharding.Rules = sharding.DEFAULT_RULES, seed: int = 0,
        subsets: Any = None, flops_per_token: float | None = None,
        async_checkpoints: bool = True, workers: int = 0) -> FitResult:
    """Trains `trainable` for train_cfg.steps steps, resuming from <workdir>/checkpoints.

    Args:
      embed_fn: embeds one chunk, see gradcache.EmbedFn.
      trainable, frozen: parameter pytrees (already placed on `mesh`).
      train_cfg: the `train` config block.
      mesh: the device mesh.
      schedule: which rows form each step's global batch (its batch_size rows).
      codec: turns row ids into host batches {'query': model batch, 'candidate': model batch,
        'ids': int32 [n] or [n, k] per row, equal for duplicate candidates}; its `encode`
        runs in `workers` Grain processes (batches_lib.StepInputs).
      workdir: checkpoints, train_metrics.jsonl and tensorboard/ go here.
      rules: the logical-axis rules; the 'batch' rule names the mesh axes the batch is split
        over.
      seed: dropout RNG seed.
      subsets: indexable, row id -> subset name (read only for a failing batch, in the NaN
        error).
      flops_per_token: model FLOPs of one token's forward (2 x parameters) for the MFU estimate.
      async_checkpoints: write checkpoints in the background.
      workers: Grain worker processes encoding rows (0: in this process).

    Returns:
      FitResult; `stopped_early` is True when SIGTERM or a preemption notice ended the run after
      saving a checkpoint.

    Raises:
      FloatingPointError: the loss or gradient norm became NaN/Inf (names step and subsets).
    """
    loss_config = loss_lib.LossConfig.from_config(train_cfg)
    optimizer, lr_schedule = optimizer_lib.make_optimizer(train_cfg)
    setup = StepSetup(embed_fn=embed_fn, loss_config=loss_config, optimizer=optimizer,
                      schedule=lr_schedule, mesh=mesh, query_chunk=train_cfg.query_chunk,
                      candidate_chunk=train_cfg.candidate_chunk,
                      batch_axes=sharding.batch_axes(rules, mesh.axis_names))
    state = _placed(init_state(trainable, optimizer, seed, loss_config), mesh)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      keep=train_cfg.keep_checkpoints,
                                      every=train_cfg.checkpoint_every,
                                      async_save=async_checkpoints)
    if ckpt.latest_step() is not None:
        state, position = ckpt.restore(checkpointing.abstract_like(state))
        logging.info("resumed from step %d (loader position %s)", int(state["step"]), position)
    try:
        loop = _Loop(setup, state, train_cfg, schedule, codec, rules, ckpt, workdir, subsets,
                     flops_per_token, workers)
    except BaseException:
        ckpt.close()
        raise
    try:
        return loop.run(frozen)
    finally:
        loop.close()


def _placed(state: PyTree, mesh: Mesh) -> PyTree:
    """The train state with every array not already spread over the mesh replicated on it."""
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda x: x if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1
        else jax.device_put(x, replicated), state)


class _Loop:
    """The steps of `fit`: the next host batch prepared while a step runs, the jitted step,
    checks one step late, metrics, checkpoints and the stop signal."""

    def __init__(self, setup: StepSetup, state: PyTree, train_cfg: Any,
                 schedule: batches_lib.ClusterSchedule, codec: batches_lib.RowCodec,
                 rules: sharding.Rules, ckpt: checkpointing.Checkpointer, workdir: str,
                 subsets: Any, flops_per_token: float | None, workers: int):
        self.setup, self.state, self.train_cfg = setup, state, train_cfg
        self.schedule, self.rules = schedule, rules
        self.ckpt, self.workdir, self.subsets = ckpt, workdir, subsets
        self.flops_per_token, self.peak = flops_per_token, _peak_flops()
        self.batch_size = schedule.batch_size
        self.start = int(jax.device_get(state["step"]))
        replicated = NamedSharding(setup.mesh, P())
        self.step_fn = jax.jit(functools.partial(train_step, setup), donate_argnums=(0,),
                               out_shardings=(jax.tree.map(lambda x: x.sharding, state),
                                              replicated))
        self.inputs = batches_lib.StepInputs(
            schedule, codec, rows_here=distributed.local_row_range(setup.mesh, rules,
                                                                   self.batch_size),
            first_step=self.start, last_step=train_cfg.steps, workers=workers)
        self.writer = MetricsWriter(workdir, train_cfg.steps, self.start,
                                    jax.process_index() == 0)
        self.log_every = int(train_cfg.get("log_every", 10))
        self.last: dict[str, float] = {}
        self.tick = time.perf_counter()

    def next_batch(self, step: int) -> tuple[np.ndarray, Any, int]:
        """(global row ids, the step's global device batch, tokens in it)."""
        rows, local, shape = self.inputs.prepare(step)
        host = self.inputs.agree(local, shape)
        tokens = sum(int(np.sum(host[k]["attention_mask"])) for k in ("query", "candidate")
                     if "attention_mask" in host[k])
        device_batch = distributed.put_batch(host, self.setup.mesh, self.rules,
                                             global_rows=self.batch_size)
        return rows, device_batch, tokens * jax.process_count()

    def finish(self, step: int, rows: np.ndarray, tokens: int, device_metrics) -> None:
        """Fetches a step's metrics, stops on NaN, logs them."""
        values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        _check_finite(step, values, rows, self.subsets)
        now = time.perf_counter()
        elapsed, self.tick = now - self.tick, now
        values["pairs_per_s"] = self.batch_size / elapsed
        values["tokens_per_s"] = tokens / elapsed
        if self.flops_per_token and self.peak:
            values["mfu"] = (3 * self.flops_per_token * tokens / elapsed
                             / (self.peak * jax.device_count()))
        self.last = values
        if step % self.log_every == 0 or step + 1 == self.train_cfg.steps:
            self.writer.write(step + 1, values)
        self.writer.advance()

    def run(self, frozen: PyTree) -> FitResult:
        pending = None  # (step, rows, tokens, metrics on device): checked one step late
        stopped_early = False
        upcoming = self.next_batch(self.start) if self.start < self.train_cfg.steps else None
        with checkpointing.StopSignal() as stop:
            for step in range(self.start, self.train_cfg.steps):
                rows, device_batch, tokens = upcoming
                self.state, metrics = self.step_fn(self.state, frozen, device_batch)
                done = step + 1
                # The next step's rows are collated and placed while this one runs.
                upcoming = self.next_batch(done) if done < self.train_cfg.steps else None
                if pending is not None:
                    self.finish(*pending)
                pending = (step, rows, tokens, metrics)
                stopping = stop.requested or self.ckpt.reached_preemption(done)
                if stopping or done == self.train_cfg.steps or self.ckpt.manager.should_save(
                        done):
                    # Check this step's loss before it can reach a checkpoint.
                    self.finish(*pending)
                    pending = None
                    self.ckpt.save(done, self.state, self.position(done), force=True)
                if stopping:
                    self.ckpt.wait()
                    logging.warning("stop requested: saved step %d in %s; exiting.", done,
                                    self.workdir)
                    stopped_early = True
                    break
            if pending is not None:
                self.finish(*pending)
        return FitResult(trainable=self.state["params"]["model"], params=self.state["params"],
                         step=int(jax.device_get(self.state["step"])),
                         stopped_early=stopped_early, last_metrics=self.last)

    def position(self, step: int) -> dict[str, Any]:
        """The input position saved with the checkpoint of `step` (the schedule's place, and
        Grain's iterator state, which is one step further: the next step is prepared ahead)."""
        return {**self.schedule.position(step), "inputs": self.inputs.state()}

    def close(self) -> None:
        self.inputs.close()
        self.writer.close()
        self.ckpt.close()
