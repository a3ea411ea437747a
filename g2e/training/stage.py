"""The training stages: contrastive LoRA/DoRA fine-tuning (docs/method.md §3).

Three stages, one function (`train_stage`) with three settings:
  train               the mine stage's clusters (when `train.use_clusters`), the configured prompt;
  train_random        random batches (every row its own cluster), the configured prompt;
  train_plain_random  random batches and the plain prompt (no system turn, no suffix).
Each reads every training subset's rows and, with clusters, the mine stage's
(`<workdir>/mine/<subset>.clusters.json`); rows that no cluster covers join as single rows, so
no training pair is lost. `train_model` binds the generic loop (`g2e.training.trainer.fit`:
checkpoints and metrics under `<workdir>/<stage>/`, resumed automatically) to Qwen2VL, the rows
and the Processor; the stage then writes the result for the later stages
(`g2e.saving.save_model`): the adapter in PEFT format at `<workdir>/<stage>/adapter`, or, for
full fine-tuning, a Hugging Face checkpoint at `<workdir>/<stage>/hf`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from g2e import layout, mining, saving
from g2e.data import mmeb, prompts
from g2e.data import rows as rows_lib
from g2e.data.errors import BadInputReport
from g2e.data.preprocess import Processor, positive_item, query_item
from g2e.embedding import Embedder
from g2e.models import lora, sharding
from g2e.models.qwen2_vl import VISION_FIELDS
from g2e.pipeline import Pipeline
from g2e.training import batches, gradcache, trainer
from g2e.training import flops as flops_lib
from g2e.training import step as step_lib

PyTree = Any


class Preempted(SystemExit):
    """Training stopped on SIGTERM / a preemption notice after saving a checkpoint."""


def run(pipeline: Pipeline) -> dict[str, Any]:
    """The `train` stage: the mined clusters (when train.use_clusters) and the configured
    prompt; writes under <workdir>/train/."""
    return train_stage(
        pipeline, layout.TRAIN, use_clusters=bool(pipeline.config.train.use_clusters)
    )


def run_random(pipeline: Pipeline) -> dict[str, Any]:
    """The `train_random` stage: the same steps with random batches instead of the mined
    clusters (train.use_clusters=False), the paper's SaHa-vs-in-batch ablation; writes under
    <workdir>/train_random/ for `eval_random`."""
    return train_stage(pipeline, layout.TRAIN_RANDOM, use_clusters=False)


def run_plain_random(pipeline: Pipeline) -> dict[str, Any]:
    """The `train_plain_random` stage: random batches and the plain prompt (no system turn, no
    suffix), the ablation row "fine-tuned, plain prompt"; writes under
    <workdir>/train_plain_random/."""
    return train_stage(
        pipeline, layout.TRAIN_PLAIN_RANDOM, use_clusters=False, prompt=prompts.PLAIN
    )


def _save_trained(pipeline: Pipeline, name: str, model, adapter, result) -> None:
    """Writes the fine-tuned adapter (or the whole model) of stage `name`; a run stopped early
    raises Preempted instead, its checkpoint saved."""
    if result.stopped_early:
        raise Preempted(
            f"{name}: stopped at step {result.step} after saving a checkpoint; "
            "rerun the same command to resume"
        )
    adapter_dir, full_dir = pipeline.trained_paths(name)
    out_dir = full_dir if adapter is None else adapter_dir
    saving.save_model(model, out_dir, base_dir=pipeline.local_dir("model_dir"), adapter=adapter)
    pipeline.forget_model()  # Later stages load the trained model from what was written.


def train_stage(
    pipeline: Pipeline,
    name: str,
    *,
    use_clusters: bool,
    prompt: prompts.PromptOptions | None = None,
) -> dict[str, Any]:
    """One training stage: fine-tunes the base model into <workdir>/<name>/ and writes it there.

    Args:
      pipeline: the run's shared context.
      name: the stage's name and output folder.
      use_clusters: batches of the mine stage's clusters; False: every row its own (random
        in-batch negatives).
      prompt: the prompt options of training and the held-out check (None: config.prompt).

    Returns:
      The summary for DONE.json (steps, final loss, rows, clusters, held-out accuracy).

    Raises:
      Preempted: SIGTERM or a preemption notice stopped the run after a checkpoint.
    """
    config = pipeline.config
    adapter = adapter_config(config)
    model = pipeline.model(trained=False, adapter=adapter)
    rows, clusters = training_rows(pipeline, use_clusters=use_clusters)
    several = sum(len(c) > 1 for c in clusters)
    logging.info(
        "%s: %d rows in %d clusters (%d of several rows)", name, len(rows), len(clusters), several
    )
    heldout = heldout_rows(pipeline)
    evaluate = HeldOut.of_pipeline(pipeline, model, heldout, prompt) if heldout else None
    processor = pipeline.processor(train=True, prompt=prompt)
    try:
        result = train_model(
            config,
            model,
            rows,
            clusters,
            processor,
            pipeline.mesh,
            pipeline.rules,
            str(pipeline.stage_dir(name)),
            workers=pipeline.workers,
            evaluate=evaluate,
        )
    finally:
        if evaluate is not None:
            evaluate.embedder.close()  # its encoding workers
    _save_trained(pipeline, name, model, adapter, result)
    summary = {"steps": result.step, "final_loss": result.last_metrics.get("loss")}
    summary.update(rows=len(rows), clusters=len(clusters), skipped_rows=processor.report.total)
    summary["padding"] = processor.padding_share()
    if processor.report.total:
        logging.warning("%s: rows replaced in their batches: %s", name, processor.report.summary())
    if evaluate is not None:
        summary["heldout_accuracy"] = evaluate.last.get("heldout_accuracy")
    return summary


def adapter_config(config: Any) -> lora.AdapterConfig | None:
    """The train.adapter block as an AdapterConfig; None for full fine-tuning (kind 'none')."""
    adapter = config.train.adapter
    if adapter.kind == "none":
        return None
    return lora.AdapterConfig(
        kind=adapter.kind,
        r=adapter.r,
        alpha=adapter.alpha,
        dropout=adapter.dropout,
        targets=tuple(adapter.targets),
    )


def training_rows(
    pipeline: Pipeline, *, use_clusters: bool = True
) -> tuple[Sequence[mmeb.TrainRow], list[list[int]]]:
    """All training rows (subsets concatenated, read lazily from a TFDS copy) and the clusters
    over them: the mine stage's when `use_clusters`, every row its own otherwise. Rows no mined
    cluster holds train as single rows, or are left out when not train.keep_unclustered_rows
    (the release: only clustered rows train, and only they top up short batches)."""
    config = pipeline.config
    parts: list[Sequence[mmeb.TrainRow]] = []
    offset = 0
    clusters: list[list[int]] = []
    bad = BadInputReport(config.data.on_bad_input)
    for subset in rows_lib.train_subsets(config.data):
        subset_rows = rows_lib.train_rows(
            config.data, subset, bad, cache_dir=rows_lib.arrow_cache_dir(pipeline.workdir)
        )
        path = layout.clusters_file(pipeline.workdir, subset)
        covered = np.zeros(len(subset_rows), bool)
        subset_clusters: list[list[int]] = []
        if use_clusters and path.is_file():
            mined = mining.read_clusters(str(path), subset=subset, num_rows=len(subset_rows))
            subset_clusters = [list(cluster) for cluster in mined.clusters]
            for cluster in mined.clusters:
                covered[cluster] = True
        elif use_clusters:
            logging.warning(
                "train: %s has no clusters (%s); its rows train as single rows", subset, path
            )
        if use_clusters and covered.any() and not config.train.keep_unclustered_rows:
            subset_rows = rows_lib.SampledRows(subset_rows, np.flatnonzero(covered))
            renumbered = np.cumsum(covered) - 1
            subset_clusters = [renumbered[cluster].tolist() for cluster in subset_clusters]
        else:
            subset_clusters += [[int(i)] for i in np.flatnonzero(~covered)]
        clusters += [[offset + int(i) for i in cluster] for cluster in subset_clusters]
        parts.append(subset_rows)
        offset += len(subset_rows)
    if bad.total:
        logging.warning("train: %s", bad.summary())
    return rows_lib.ConcatRows(parts), clusters


def heldout_rows(pipeline: Pipeline) -> list[mmeb.TrainRow]:
    """The held-out slice of every training subset (data.heldout_rows each; [] when 0)."""
    data = pipeline.config.data
    if not data.heldout_rows:
        return []
    bad = BadInputReport(data.on_bad_input)
    return [
        row
        for subset in rows_lib.train_subsets(data)
        for row in rows_lib.train_rows(data, subset, bad, heldout=True)
    ]


class HeldOut:
    """The train stage's held-out check: each held-out query against every held-out positive
    of its subset, embedded (no dropout) with the weights being trained. Metrics: top-1
    accuracy in percent per subset ('heldout/<subset>') and their mean ('heldout_accuracy');
    a candidate identical to the positive (same positive_id) counts as a hit."""

    def __init__(self, model: nnx.Module, rows: Sequence[Any], embedder: Embedder):
        self.model, self.embedder = model, embedder
        self.queries = [query_item(row) for row in rows]
        self.positives = [positive_item(row) for row in rows]
        self.subsets = np.asarray([row.subset for row in rows])
        self.ids = np.stack([batches.positive_id(row) for row in rows])
        self.last: dict[str, float] = {}

    @classmethod
    def of_pipeline(
        cls,
        pipeline: Pipeline,
        model: nnx.Module,
        rows: Sequence[Any],
        prompt: prompts.PromptOptions | None,
    ) -> HeldOut:
        """The check of a training stage: its prompt, the training preprocessing, the
        configured evaluation batch size and workers."""
        image_root = pipeline.config.data.train_image_root or None
        processor = pipeline.processor(train=True, prompt=prompt, image_root=image_root)
        per_device = pipeline.config.eval.batch_size
        return cls(
            model, rows, Embedder.for_stage(pipeline, model, processor, per_device=per_device)
        )

    def __call__(self, step: int) -> dict[str, float]:
        self.embedder.reload(self.model)  # the weights as trained so far
        queries = self.embedder.embed_items(self.queries, desc="held-out queries")
        positives = self.embedder.embed_items(self.positives, desc="held-out positives")
        metrics = {}
        for subset in dict.fromkeys(self.subsets):
            rows = np.flatnonzero(self.subsets == subset)
            best = np.argmax(queries[rows] @ positives[rows].T, axis=1)
            hit = (self.ids[rows][best] == self.ids[rows]).all(axis=-1)
            metrics[f"heldout/{subset}"] = 100.0 * float(hit.mean())
        metrics = {"heldout_accuracy": float(np.mean(list(metrics.values()))), **metrics}
        self.last = metrics
        return metrics


def global_batch_size(train_cfg: Any, mesh: Mesh, rules: sharding.Rules) -> int:
    """Rows of one training step: train.global_batch, whatever the device count.

    Raises:
      ValueError: the devices along the batch axes cannot each take whole clusters of
        train.cluster_size rows (names the keys and what would divide).
    """
    devices = sharding.batch_devices(mesh, rules)
    total, size = int(train_cfg.global_batch), int(train_cfg.cluster_size)
    if total % (devices * size):
        unit = devices * size
        nearest = max(1, round(total / unit)) * unit
        raise ValueError(
            f"--config.train.global_batch={total} does not split into {devices} devices (the "
            f"mesh's batch axes) x whole clusters of --config.train.cluster_size={size}; use a "
            f"multiple of {unit} (e.g. {nearest}), or change the cluster size or the mesh."
        )
    return total


def train_model(
    config: Any,
    model: nnx.Module,
    rows: Sequence[Any],
    clusters: Sequence[Sequence[int]] | None,
    processor: Processor,
    mesh: Mesh,
    rules: sharding.Rules,
    workdir: str,
    workers: int = 0,
    evaluate: Callable[[int], dict[str, float]] | None = None,
) -> trainer.FitResult:
    """Contrastive fine-tuning of `model` in place (docs/method.md §3), resumed from `workdir`;
    returns the trainer.FitResult (the model then holds the trained parameters).

    Args:
      config: the full config (reads train.*, data.train_image_root, seed).
      model: a Qwen2VL, with adapters unless train.adapter.kind == 'none'; already sharded.
      rows: MMEB-train rows (g2e.data.mmeb.TrainRow), indexed by cluster entries.
      clusters: mined clusters (row indices, anchor first), or None to train on single rows.
      processor: the training Processor (train max length, image resolution and prompt).
      mesh, rules: the device mesh and the logical-axis rules (the batch axes).
      workdir: checkpoints, metrics and TensorBoard logs go here.
      workers: Grain processes encoding the rows (0: in this process).
      evaluate: step -> metrics of `model` holding the weights trained so far (e.g. a
        HeldOut), run every train.heldout_every steps and after the last.
    """
    train_cfg = config.train
    graphdef, trainable, frozen = split_model(model, full=train_cfg.adapter.kind == "none")
    trainable, load = _in_float32(model, trainable)
    devices = sharding.batch_devices(mesh, rules)
    prepare_fn, embed_fn = model_step_fns(
        graphdef, devices=devices, vision_chunk=train_cfg.vision_chunk
    )
    adapter = getattr(model, "adapter", None)

    def evaluate_trained(step, trained):
        load(trained)
        return evaluate(step)

    run = trainer.Run(
        embed_fn=embed_fn,
        trainable=trainable,
        frozen=frozen,
        schedule=_schedule(config, rows, clusters, mesh, rules),
        codec=batches.RowCodec(
            processor,
            rows,
            image_root=config.data.train_image_root or None,
            pack_length=config.data.pack_length,
            pack_patches=config.data.pack_patches,
            # A packed pool is chunked with train.query_chunk: its rows a multiple of it.
            row_multiple=sharding.batch_devices(mesh, rules, per_process=True)
            * max(int(config.train.query_chunk), 1),
        ),
        mesh=mesh,
        workdir=workdir,
        rules=rules,
        seed=int(config.seed),
        prepare_fn=prepare_fn,
        workers=workers,
        subsets=_SubsetNames(rows),
        model_flops=lambda host: flops_lib.train_step_flops(model.config, host, adapter),
        evaluate=evaluate_trained if evaluate else None,
    )
    result = trainer.fit(run, train_cfg)
    load(result.trainable)
    return result


def _schedule(
    config: Any,
    rows: Sequence[Any],
    clusters: Sequence[Sequence[int]] | None,
    mesh: Mesh,
    rules: sharding.Rules,
) -> batches.ClusterSchedule:
    """The rows of every step: the clusters (or single rows) packed into global batches."""
    if clusters is None:
        clusters = [[i] for i in range(len(rows))]
    return batches.ClusterSchedule(
        clusters,
        len(rows),
        config.train.cluster_size,
        global_batch_size(config.train, mesh, rules),
        seed=int(config.seed),
    )


def _in_float32(model: nnx.Module, trainable: PyTree) -> tuple[PyTree, Callable[[PyTree], None]]:
    """(the trainable parameters in float32, a function that puts trained ones into `model`).

    Trained parameters and their Adam moments are float32 whatever model.param_dtype; put back,
    adapters stay float32 (their storage dtype) and fully trained weights take their own dtype.
    """
    stored = jax.tree.map(lambda x: x.dtype, trainable)

    def load(trained: PyTree) -> None:
        nnx.update(model, nnx.State(jax.tree.map(lambda x, d: x.astype(d), trained, stored)))

    return jax.tree.map(lambda x: x.astype(jnp.float32), trainable), load


def split_model(model: nnx.Module, *, full: bool) -> tuple[nnx.GraphDef, dict, nnx.State]:
    """(graphdef, trainable as a plain nested dict, frozen State).

    Trainable are the nnx.LoRAParam adapters, or, when `full` (full fine-tuning), every
    nnx.Param of the language model: the vision tower stays frozen either way, since the train
    step computes its tokens once, outside the differentiated passes (model_step_fns).
    """
    weights = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("visual")))
    graphdef, trainable, frozen = nnx.split(model, weights if full else nnx.LoRAParam, ...)
    pure = trainable.to_pure_dict()
    if not jax.tree.leaves(pure):
        raise ValueError(
            "train_model: the model has no adapter parameters; build it with "
            "adapter=AdapterConfig(...) or set --config.train.adapter.kind=none "
            "for full fine-tuning."
        )
    return graphdef, pure, frozen


def model_step_fns(
    graphdef: nnx.GraphDef, *, devices: int = 1, vision_chunk: int = 0
) -> tuple[step_lib.PrepareFn, gradcache.EmbedFn]:
    """(prepare_fn, embed_fn) of a Qwen2VL train step (see g2e.training.step).

    prepare_fn, once per step: the frozen vision tower's tokens of each side
    (`Qwen2VL.vision_tokens`, `vision_chunk` rows of each of the `devices` along the batch
    axes (`sharding.batch_devices`) at a time,
    text-only chunks skipped; the chunk is cut to divide the rows per device) replace the pixel
    fields of the batch, and the DoRA norms join the frozen weights. A packed batch's pool
    (vision rows of their own) keeps its tokens whole beside the frozen weights, since a
    GradCache chunk of text rows may use any vision row.
    embed_fn: the last non-pad token's hidden state, L2-normalised, with adapter dropout on.
    """

    def prepare(trainable, frozen, batch):
        model = nnx.merge(graphdef, nnx.State(trainable), frozen)
        prepared = dict(batch)
        shared = {"state": frozen, "dora_norms": model.dora_norms()}
        for side in ("pool",) if "pool" in batch else ("query", "candidate"):
            fields = dict(batch[side])
            per_device = fields.get("pixel_values", fields["input_ids"]).shape[0] // devices
            chunk = math.gcd(vision_chunk, per_device) if vision_chunk else 0
            tokens = model.vision_tokens(fields, groups=devices, chunk=chunk)
            for key in VISION_FIELDS:
                fields.pop(key, None)
            if tokens is not None:
                (shared if side == "pool" else fields)["vision_tokens"] = tokens
            prepared[side] = fields
        return shared, prepared

    def embed(trainable, prepared, batch, rng):
        model = nnx.merge(graphdef, nnx.State(trainable), prepared["state"])
        fields = dict(batch)
        tokens = fields.pop("vision_tokens", prepared.get("vision_tokens"))
        embeddings = model.embed(
            fields,
            deterministic=False,
            rng=rng,
            vision_tokens=tokens,
            dora_norms=prepared["dora_norms"],
        )
        return embeddings.reshape(-1, embeddings.shape[-1])  # packed: [rows * S, D]

    return prepare, embed


class _SubsetNames:
    """rows[i].subset on demand: only a failing batch's rows are read (rows may be lazy)."""

    def __init__(self, rows: Sequence[Any]):
        self._rows = rows

    def __getitem__(self, index: int) -> str:
        return self._rows[int(index)].subset
