"""The `train` stage: contrastive LoRA/DoRA fine-tuning on the mined clusters (docs/method.md §3).

Reads every training subset's rows and, when `train.use_clusters`, the mine stage's clusters
(`<workdir>/mine/<subset>.clusters.json`); rows that no cluster covers join as single rows, so
no training pair is lost. `train_model` binds the generic loop (`g2e.training.trainer.fit`:
checkpoints and metrics under `<workdir>/train/`, resumed automatically) to Qwen2VL, the rows
and the Processor; the stage then writes the result for the later stages: the adapter in PEFT
format at `<workdir>/train/adapter`, or, for full fine-tuning, a Hugging Face checkpoint at
`<workdir>/train/hf`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from g2e import distributed, layout, mining
from g2e.data import mmeb, prompts
from g2e.data import rows as rows_lib
from g2e.data.errors import BadInputReport
from g2e.data.images import image_key
from g2e.data.preprocess import Processor, positive_item, query_item
from g2e.embedding import Embedder
from g2e.models import hf_io, lora, peft, sharding
from g2e.models.qwen2_vl import VISION_FIELDS
from g2e.pipeline import Pipeline
from g2e.training import batches, flops, gradcache, trainer
from g2e.training import step as step_lib


class Preempted(SystemExit):
    """Training stopped on SIGTERM / a preemption notice after saving a checkpoint."""


def run(pipeline: Pipeline) -> dict[str, Any]:
    """Runs the stage; returns the summary for DONE.json. Raises Preempted when stopped early."""
    return _train(pipeline, "train", use_clusters=bool(pipeline.config.train.use_clusters))


def run_random(pipeline: Pipeline) -> dict[str, Any]:
    """The `train_random` stage: the same steps with random batches instead of the mined
    clusters (train.use_clusters=False), the paper's SaHa-vs-in-batch ablation; writes under
    <workdir>/train_random/ for `eval_random`."""
    return _train(pipeline, "train_random", use_clusters=False)


def run_plain_random(pipeline: Pipeline) -> dict[str, Any]:
    """The `train_plain_random` stage: random batches with the plain prompt (no system turn, no
    suffix), the paper's in-batch baseline; writes under <workdir>/train_plain_random/ for
    `eval_plain_random`."""
    plain = prompts.PromptOptions(system=False, suffix=False)
    return _train(pipeline, "train_plain_random", use_clusters=False, prompt=plain)


def _train(
    pipeline: Pipeline,
    stage: str,
    *,
    use_clusters: bool,
    prompt: prompts.PromptOptions | None = None,
) -> dict[str, Any]:
    config = pipeline.config
    adapter = adapter_config(config)
    model = pipeline.model(trained=False, adapter=adapter)
    rows, clusters = training_rows(pipeline, use_clusters=use_clusters)
    logging.info(
        "%s: %d rows in %d clusters (%d of several rows)",
        stage,
        len(rows),
        len(clusters),
        sum(len(c) > 1 for c in clusters),
    )
    processor = pipeline.processor(train=True, prompt=prompt)
    heldout = heldout_rows(pipeline)
    evaluate = None
    if heldout:
        evaluate = HeldOut(
            model,
            heldout,
            pipeline.processor(
                train=True, prompt=prompt, image_root=config.data.train_image_root or None
            ),
            mesh=pipeline.mesh,
            rules=pipeline.rules,
            batch_size=config.eval.batch_size,
            workers=pipeline.workers,
        )
    result = train_model(
        config,
        model,
        rows,
        clusters,
        processor,
        pipeline.mesh,
        pipeline.rules,
        str(pipeline.workdir / stage),
        workers=pipeline.workers,
        evaluate=evaluate,
    )
    if result.stopped_early:
        raise Preempted(
            f"{stage}: stopped at step {result.step} after saving a checkpoint; "
            "rerun the same command to resume"
        )
    # The weights may be sharded across hosts: every process takes part in gathering them,
    # process 0 writes.
    adapter_dir, full_dir = pipeline.trained_paths(stage)
    if adapter is not None:
        distributed.write_on_primary(
            adapter_dir,
            lambda tmp: peft.save_peft_adapter(model, adapter, tmp, base_model=config.model_dir),
        )
    else:

        def write(tmp):
            hf_io.save_hf(model, tmp)
            if tmp is not None:
                hf_io.copy_assets(config.model_dir, tmp)

        distributed.write_on_primary(full_dir, write)
    pipeline.forget_model()  # Later stages load the trained model from what was written.
    summary = {
        "steps": result.step,
        "final_loss": result.last_metrics.get("loss"),
        "rows": len(rows),
        "clusters": len(clusters),
    }
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
        subset_rows = rows_lib.train_rows(config.data, subset, bad)
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

    def __init__(
        self,
        model: nnx.Module,
        rows: Sequence[Any],
        processor: Processor,
        *,
        mesh: Mesh,
        rules: sharding.Rules,
        batch_size: int,
        workers: int,
    ):
        self.model = model
        self.embedder = Embedder(
            model,
            processor,
            mesh=mesh,
            rules=rules,
            batch_size=batch_size,
            progress=False,
            workers=workers,
        )
        self.queries = [query_item(row) for row in rows]
        self.positives = [positive_item(row) for row in rows]
        self.subsets = np.asarray([row.subset for row in rows])
        self.ids = np.stack([positive_id(row) for row in rows])
        self.last: dict[str, float] = {}

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
    groups = batch_groups(mesh, rules)
    total, size = int(train_cfg.global_batch), int(train_cfg.cluster_size)
    if total % (groups * size):
        unit = groups * size
        nearest = max(1, round(total / unit)) * unit
        raise ValueError(
            f"--config.train.global_batch={total} does not split into {groups} devices (the "
            f"mesh's batch axes) x whole clusters of --config.train.cluster_size={size}; use a "
            f"multiple of {groups * size} (e.g. {nearest}), or change the cluster size or the "
            "mesh."
        )
    return total


def batch_groups(mesh: Mesh, rules: sharding.Rules) -> int:
    """Devices the batch is split over (the mesh axes of the 'batch' rule)."""
    return int(np.prod([mesh.shape[a] for a in sharding.batch_axes(rules, mesh.axis_names)]))


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
    """Contrastive fine-tuning of `model` in place (docs/method.md §3); resumes from `workdir`.

    Args:
      config: the full config (reads train.*, data.train_image_root, seed).
      model: a Qwen2VL, with adapters unless train.adapter.kind == 'none'; already sharded.
      rows: MMEB-train rows (g2e.data.mmeb.TrainRow), indexed by cluster entries.
      clusters: mined clusters (row indices, anchor first), or None to train on single rows.
      processor: the training Processor (train max length and image resolution).
      mesh, rules: the device mesh and the logical-axis rules (the batch axes).
      workdir: checkpoints, metrics and TensorBoard logs go here.
      workers: Grain processes encoding the rows (0: in this process).
      evaluate: step -> metrics of `model` holding the weights trained so far (e.g. a
        HeldOut), run every train.heldout_every steps and after the last.

    Returns:
      trainer.FitResult; the model's parameters are updated to the trained ones.
    """
    train_cfg = config.train
    full = train_cfg.adapter.kind == "none"
    graphdef, trainable, frozen = split_model(model, full=full)
    stored = jax.tree.map(lambda x: x.dtype, trainable)
    # Trained parameters and their Adam moments are float32 whatever model.param_dtype.
    trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
    if clusters is None:
        clusters = [[i] for i in range(len(rows))]
    schedule = batches.ClusterSchedule(
        clusters,
        len(rows),
        train_cfg.cluster_size,
        global_batch_size(train_cfg, mesh, rules),
        seed=int(config.seed),
    )
    codec = RowCodec(processor, rows, image_root=config.data.train_image_root or None)
    prepare_fn, embed_fn = model_step_fns(
        graphdef,
        groups=batch_groups(mesh, rules),
        vision_chunk=int(train_cfg.get("vision_chunk", 0)),
    )
    adapter = getattr(model, "adapter", None)

    def load(trained):
        # Adapters stay float32 (their storage dtype); fully trained weights go back to theirs.
        nnx.update(model, nnx.State(jax.tree.map(lambda x, d: x.astype(d), trained, stored)))

    def evaluate_trained(step, trained):
        load(trained)
        return evaluate(step)

    result = trainer.fit(
        embed_fn,
        trainable,
        frozen,
        train_cfg=train_cfg,
        mesh=mesh,
        rules=rules,
        schedule=schedule,
        codec=codec,
        workdir=workdir,
        seed=int(config.seed),
        subsets=_SubsetNames(rows),
        model_flops=lambda host: flops.train_step_flops(model.config, host, adapter),
        prepare_fn=prepare_fn,
        workers=workers,
        evaluate=evaluate_trained if evaluate else None,
        evaluate_every=int(train_cfg.get("heldout_every", 0)),
    )
    load(result.trainable)
    return result


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
    graphdef: nnx.GraphDef, *, groups: int = 1, vision_chunk: int = 0
) -> tuple[step_lib.PrepareFn, gradcache.EmbedFn]:
    """(prepare_fn, embed_fn) of a Qwen2VL train step (see g2e.training.step).

    prepare_fn, once per step: the frozen vision tower's tokens of each side
    (`Qwen2VL.vision_tokens`, `vision_chunk` rows of each of the `groups` devices at a time,
    text-only chunks skipped; the chunk is cut to divide the rows per device) replace the pixel
    fields of the batch, and the DoRA norms join the frozen weights.
    embed_fn: the last non-pad token's hidden state, L2-normalised, with adapter dropout on.
    """

    def prepare(trainable, frozen, batch):
        model = nnx.merge(graphdef, nnx.State(trainable), frozen)
        prepared = dict(batch)
        for side in ("query", "candidate"):
            fields = dict(batch[side])
            per_device = fields["input_ids"].shape[0] // groups
            chunk = math.gcd(vision_chunk, per_device) if vision_chunk else 0
            tokens = model.vision_tokens(fields, groups=groups, chunk=chunk)
            for key in VISION_FIELDS:
                fields.pop(key, None)
            if tokens is not None:
                fields["vision_tokens"] = tokens
            prepared[side] = fields
        return {"state": frozen, "dora_norms": model.dora_norms()}, prepared

    def embed(trainable, prepared, batch, rng):
        model = nnx.merge(graphdef, nnx.State(trainable), prepared["state"])
        fields = dict(batch)
        tokens = fields.pop("vision_tokens", None)
        return model.embed(
            fields,
            deterministic=False,
            rng=rng,
            vision_tokens=tokens,
            dora_norms=prepared["dora_norms"],
        )

    return prepare, embed


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

    `encode` runs in a Grain worker: one row's query (query prompt: qry_text, qry_image) and
    positive (candidate prompt: pos_text, pos_image), and its positive id. `shape` gives the
    length and patch buckets of both sides, which the processes agree on per step; `collate`
    pads this process's rows to its own buckets and `widen` to the agreed ones.
    """

    def __init__(self, processor: Processor, rows: Sequence[Any], *, image_root: str | None):
        self.processor, self.rows, self.image_root = processor, rows, image_root

    def encode(self, row_id: int) -> tuple:
        row = self.rows[int(row_id)]
        encode = functools.partial(self.processor.encode, image_root=self.image_root, strict=True)
        return encode(query_item(row)), encode(positive_item(row)), positive_id(row)

    def shape(self, encoded: Sequence[tuple]) -> list[int]:
        query = self.processor.shape_of([e[0] for e in encoded])
        candidate = self.processor.shape_of([e[1] for e in encoded])
        return [*query, *candidate]

    def collate(self, encoded: Sequence[tuple]) -> dict:
        return {
            "query": self.processor.collate([e[0] for e in encoded]),
            "candidate": self.processor.collate([e[1] for e in encoded]),
            "ids": np.stack([e[2] for e in encoded]),
        }

    def widen(self, batch: dict, shape: Sequence[int]) -> dict:
        query_length, query_patches, candidate_length, candidate_patches = shape
        return {
            **batch,
            "query": self.processor.widen(
                batch["query"], length=query_length, num_patches=query_patches
            ),
            "candidate": self.processor.widen(
                batch["candidate"], length=candidate_length, num_patches=candidate_patches
            ),
        }


class _SubsetNames:
    """rows[i].subset on demand: only a failing batch's rows are read (rows may be lazy)."""

    def __init__(self, rows: Sequence[Any]):
        self._rows = rows

    def __getitem__(self, index: int) -> str:
        return self._rows[int(index)].subset
