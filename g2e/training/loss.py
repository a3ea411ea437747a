"""InfoNCE over the global batch, with each device holding only its rows of the logit matrix.

Letters: N global pairs, n pairs on one device, D embedding width.

Every query is scored against the candidates of the whole (global) batch; its own positive is the
target. The candidate embeddings are all-gathered explicitly inside `shard_map`, so a device
holds [n, N] logits, never [N, N]; the per-device cross-entropy sums are psum-ed and divided by
N, which is exactly the single-device mean. Gradients flow back through the all-gather (its
transpose is a reduce-scatter), so `jax.grad` of this function is the gradient of the global
loss.

Options beyond the paper (off by default):
  hardness_alpha: negatives' logits get + alpha * sg(similarity) / temperature, which reweights
    each negative by exp(alpha * sim / T) (harder negatives count more);
  false_negative_margin: negatives whose similarity exceeds the positive's plus the margin are
    masked out as likely false negatives;
  learnable temperature: pass `log_inverse_temperature` (a trainable scalar) instead of a fixed
    temperature.
Identical positives (`mask_identical_positives`, on by default): candidates carrying the same id
as the query's positive (the same text and image, e.g. two rows of one class in a
classification subset) are masked, since they are the positive, not a negative. The release
scores them as negatives; with the flag off the loss is exactly its plain cross-entropy over
q @ c^T / T.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Contrastive loss settings (config keys train.temperature, train.hardness_alpha, ...)."""

    temperature: float = 0.02
    hardness_alpha: float = 0.0
    false_negative_margin: float | None = None
    learnable_temperature: bool = False
    mask_identical_positives: bool = True

    @classmethod
    def from_config(cls, train_cfg: Any) -> LossConfig:
        margin = train_cfg.false_negative_margin
        return cls(
            temperature=float(train_cfg.temperature),
            hardness_alpha=float(train_cfg.hardness_alpha),
            false_negative_margin=None if margin < 0 else float(margin),
            learnable_temperature=bool(train_cfg.learnable_temperature),
            mask_identical_positives=bool(train_cfg.mask_identical_positives),
        )


def _local_infonce(
    queries: Array, candidates: Array, ids: Array, scale: Array, offset: Array, config: LossConfig
) -> tuple[Array, Array]:
    """Sums of cross-entropy and of correct top-1 over n local queries vs N candidates.

    Args:
      queries: [n, D] this device's query embeddings.
      candidates: [N, D] all candidate embeddings (gathered).
      ids: [N] or [N, k] id of every candidate's content (gathered; a digest in k parts), for
        masking identical positives.
      scale: scalar inverse temperature.
      offset: global index of this device's first row.
    """
    n = queries.shape[0]
    targets = offset + jnp.arange(n)
    sims = jnp.einsum("nd,md->nm", queries.astype(jnp.float32), candidates.astype(jnp.float32))
    positive_sims = jnp.take_along_axis(sims, targets[:, None], axis=1)
    is_target = jnp.arange(candidates.shape[0])[None, :] == targets[:, None]
    masked = jnp.zeros(sims.shape, bool)
    if config.mask_identical_positives:
        query_ids = jax.lax.dynamic_slice_in_dim(ids, offset, n)
        same = ids[None, :] == query_ids[:, None]
        if same.ndim == 3:  # ids [N, k]: a digest in k parts
            same = same.all(axis=-1)
        masked = same & ~is_target
    if config.false_negative_margin is not None:
        likely_false = sims > jax.lax.stop_gradient(positive_sims) + config.false_negative_margin
        masked |= likely_false & ~is_target
    logits = sims * scale
    if config.hardness_alpha:
        bonus = config.hardness_alpha * jax.lax.stop_gradient(sims) * scale
        logits = logits + jnp.where(is_target, 0.0, bonus)
    logits = jnp.where(masked, -jnp.inf, logits)
    log_norm = jax.nn.logsumexp(logits, axis=1)
    target_logits = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
    loss_sum = jnp.sum(log_norm - target_logits)
    correct = jnp.sum(jnp.argmax(logits, axis=1) == targets)
    return loss_sum, correct.astype(jnp.float32)


def inverse_temperature(config: LossConfig, log_inverse_temperature: Array | None) -> Array:
    """The logit scale 1/T: fixed from the config or exp of the learnable parameter."""
    if config.learnable_temperature:
        if log_inverse_temperature is None:
            raise ValueError(
                "LossConfig.learnable_temperature is on but no "
                "log_inverse_temperature parameter was passed."
            )
        return jnp.exp(log_inverse_temperature.astype(jnp.float32))
    return jnp.asarray(1.0 / config.temperature, jnp.float32)


def infonce(
    queries: Array,
    candidates: Array,
    ids: Array,
    config: LossConfig,
    *,
    mesh: Mesh | None,
    batch_axes: tuple[str, ...] = (),
    log_inverse_temperature: Array | None = None,
) -> tuple[Array, Array]:
    """Global-batch InfoNCE loss and in-batch top-1 accuracy.

    Args:
      queries: [N, D] L2-normalised query embeddings, sharded over `batch_axes` (or not).
      candidates: [N, D] L2-normalised positive embeddings; row i is query i's positive.
      ids: [N] or [N, k] int content ids (a digest in k parts); with
        config.mask_identical_positives, candidates sharing the positive's id (all k parts) are
        not scored as negatives.
      config: loss options.
      mesh: the device mesh; None computes on one device without collectives.
      batch_axes: mesh axes the batch is split over.
      log_inverse_temperature: scalar parameter when config.learnable_temperature.

    Returns:
      (mean loss over the N queries, fraction of queries whose positive ranks first).
    """
    scale = inverse_temperature(config, log_inverse_temperature)
    total = queries.shape[0]
    if mesh is None:
        loss_sum, correct = _local_infonce(queries, candidates, ids, scale, jnp.int32(0), config)
        return loss_sum / total, correct / total
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)

    def per_device(q, c, i, s):
        all_c = jax.lax.all_gather(c, axes, axis=0, tiled=True)
        all_ids = jax.lax.all_gather(i, axes, axis=0, tiled=True)
        offset = jax.lax.axis_index(axes) * q.shape[0]
        loss_sum, correct = _local_infonce(q, all_c, all_ids, s, offset, config)
        return jax.lax.psum(loss_sum, axes), jax.lax.psum(correct, axes)

    loss_sum, correct = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(axes, None), P(axes, None), P(axes), P()),
        out_specs=(P(), P()),
    )(queries, candidates, ids, scale)
    return loss_sum / total, correct / total
