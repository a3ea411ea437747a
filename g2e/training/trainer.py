"""The contrastive training stage: one jitted `train_step`, a plain loop, checkpoints, logs.

State is a plain pytree {'params', 'opt_state', 'step', 'rng'} holding only the trainable
parameters (adapters, or all weights for full fine-tuning) and their optimizer state; the frozen
base weights are a separate, non-donated argument. `fit` is generic over an
`embed_fn(trainable, frozen, batch, rng) -> [b, D]`; `train` binds it to a Qwen2VL.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from g2e.training import batches as batches_lib
from g2e.training import checkpointing, gradcache
from g2e.training import loss as loss_lib
from g2e.training import optimizer as optimizer_lib

PyTree = Any
BATCH_AXES = ("data", "fsdp")

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
    batch_axes: tuple[str, ...] = BATCH_AXES


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
        mesh: Mesh, schedule: batches_lib.ClusterSchedule,
        encode: Callable[[np.ndarray], Mapping[str, Any]], workdir: str, seed: int = 0,
        subsets: Any = None, flops_per_token: float | None = None,
        async_checkpoints: bool = True) -> FitResult:
    """Trains `trainable` for train_cfg.steps steps, resuming from <workdir>/checkpoints.

    Args:
      embed_fn: embeds one chunk, see gradcache.EmbedFn.
      trainable, frozen: parameter pytrees (already placed on `mesh`).
      train_cfg: the `train` config block.
      mesh: device mesh with ('data', 'fsdp', ...) axes.
      schedule: which rows form each step's global batch.
      encode: host function, row ids -> {'query': model batch, 'candidate': model batch} numpy
        (and optionally 'ids': int32 per row, equal for duplicate candidates).
      workdir: checkpoints, train_metrics.jsonl and tensorboard/ go here.
      seed: dropout RNG seed.
      subsets: indexable, row id -> subset name (read only for a failing batch, in the NaN
        error).
      flops_per_token: model FLOPs of one token's forward (2 x parameters) for the MFU estimate.
      async_checkpoints: write checkpoints in the background.

    Returns:
      FitResult; `stopped_early` is True when SIGTERM or a preemption notice ended the run after
      saving a checkpoint.

    Raises:
      FloatingPointError: the loss or gradient norm became NaN/Inf (names step and subsets).
    """
    loss_config = loss_lib.LossConfig.from_config(train_cfg)
    optimizer, lr_schedule = optimizer_lib.make_optimizer(train_cfg)
    groups = math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)
    batch_size = groups * train_cfg.clusters_per_device * train_cfg.cluster_size
    if schedule.batch_size != batch_size:
        raise ValueError(f"fit: the cluster schedule makes batches of {schedule.batch_size} "
                         f"rows but the mesh and train config give {batch_size}.")
    setup = StepSetup(embed_fn=embed_fn, loss_config=loss_config, optimizer=optimizer,
                      schedule=lr_schedule, mesh=mesh, query_chunk=train_cfg.query_chunk,
                      candidate_chunk=train_cfg.candidate_chunk)
    replicated = NamedSharding(mesh, P())
    state = init_state(trainable, optimizer, seed, loss_config)
    state = jax.tree.map(
        lambda x: x if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1
        else jax.device_put(x, replicated), state)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)

    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      keep=train_cfg.keep_checkpoints,
                                      every=train_cfg.checkpoint_every,
                                      async_save=async_checkpoints)
    if ckpt.latest_step() is not None:
        state, position = ckpt.restore(checkpointing.abstract_like(state))
        logging.info("resumed from step %d (loader position %s)", int(state["step"]), position)
    start = int(jax.device_get(state["step"]))

    step_fn = jax.jit(functools.partial(train_step, setup), donate_argnums=(0,),
                      out_shardings=(state_shardings, replicated))
    rows_here = batches_lib.host_rows(mesh, batch_size, BATCH_AXES)

    def host_batch(step: int):
        rows = schedule.rows(step)
        local = rows[rows_here]
        host = dict(encode(local))
        # Candidates with equal ids are duplicates, masked rather than scored as negatives:
        # the encoder may give content ids, else each row is its own.
        host.setdefault("ids", local.astype(np.int32))
        tokens = sum(int(np.sum(host[k]["attention_mask"])) for k in ("query", "candidate")
                     if "attention_mask" in host[k])
        return rows, host, tokens * jax.process_count()

    primary = jax.process_index() == 0
    writer = MetricsWriter(workdir, train_cfg.steps, start, primary)
    prefetch = batches_lib.Prefetcher(host_batch, train_cfg.steps)
    peak = _peak_flops()
    log_every = int(train_cfg.get("log_every", 10))
    pending = None  # (step, rows, tokens, metrics on device): checked one step late
    last: dict[str, float] = {}
    stopped_early = False
    tick = time.perf_counter()

    def finish(pending):
        nonlocal tick, last
        step, rows, tokens, device_metrics = pending
        values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        _check_finite(step, values, rows, subsets)
        now = time.perf_counter()
        elapsed, tick = now - tick, now
        values["pairs_per_s"] = batch_size / elapsed
        values["tokens_per_s"] = tokens / elapsed
        if flops_per_token and peak:
            values["mfu"] = 3 * flops_per_token * tokens / elapsed / (peak * jax.device_count())
        last = values
        if step % log_every == 0 or step + 1 == train_cfg.steps:
            writer.write(step + 1, values)
        writer.advance()

    try:
        with checkpointing.StopSignal() as stop:
            for step in range(start, train_cfg.steps):
                rows, host, tokens = prefetch.get(step)
                device_batch = batches_lib.to_device(host, mesh, batch_size, BATCH_AXES)
                state, metrics = step_fn(state, frozen, device_batch)
                if pending is not None:
                    finish(pending)
                pending = (step, rows, tokens, metrics)
                done = step + 1
                stopping = stop.requested or ckpt.reached_preemption(done)
                if stopping or done == train_cfg.steps or ckpt.manager.should_save(done):
                    # Check this step's loss before it can reach a checkpoint.
                    finish(pending)
                    pending = None
                    ckpt.save(done, state, schedule.position(done), force=True)
                if stopping:
                    ckpt.wait()
                    logging.warning("stop requested: saved step %d in %s; exiting.", done,
                                    workdir)
                    stopped_early = True
                    break
            if pending is not None:
                finish(pending)
    finally:
        prefetch.close()
        writer.close()
        ckpt.close()
    return FitResult(trainable=state["params"]["model"], params=state["params"],
                     step=int(jax.device_get(state["step"])), stopped_early=stopped_early,
                     last_metrics=last)
