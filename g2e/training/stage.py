"""The `train` stage: contrastive LoRA/DoRA fine-tuning on the mined clusters (SPEC §3).

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
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from g2e import distributed, mining
from g2e.data import mmeb, prompts
from g2e.data import rows as rows_lib
from g2e.data.errors import BadInputReport
from g2e.data.images import image_key
from g2e.data.preprocess import Processor, positive_item, query_item
from g2e.models import hf_io, lora, peft, sharding
from g2e.models.qwen2_vl import VISION_FIELDS
from g2e.pipeline import TRAINED_ADAPTER, TRAINED_MODEL, Pipeline
from g2e.training import batches, flops, gradcache, trainer
from g2e.training import step as step_lib


class Preempted(SystemExit):
    """Training stopped on SIGTERM / a preemption notice after saving a checkpoint."""


def run(pipeline: Pipeline) -> dict[str, Any]:
    """Runs the stage; returns the summary for DONE.json. Raises Preempted when stopped early."""
    config = pipeline.config
    adapter = adapter_config(config)
    model = pipeline.model(trained=False, adapter=adapter)
    rows, clusters = training_rows(pipeline)
    logging.info("train: %d rows in %d clusters (%d of several rows)", len(rows), len(clusters),
                 sum(len(c) > 1 for c in clusters))
    processor = pipeline.processor(train=True)
    result = train_model(config, model, rows, clusters, processor, pipeline.mesh,
                         pipeline.rules, str(pipeline.workdir / "train"),
                         workers=pipeline.workers)
    if result.stopped_early:
        raise Preempted(f"train: stopped at step {result.step} after saving a checkpoint; "
                        "rerun the same command to resume")
    # The weights may be sharded across hosts: every process takes part in gathering them,
    # process 0 writes.
    if adapter is not None:
        distributed.write_on_primary(pipeline.workdir / TRAINED_ADAPTER, lambda tmp: (
            peft.save_peft_adapter(model, adapter, tmp, base_model=config.model_dir)))
    else:
        def write(tmp):
            hf_io.save_hf(model, tmp)
            if tmp is not None:
                hf_io.copy_assets(config.model_dir, tmp)
        distributed.write_on_primary(pipeline.workdir / TRAINED_MODEL, write)
    pipeline.forget_model()  # Later stages load the trained model from what was written.
    return {"steps": result.step, "final_loss": result.last_metrics.get("loss"),
            "rows": len(rows), "clusters": len(clusters)}


def adapter_config(config: Any) -> lora.AdapterConfig | None:
    """The train.adapter block as an AdapterConfig; None for full fine-tuning (kind 'none')."""
    adapter = config.train.adapter
    if adapter.kind == "none":
        return None
    return lora.AdapterConfig(kind=adapter.kind, r=adapter.r, alpha=adapter.alpha,
                              dropout=adapter.dropout, targets=tuple(adapter.targets))


def training_rows(pipeline: Pipeline) -> tuple[Sequence[mmeb.TrainRow], list[list[int]]]:
    """All training rows (subsets concatenated, read lazily from a TFDS copy) and the clusters
    over them."""
    config = pipeline.config
    parts: list[Sequence[mmeb.TrainRow]] = []
    offset = 0
    clusters: list[list[int]] = []
    bad = BadInputReport(config.data.on_bad_input)
    for subset in rows_lib.train_subsets(config.data):
        subset_rows = rows_lib.train_rows(config.data, subset, bad)
        path = pipeline.workdir / "mine" / f"{subset}.clusters.json"
        covered = np.zeros(len(subset_rows), bool)
        if config.train.use_clusters and path.is_file():
            mined = mining.read_clusters(str(path), subset=subset, num_rows=len(subset_rows))
            for cluster in mined.clusters:
                clusters.append([offset + i for i in cluster])
                covered[cluster] = True
        elif config.train.use_clusters:
            logging.warning("train: %s has no clusters (%s); its rows train as single rows",
                            subset, path)
        clusters += [[offset + int(i)] for i in np.flatnonzero(~covered)]
        parts.append(subset_rows)
        offset += len(subset_rows)
    if bad.total:
        logging.warning("train: %s", bad.summary())
    return rows_lib.ConcatRows(parts), clusters


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
            "mesh.")
    return total


def batch_groups(mesh: Mesh, rules: sharding.Rules) -> int:
    """Devices the batch is split over (the mesh axes of the 'batch' rule)."""
    return int(np.prod([mesh.shape[a] for a in sharding.batch_axes(rules, mesh.axis_names)]))


def train_model(config: Any, model: nnx.Module, rows: Sequence[Any],
                clusters: Sequence[Sequence[int]] | None, processor: Processor, mesh: Mesh,
                rules: sharding.Rules, workdir: str, workers: int = 0) -> trainer.FitResult:
    """Contrastive fine-tuning of `model` in place (SPEC §3); resumes from `workdir`.

    Args:
      config: the full config (reads train.*, data.train_image_root, seed).
      model: a Qwen2VL, with adapters unless train.adapter.kind == 'none'; already sharded.
      rows: MMEB-train rows (g2e.data.mmeb.TrainRow), indexed by cluster entries.
      clusters: mined clusters (row indices, anchor first), or None to train on single rows
        (also when train.use_clusters is False).
      processor: the training Processor (train max length and image resolution).
      mesh, rules: the device mesh and the logical-axis rules (the batch axes).
      workdir: checkpoints, metrics and TensorBoard logs go here.
      workers: Grain processes encoding the rows (0: in this process).

    Returns:
      trainer.FitResult; the model's parameters are updated to the trained ones.
    """
    train_cfg = config.train
    full = train_cfg.adapter.kind == "none"
    graphdef, trainable, frozen = split_model(model, full=full)
    stored = jax.tree.map(lambda x: x.dtype, trainable)
    # Trained parameters and their Adam moments are float32 whatever model.param_dtype.
    trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
    if clusters is None or not train_cfg.get("use_clusters", True):
        clusters = [[i] for i in range(len(rows))]
    schedule = batches.ClusterSchedule(clusters, len(rows), train_cfg.cluster_size,
                                       global_batch_size(train_cfg, mesh, rules),
                                       seed=int(config.seed))
    codec = RowCodec(processor, rows, image_root=config.data.train_image_root or None)
    prepare_fn, embed_fn = model_step_fns(graphdef, groups=batch_groups(mesh, rules),
                                          vision_chunk=int(train_cfg.get("vision_chunk", 0)))
    adapter = getattr(model, "adapter", None)
    result = trainer.fit(embed_fn, trainable, frozen, train_cfg=train_cfg,
                         mesh=mesh, rules=rules, schedule=schedule, codec=codec,
                         workdir=workdir, seed=int(config.seed), subsets=_SubsetNames(rows),
                         model_flops=lambda host: flops.train_step_flops(model.config, host,
                                                                         adapter),
                         prepare_fn=prepare_fn, workers=workers)
    # Adapters stay float32 (their storage dtype); fully trained weights go back to theirs.
    nnx.update(model, nnx.State(jax.tree.map(lambda x, d: x.astype(d), result.trainable,
                                             stored)))
    return result


def split_model(model: nnx.Module, *, full: bool) -> tuple[nnx.GraphDef, dict, nnx.State]:
    """(graphdef, trainable as a plain nested dict, frozen State).

    Trainable are the nnx.LoRAParam adapters, or every nnx.Param when `full` (full fine-tuning).
    """
    graphdef, trainable, frozen = nnx.split(model, nnx.Param if full else nnx.LoRAParam, ...)
    pure = trainable.to_pure_dict()
    if not jax.tree.leaves(pure):
        raise ValueError("train_model: the model has no adapter parameters; build it with "
                         "adapter=AdapterConfig(...) or set --config.train.adapter.kind=none "
                         "for full fine-tuning.")
    return graphdef, pure, frozen


def model_step_fns(graphdef: nnx.GraphDef, *, groups: int = 1, vision_chunk: int = 0
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
        return model.embed(fields, deterministic=False, rng=rng, vision_tokens=tokens,
                           dora_norms=prepared["dora_norms"])

    return prepare, embed


def positive_id(row: Any) -> np.ndarray:
    """int32 [2]: a 62-bit digest of what the row's positive embeds as (text, image and the
    candidate prompt). Rows whose positives are identical share it, so the loss masks them as
    duplicates instead of scoring them as negatives (two rows of a classification subset with
    the same label). A digest, not a number from a pass over all rows: each worker computes
    its rows' ids, and equal positives on different hosts get equal ids."""
    key = json.dumps([row.pos_text, image_key(row.pos_image),
                      prompts.uses_suffix("candidate", row.subset)])
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
        encode = functools.partial(self.processor.encode, image_root=self.image_root,
                                   strict=True)
        return encode(query_item(row)), encode(positive_item(row)), positive_id(row)

    def shape(self, encoded: Sequence[tuple]) -> list[int]:
        query = self.processor.shape_of([e[0] for e in encoded])
        candidate = self.processor.shape_of([e[1] for e in encoded])
        return [*query, *candidate]

    def collate(self, encoded: Sequence[tuple]) -> dict:
        return {"query": self.processor.collate([e[0] for e in encoded]),
                "candidate": self.processor.collate([e[1] for e in encoded]),
                "ids": np.stack([e[2] for e in encoded])}

    def widen(self, batch: dict, shape: Sequence[int]) -> dict:
        query_length, query_patches, candidate_length, candidate_patches = shape
        return {**batch,
                "query": self.processor.widen(batch["query"], length=query_length,
                                              num_patches=query_patches),
                "candidate": self.processor.widen(batch["candidate"], length=candidate_length,
                                                  num_patches=candidate_patches)}


class _SubsetNames:
    """rows[i].subset on demand: only a failing batch's rows are read (rows may be lazy)."""

    def __init__(self, rows: Sequence[Any]):
        self._rows = rows

    def __getitem__(self, index: int) -> str:
        return self._rows[int(index)].subset
