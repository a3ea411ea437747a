"""The contrastive train loop: one jitted `train_step`, a plain loop, checkpoints, logs.

State is a plain pytree {'params', 'opt_state', 'step', 'rng'} holding only the trainable
parameters (adapters, or all weights for full fine-tuning) and their optimizer state; the frozen
base weights are a separate, non-donated argument. `fit` is generic over an
`embed_fn(trainable, frozen, batch, rng) -> [b, D]` (and an optional once-per-step
`prepare_fn`); the train stage (`g2e.training.stage.train_model`) binds them to a Qwen2VL. The
step itself, and how it is compiled, is `g2e.training.step`.

Each logged step carries pairs/s and tokens/s and, where the device's peak is known, MFU (the
model FLOPs of `model_flops`, g2e.training.flops) and HFU (the compiled step's own FLOPs,
recomputation included).
"""

from __future__ import annotations

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

from g2e import distributed
from g2e.models import sharding
from g2e.training import batches as batches_lib
from g2e.training import checkpointing, gradcache
from g2e.training import flops as flops_lib
from g2e.training import loss as loss_lib
from g2e.training import optimizer as optimizer_lib
from g2e.training import step as step_lib

PyTree = Any
# (step, trainable parameters) -> metrics; see `fit`.
Evaluate = Callable[[int, PyTree], Mapping[str, float]]


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
        self.bar = tqdm.tqdm(
            total=total_steps, initial=start_step, desc="train", dynamic_ncols=True
        )

    def write(self, step: int, metrics: Mapping[str, float]):
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


def _check_finite(step: int, metrics: Mapping[str, float], rows: np.ndarray, subsets: Any):
    bad = [k for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])]
    if bad:
        names = sorted({subsets[r] for r in rows}) if subsets is not None else ["(unknown)"]
        raise FloatingPointError(
            f"training step {step}: {', '.join(f'{k}={metrics[k]}' for k in bad)}; subsets in "
            f"the batch: {', '.join(names)}. Lower train.lr or check these subsets' rows; the "
            "last checkpoint is untouched."
        )


def fit(
    embed_fn: gradcache.EmbedFn,
    trainable: PyTree,
    frozen: PyTree,
    *,
    train_cfg: Any,
    mesh: Mesh,
    schedule: batches_lib.ClusterSchedule,
    codec: batches_lib.RowCodec,
    workdir: str,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
    seed: int = 0,
    subsets: Any = None,
    model_flops: Callable[[Mapping[str, Any]], float] | None = None,
    prepare_fn: step_lib.PrepareFn | None = None,
    async_checkpoints: bool = True,
    workers: int = 0,
    evaluate: Evaluate | None = None,
    evaluate_every: int = 0,
) -> FitResult:
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
      model_flops: host batch (this process's rows) -> model FLOPs of its step, for MFU
        (g2e.training.flops.train_step_flops); None logs no MFU.
      prepare_fn: once-per-step work before the chunks (see g2e.training.step).
      async_checkpoints: write checkpoints in the background.
      workers: Grain worker processes encoding rows (0: in this process).
      evaluate: (step, trainable) -> metrics, run on every process after every
        `evaluate_every` steps and after the last; process 0 adds them to
        train_metrics.jsonl ({"step": ..., metric: value, ...} lines of their own).

    Returns:
      FitResult; `stopped_early` is True when SIGTERM or a preemption notice ended the run after
      saving a checkpoint.

    Raises:
      FloatingPointError: the loss or gradient norm became NaN/Inf (names step and subsets).
    """
    loss_config = loss_lib.LossConfig.from_config(train_cfg)
    optimizer, lr_schedule = optimizer_lib.make_optimizer(train_cfg)
    setup = step_lib.StepSetup(
        embed_fn=embed_fn,
        loss_config=loss_config,
        optimizer=optimizer,
        schedule=lr_schedule,
        mesh=mesh,
        query_chunk=0,
        candidate_chunk=0,
        batch_axes=sharding.batch_axes(rules, mesh.axis_names),
        prepare_fn=prepare_fn,
    )
    state = _placed(step_lib.init_state(trainable, optimizer, seed, loss_config), mesh)
    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=train_cfg.keep_checkpoints,
        every=train_cfg.checkpoint_every,
        async_save=async_checkpoints,
    )
    if ckpt.latest_step() is not None:
        state, position = ckpt.restore(checkpointing.abstract_like(state))
        logging.info("resumed from step %d (loader position %s)", int(state["step"]), position)
    try:
        loop = _Loop(
            setup,
            state,
            train_cfg,
            schedule,
            codec,
            rules,
            ckpt,
            workdir,
            subsets,
            model_flops,
            workers,
            evaluate,
            evaluate_every,
        )
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
        lambda x: (
            x
            if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1
            else jax.device_put(x, replicated)
        ),
        state,
    )


class _Loop:
    """The steps of `fit`: the next host batch prepared while a step runs, the jitted step,
    checks one step late, metrics, checkpoints and the stop signal."""

    def __init__(
        self,
        setup: step_lib.StepSetup,
        state: PyTree,
        train_cfg: Any,
        schedule: batches_lib.ClusterSchedule,
        codec: batches_lib.RowCodec,
        rules: sharding.Rules,
        ckpt: checkpointing.Checkpointer,
        workdir: str,
        subsets: Any,
        model_flops: Callable[[Mapping[str, Any]], float] | None,
        workers: int,
        evaluate: Evaluate | None,
        evaluate_every: int,
    ):
        self.setup, self.state, self.train_cfg = setup, state, train_cfg
        self.schedule, self.rules = schedule, rules
        self.ckpt, self.workdir, self.subsets = ckpt, workdir, subsets
        self.model_flops, self.peak = model_flops, flops_lib.peak_flops()
        self.evaluate, self.evaluate_every = evaluate, evaluate_every
        self.batch_size = schedule.batch_size
        self.start = int(jax.device_get(state["step"]))
        self.steps = step_lib.CompiledSteps(
            setup,
            jax.tree.map(lambda x: x.sharding, state),
            backprop=train_cfg.get("backprop", "auto"),
            query_chunk=int(train_cfg.get("query_chunk", 0)),
            candidate_chunk=int(train_cfg.get("candidate_chunk", 0)),
            memory_limit=step_lib.device_memory_limit(train_cfg.get("memory_limit_gb", 0.0)),
            rules=rules,
        )
        self.inputs = batches_lib.StepInputs(
            schedule,
            codec,
            rows_here=distributed.local_row_range(setup.mesh, rules, self.batch_size),
            first_step=self.start,
            last_step=train_cfg.steps,
            workers=workers,
        )
        self.writer = MetricsWriter(workdir, train_cfg.steps, self.start, jax.process_index() == 0)
        self.log_every = int(train_cfg.get("log_every", 10))
        self.last: dict[str, float] = {}
        self.tick = time.perf_counter()

    def next_batch(self, step: int) -> tuple[np.ndarray, Any, int, float]:
        """(global row ids, the step's global device batch, tokens in it, its model FLOPs)."""
        rows, local, shape = self.inputs.prepare(step)
        host = self.inputs.agree(local, shape)
        tokens = sum(
            int(np.sum(host[k]["attention_mask"]))
            for k in ("query", "candidate")
            if "attention_mask" in host[k]
        )
        model_flops = self.model_flops(host) * jax.process_count() if self.model_flops else 0.0
        device_batch = distributed.put_batch(
            host, self.setup.mesh, self.rules, global_rows=self.batch_size
        )
        return rows, device_batch, tokens * jax.process_count(), model_flops

    def finish(
        self, step: int, rows: np.ndarray, tokens: int, work: tuple[float, float], device_metrics
    ) -> None:
        """Fetches a step's metrics, stops on NaN, logs them.

        work: (the step's model FLOPs over all devices, its hardware FLOPs per device).
        """
        values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        _check_finite(step, values, rows, self.subsets)
        now = time.perf_counter()
        elapsed, self.tick = now - self.tick, now
        values["pairs_per_s"] = self.batch_size / elapsed
        values["tokens_per_s"] = tokens / elapsed
        # FLOPs of the whole step over every device; MFU and HFU where the peak is known.
        values["model_flops"] = work[0]
        values["hardware_flops"] = work[1] * jax.device_count()
        if self.peak:
            for name, key in (("mfu", "model_flops"), ("hfu", "hardware_flops")):
                values[name] = values[key] / elapsed / (self.peak * jax.device_count())
        self.last = values
        if step % self.log_every == 0 or step + 1 == self.train_cfg.steps:
            self.writer.write(step + 1, values)
        self.writer.advance()

    def run(self, frozen: PyTree) -> FitResult:
        pending = None  # (step, rows, tokens, work, metrics on device): checked one step late
        stopped_early = False
        upcoming = self.next_batch(self.start) if self.start < self.train_cfg.steps else None
        with checkpointing.StopSignal() as stop:
            for step in range(self.start, self.train_cfg.steps):
                rows, device_batch, tokens, model_flops = upcoming
                compiled = self.steps.get(self.state, frozen, device_batch)
                self.state, metrics = compiled.executable(self.state, frozen, device_batch)
                done = step + 1
                # The next step's rows are collated and placed while this one runs.
                upcoming = self.next_batch(done) if done < self.train_cfg.steps else None
                if pending is not None:
                    self.finish(*pending)
                pending = (step, rows, tokens, (model_flops, compiled.hardware_flops), metrics)
                last = done == self.train_cfg.steps
                evaluating = self.evaluate is not None and (
                    last or (self.evaluate_every and done % self.evaluate_every == 0)
                )
                stopping = stop.requested or self.ckpt.reached_preemption(done)
                saving = stopping or last or self.ckpt.manager.should_save(done)
                if evaluating or saving:
                    # Check this step's loss before it is evaluated or reaches a checkpoint.
                    self.finish(*pending)
                    pending = None
                if evaluating:
                    self.writer.write(done, self.evaluate(done, self.state["params"]["model"]))
                if saving:
                    self.ckpt.save(done, self.state, self.position(done), force=True)
                if stopping:
                    self.ckpt.wait()
                    logging.warning(
                        "stop requested: saved step %d in %s; exiting.", done, self.workdir
                    )
                    stopped_early = True
                    break
            if pending is not None:
                self.finish(*pending)
        return FitResult(
            trainable=self.state["params"]["model"],
            params=self.state["params"],
            step=int(jax.device_get(self.state["step"])),
            stopped_early=stopped_early,
            last_metrics=self.last,
        )

    def position(self, step: int) -> dict[str, Any]:
        """The input position saved with the checkpoint of `step` (the schedule's place, and
        Grain's iterator state, which is one step further: the next step is prepared ahead)."""
        return {**self.schedule.position(step), "inputs": self.inputs.state()}

    def close(self) -> None:
        self.inputs.close()
        self.writer.close()
        self.ckpt.close()
