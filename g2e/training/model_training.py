"""Binds the generic train loop to Qwen2VL, MMEB-train rows and the Processor.

`train_model(config, model, rows, clusters, processor, mesh, workdir)` is the one call the train
stage makes: it splits the model into trainable (adapters, or all weights) and frozen
parameters, builds the per-step cluster batches, runs `trainer.fit` and writes the trained
parameters back into the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from g2e.data import prompts
from g2e.data.images import image_key
from g2e.data.preprocess import EmbedItem, Processor
from g2e.training import batches, gradcache, trainer


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


def model_embed_fn(graphdef: nnx.GraphDef) -> gradcache.EmbedFn:
    """embed_fn for GradCache: the last non-pad token's hidden state, L2-normalised, with
    adapter dropout on (training)."""

    def embed(trainable, frozen, batch, rng):
        model = nnx.merge(graphdef, nnx.State(trainable), frozen)
        return model.embed(batch, deterministic=False, rng=rng)

    return embed


def positive_ids(rows: Sequence[Any]) -> np.ndarray:
    """int32 [len(rows)]: rows whose positives embed identically (same text, image and prompt)
    share an id, so the loss masks them as duplicates instead of scoring them as negatives
    (e.g. two rows of a classification subset with the same label)."""
    keys: dict = {}
    ids = [keys.setdefault((row.pos_text, image_key(row.pos_image),
                            prompts.uses_suffix("candidate", row.subset)), len(keys))
           for row in rows]
    return np.asarray(ids, np.int32)


def make_encoder(processor: Processor, rows: Sequence[Any], *, image_root: str | None,
                 fixed_shapes: bool) -> Callable[[np.ndarray], dict]:
    """Host encoder: row ids -> {'query': batch, 'candidate': batch, 'ids': positive ids}.

    Queries use the query prompt (qry_text, qry_image), candidates the candidate prompt
    (pos_text, pos_image). With `fixed_shapes` every batch is padded to the largest length and
    patch buckets (needed on several hosts, whose shapes must agree; one compilation).
    """
    shape = {}
    if fixed_shapes:
        shape = dict(length=processor.length_buckets[-1], num_patches=processor.patch_buckets[-1])

    def side(row_ids, role):
        encoded = []
        for r in row_ids:
            row = rows[int(r)]
            text, image = ((row.qry_text, row.qry_image) if role == "query"
                           else (row.pos_text, row.pos_image))
            item = EmbedItem(text=text, image=image or None, role=role, subset=row.subset,
                             row=row.index)
            enc = processor.encode(item, image_root=image_root)
            if enc is None:
                raise ValueError(f"training row {row.index} of subset {row.subset} ({role}) "
                                 "could not be encoded; fix or remove it from the training data "
                                 "(bad rows must be dropped before mining).")
            encoded.append(enc)
        return processor.collate(encoded, **shape)

    candidate_ids = positive_ids(rows)

    def encode(row_ids: np.ndarray) -> dict:
        return {"query": side(row_ids, "query"), "candidate": side(row_ids, "candidate"),
                "ids": candidate_ids[np.asarray(row_ids, np.int64)]}

    return encode


def flops_per_token(model: nnx.Module) -> float:
    """2 x the language model's parameter count: forward FLOPs of one text token."""
    params = nnx.state(model.language_model, nnx.Param)
    return 2.0 * sum(x.size for x in jax.tree.leaves(params))


class _SubsetNames:
    """rows[i].subset on demand: only a failing batch's rows are read (rows may be lazy)."""

    def __init__(self, rows: Sequence[Any]):
        self._rows = rows

    def __getitem__(self, index: int) -> str:
        return self._rows[int(index)].subset


def train_model(config: Any, model: nnx.Module, rows: Sequence[Any],
                clusters: Sequence[Sequence[int]] | None, processor: Processor, mesh: Mesh,
                workdir: str) -> trainer.FitResult:
    """Contrastive fine-tuning of `model` in place (SPEC §3); resumes from `workdir`.

    Args:
      config: the full config (reads train.*, data.train_image_root, seed).
      model: a Qwen2VL, with adapters unless train.adapter.kind == 'none'; already sharded.
      rows: MMEB-train rows (g2e.data.mmeb.TrainRow), indexed by cluster entries.
      clusters: mined clusters (row indices, anchor first), or None to train on single rows
        (also when train.use_clusters is False).
      processor: the training Processor (train max length and image resolution).
      mesh: the device mesh.
      workdir: checkpoints, metrics and TensorBoard logs go here.

    Returns:
      trainer.FitResult; the model's parameters are updated to the trained ones.
    """
    train_cfg = config.train
    full = train_cfg.adapter.kind == "none"
    graphdef, trainable, frozen = split_model(model, full=full)
    if clusters is None or not train_cfg.get("use_clusters", True):
        clusters = [[i] for i in range(len(rows))]
    groups = int(np.prod([mesh.shape.get(a, 1) for a in trainer.BATCH_AXES]))
    batch_size = groups * train_cfg.clusters_per_device * train_cfg.cluster_size
    schedule = batches.ClusterSchedule(clusters, len(rows), train_cfg.cluster_size, batch_size,
                                       seed=int(config.seed))
    encode = make_encoder(processor, rows, image_root=config.data.train_image_root or None,
                          fixed_shapes=jax.process_count() > 1)
    result = trainer.fit(model_embed_fn(graphdef), trainable, frozen, train_cfg=train_cfg,
                         mesh=mesh, schedule=schedule, encode=encode, workdir=workdir,
                         seed=int(config.seed), subsets=_SubsetNames(rows),
                         flops_per_token=flops_per_token(model))
    nnx.update(model, nnx.State(result.trainable))
    return result
