"""The contrastive train loop, top to bottom: `fit(run, train_cfg)`.

The module reads in the order of a step, in sections (as big_vision's trainers do):
  input pipeline       the schedule's rows of each step, encoded by Grain workers
                       (batches.StepInputs), agreed across processes and placed on the mesh;
  model and optimizer  AdamW over the trainable parameters and the train state, a plain pytree
                       {'params', 'opt_state', 'step', 'rng'} (step.init_state); the frozen base
                       weights are a separate, non-donated argument;
  sharding, transfer   the state replicated on the mesh where it is not already spread over it;
  update step          step.train_step, jitted with the state donated and its shardings as
                       out_shardings, compiled per batch shape, direct or GradCache
                       (step.CompiledSteps, `train.backprop`);
  checkpoint           Orbax under <workdir>/checkpoints, resumed automatically, with the Grain
                       iterator state beside the train state (bitwise resume);
  metrics              train_metrics.jsonl, TensorBoard and a progress bar (process 0): loss,
                       accuracy, norms, pairs/s, tokens/s, model / hardware FLOPs, MFU / HFU;
  loop                 the next batch prepared while a step runs, each step's loss checked one
                       step late (before anything evaluates or saves it), held-out evaluation,
                       checkpoints, SIGTERM / preemption.

`fit` is generic over an `embed_fn(trainable, frozen, batch, rng) -> [b, D]` (and an optional
once-per-step `prepare_fn`), given in a `Run`; the train stage (`g2e.training.stage.train_model`)
binds them to a Qwen2VL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from g2e import distributed, killpoints
from g2e.models import sharding
from g2e.training import batches, checkpointing, gradcache
from g2e.training import flops as flops_lib
from g2e.training import loss as loss_lib
from g2e.training import optimizer as optimizer_lib
from g2e.training import step as step_lib

PyTree = Any
# (step, trainable parameters) -> metrics; see `Run.evaluate`.
Evaluate = Callable[[int, PyTree], Mapping[str, float]]


@dataclasses.dataclass
class Run:
    """What one training run trains, on which rows, and where (the `train` config aside).

    embed_fn: embeds one chunk (gradcache.EmbedFn).
    trainable, frozen: parameter pytrees, already placed on `mesh`.
    schedule: which rows form each step's global batch (its batch_size rows).
    codec: row ids -> host batches {'query', 'candidate', 'ids'} (batches.RowCodec, or an object
      with its four methods); its `encode` runs in `workers` Grain processes.
    mesh, rules: the device mesh and the logical-axis rules (the 'batch' rule names the mesh
      axes the batch is split over).
    workdir: checkpoints, train_metrics.jsonl and tensorboard/ go here.
    seed: dropout RNG seed.
    prepare_fn: once-per-step work before the chunks (see g2e.training.step).
    workers: Grain worker processes encoding rows (0: in this process).
    subsets: indexable, row id -> subset name (read only for a failing batch, in the NaN error).
    model_flops: host batch (this process's rows) -> model FLOPs of its step, for MFU
      (g2e.training.flops.train_step_flops); None logs no MFU.
    evaluate: (step, trainable) -> metrics, run on every process after every
      train.heldout_every steps and after the last; process 0 adds them to
      train_metrics.jsonl ({"step": ..., metric: value, ...} lines of their own).
    async_checkpoints: write checkpoints in the background.
    """

    embed_fn: gradcache.EmbedFn
    trainable: PyTree
    frozen: PyTree
    schedule: batches.ClusterSchedule
    codec: batches.RowCodec
    mesh: Mesh
    rules: sharding.Rules
    workdir: str
    seed: int = 0
    prepare_fn: step_lib.PrepareFn | None = None
    workers: int = 0
    subsets: Any = None
    model_flops: Callable[[Mapping[str, Any]], float] | None = None
    evaluate: Evaluate | None = None
    async_checkpoints: bool = True


@dataclasses.dataclass
class FitResult:
    """What `fit` returns: the trained parameters and how the run ended."""

    trainable: PyTree
    params: PyTree
    step: int
    stopped_early: bool
    last_metrics: dict[str, float]


# ---------------------------------------------------------------------------------------------
# Input pipeline.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Batch:
    """One step's input: global row ids, the device batch, its tokens and model FLOPs."""

    rows: np.ndarray
    device: Any
    tokens: int
    model_flops: float
    stop_agreed: bool = False  # some process asked to stop before this step (all agree)


def _step_inputs(run: Run, first_step: int, last_step: int) -> batches.StepInputs:
    """This process's rows of steps first_step..last_step, encoded ahead by Grain workers."""
    return batches.StepInputs(
        run.schedule,
        run.codec,
        rows_here=distributed.local_row_range(run.mesh, run.rules, run.schedule.batch_size),
        first_step=first_step,
        last_step=last_step,
        workers=run.workers,
    )


def _next_batch(run: Run, inputs: batches.StepInputs, step: int, stop_requested: bool) -> _Batch:
    """The rows of `step` encoded, widened to the shape all processes agree on, placed; with
    whether any process asked to stop (agreed in the same collective).

    Raises:
      ValueError: a process met a bad row of `step` (on every process, with its message).
    """
    prepared = inputs.prepare(step)
    host, stop = inputs.agree(prepared, stop_requested=stop_requested)
    tokens = sum(
        int(np.sum(host[side]["attention_mask"]))
        for side in ("pool", "query", "candidate")
        if side in host and "attention_mask" in host[side]
    )
    model_flops = run.model_flops(host) * jax.process_count() if run.model_flops else 0.0
    # Every process holds an equal share (local_row_range) of each field's rows: the pairs'
    # fields (ids, <side>_place) and the sides' rows, which packed rows make fewer.
    device = distributed.put_batch(host, run.mesh, run.rules)
    return _Batch(prepared.rows, device, tokens * jax.process_count(), model_flops, stop)


def _position(run: Run, inputs: batches.StepInputs, step: int) -> dict[str, Any]:
    """The input position saved with the checkpoint of `step` (the schedule's place, and
    Grain's iterator state, which is one step further: the next step is prepared ahead)."""
    return {**run.schedule.position(step), "inputs": inputs.state()}


# ---------------------------------------------------------------------------------------------
# Model and optimizer; sharding and transfer.
# ---------------------------------------------------------------------------------------------


def _placed(state: PyTree, mesh: Mesh) -> PyTree:
    """The train state with every array not already spread over the mesh replicated on it."""
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda x: (
            x
            if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1
            else jax.device_put(x, replicated)
        ),
        state,
    )


# ---------------------------------------------------------------------------------------------
# Checkpoint.
# ---------------------------------------------------------------------------------------------


def _resume(ckpt: checkpointing.Checkpointer, state: PyTree) -> PyTree:
    """The latest checkpoint's state, laid out like `state`; `state` itself without one."""
    if ckpt.latest_step() is None:
        return state
    state, position = ckpt.restore(checkpointing.abstract_like(state))
    logging.info("resumed from step %d (loader position %s)", int(state["step"]), position)
    return state


# ---------------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------------


class MetricsWriter:
    """Per-step metrics: fetched one step late, checked for NaN, timed; JSONL + TensorBoard
    (tensorboardX) + progress bar, written by process 0 only."""

    def __init__(self, run: Run, train_cfg: Any, start_step: int):
        self.enabled = jax.process_index() == 0
        self.subsets, self.batch_size = run.subsets, run.schedule.batch_size
        self.total_steps, self.log_every = int(train_cfg.steps), int(train_cfg.log_every)
        self.peak = flops_lib.peak_flops()
        self.last: dict[str, float] = {}
        self.tick = time.perf_counter()
        if not self.enabled:
            return
        import tensorboardX
        import tqdm

        os.makedirs(run.workdir, exist_ok=True)
        self.jsonl = open(os.path.join(run.workdir, "train_metrics.jsonl"), "a")
        self.tb = tensorboardX.SummaryWriter(os.path.join(run.workdir, "tensorboard"))
        self.bar = tqdm.tqdm(
            total=self.total_steps, initial=start_step, desc="train", dynamic_ncols=True
        )

    def step_done(self, step: int, batch: _Batch, hardware_flops: float, device_metrics) -> None:
        """Fetches step `step`'s metrics, stops on NaN, adds throughput and FLOPs, logs them.

        hardware_flops: the compiled step's FLOPs per device.
        """
        values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        _check_finite(step, values, batch.rows, self.subsets)
        now = time.perf_counter()
        elapsed, self.tick = now - self.tick, now
        values["pairs_per_s"] = self.batch_size / elapsed
        values["tokens_per_s"] = batch.tokens / elapsed
        # FLOPs of the whole step over every device; MFU and HFU where the peak is known.
        values["model_flops"] = batch.model_flops
        values["hardware_flops"] = hardware_flops * jax.device_count()
        if self.peak:
            for name, key in (("mfu", "model_flops"), ("hfu", "hardware_flops")):
                values[name] = values[key] / elapsed / (self.peak * jax.device_count())
        self.last = values
        if step % self.log_every == 0 or step + 1 == self.total_steps:
            self.write(step + 1, values)
        if self.enabled:
            self.bar.update(1)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """One JSONL line {"step": step, **metrics}, and the same scalars to TensorBoard."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            self.tb.add_scalar(f"train/{key}", value, step)
        if "loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}")
        else:
            logging.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
            self.bar.close()


def _check_finite(step: int, metrics: Mapping[str, float], rows: np.ndarray, subsets: Any):
    bad = [k for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])]
    if bad:
        names = sorted({subsets[r] for r in rows}) if subsets is not None else ["(unknown)"]
        raise FloatingPointError(
            f"training step {step}: {', '.join(f'{k}={metrics[k]}' for k in bad)}; subsets in "
            f"the batch: {', '.join(names)}. Lower train.lr or check these subsets' rows; the "
            "last checkpoint is untouched."
        )


# ---------------------------------------------------------------------------------------------
# fit: the sections in order, then the loop.
# ---------------------------------------------------------------------------------------------


def fit(run: Run, train_cfg: Any) -> FitResult:
    """Trains `run.trainable` for train_cfg.steps steps, resuming from <workdir>/checkpoints.

    Args:
      run: what is trained, on which rows, where (see Run).
      train_cfg: the `train` config block (every key of configuration.base_config's).

    Returns:
      FitResult; `stopped_early` is True when SIGTERM or a preemption notice ended the run after
      saving a checkpoint.

    Raises:
      FloatingPointError: the loss or gradient norm became NaN/Inf (names step and subsets).
    """
    # Model and optimizer.
    loss_config = loss_lib.LossConfig.from_config(train_cfg)
    optimizer, lr_schedule = optimizer_lib.make_optimizer(train_cfg)
    state = step_lib.init_state(run.trainable, optimizer, run.seed, loss_config)
    # Sharding and transfer.
    state = _placed(state, run.mesh)
    # Update step.
    setup = step_lib.StepSetup(
        embed_fn=run.embed_fn,
        loss_config=loss_config,
        optimizer=optimizer,
        schedule=lr_schedule,
        mesh=run.mesh,
        rules=run.rules,
        prepare_fn=run.prepare_fn,
    )
    steps = step_lib.CompiledSteps(
        setup,
        jax.tree.map(lambda x: x.sharding, state),
        backprop=train_cfg.backprop,
        query_chunk=int(train_cfg.query_chunk),
        candidate_chunk=int(train_cfg.candidate_chunk),
        memory_limit=step_lib.device_memory_limit(train_cfg.memory_limit_gb),
    )
    with contextlib.ExitStack() as closing:
        # Checkpoint.
        ckpt = checkpointing.Checkpointer(
            os.path.join(run.workdir, "checkpoints"),
            keep=train_cfg.keep_checkpoints,
            every=train_cfg.checkpoint_every,
            async_save=run.async_checkpoints,
        )
        closing.callback(ckpt.close)
        state = _resume(ckpt, state)
        start = int(jax.device_get(state["step"]))
        # Input pipeline, from the step the run is at.
        inputs = _step_inputs(run, start, train_cfg.steps)
        closing.callback(inputs.close)
        metrics = MetricsWriter(run, train_cfg, start)
        closing.callback(metrics.close)
        return _loop(run, train_cfg, state, steps, inputs, ckpt, metrics)


def _loop(
    run: Run,
    train_cfg: Any,
    state: PyTree,
    steps: step_lib.CompiledSteps,
    inputs: batches.StepInputs,
    ckpt: checkpointing.Checkpointer,
    metrics: MetricsWriter,
) -> FitResult:
    """The steps from the state's own to train_cfg.steps (see the module docstring)."""
    start, total = int(jax.device_get(state["step"])), int(train_cfg.steps)
    evaluate_every = int(train_cfg.heldout_every)
    pending = None  # (step, batch, hardware FLOPs, metrics on device): checked one step late
    stopped_early = False
    with checkpointing.StopSignal() as stop:
        upcoming = _next_batch(run, inputs, start, stop.requested) if start < total else None
        for step in range(start, total):
            batch = upcoming
            compiled = steps.get(state, run.frozen, batch.device)
            state, device_metrics = compiled.executable(state, run.frozen, batch.device)
            done = step + 1
            # The next step's rows are collated and placed while this one runs.
            upcoming = _next_batch(run, inputs, done, stop.requested) if done < total else None
            if pending is not None:
                metrics.step_done(*pending)
            pending = (step, batch, compiled.hardware_flops, device_metrics)
            evaluating = run.evaluate is not None and (
                done == total or (evaluate_every and done % evaluate_every == 0)
            )
            # Every process takes the same decision: a signal seen by any process reaches all
            # through the next batch's agreement, and SIGTERM where JAX's preemption notifier
            # handles it through its multi-host sync point (the step all processes reach).
            stopping = (upcoming is not None and upcoming.stop_agreed) or ckpt.reached_preemption(
                done
            )
            saving = stopping or done == total or ckpt.manager.should_save(done)
            if evaluating or saving:
                # Check this step's loss before it is evaluated or reaches a checkpoint.
                metrics.step_done(*pending)
                pending = None
            if evaluating:
                metrics.write(done, run.evaluate(done, state["params"]["model"]))
            if saving:
                ckpt.save(done, state, _position(run, inputs, done), force=True)
            killpoints.reached(f"train_step_{done}")
            if stopping:
                ckpt.wait()
                logging.warning("stop requested: saved step %d in %s; exiting.", done, run.workdir)
                stopped_early = True
                break
        if pending is not None:
            metrics.step_done(*pending)
    logging.info(
        "train: %d step programs compiled for %d batch shapes",
        steps.compilations,
        steps.shapes,
    )
    return FitResult(
        trainable=state["params"]["model"],
        params=state["params"],
        step=int(jax.device_get(state["step"])),
        stopped_early=stopped_early,
        last_metrics=metrics.last,
    )
