"""The one attention function of g2e (text decoder and vision tower both call it).

Letters: the legend of `g2e.models`.

Masking is expressed with segment ids, which every backend understands: a query attends only to
keys with the same segment id (and, if causal, at or before its own position). The text decoder
passes `attention_mask` (1 real, 0 pad), so real tokens never see pads whichever side the padding
is on; the vision tower passes its per-image segment ids, which confines attention to one image
(HF's cu_seqlens). Rows that see no key at all (pads) get finite garbage, never NaN.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

Implementation = Literal["auto", "xla", "cudnn", "pallas"]
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")


def resolve(
    implementation: Implementation, *, length: int, dtype: Any, backend: str | None = None
) -> str:
    """The kernel `attend` runs: 'auto' picks per platform, anything else is kept.

    auto: on a GPU, cuDNN's fused attention where it applies (16-bit compute: cuDNN has no
    float32 kernel); on a TPU, the splash kernel where the length is a multiple of 128 (its
    block size); XLA everywhere else (CPU, float32 on a GPU, unaligned lengths on a TPU).
    """
    if implementation != "auto":
        return implementation
    backend = backend or jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype).itemsize == 2:
        return "cudnn"
    if backend == "tpu" and length % 128 == 0:
        return "pallas"
    return "xla"


def attend(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    segment_ids: jax.Array | None,
    causal: bool,
    implementation: Implementation = "xla",
    scale: float | None = None,
) -> jax.Array:
    """Scaled dot-product attention with grouped-query heads.

    Args:
        query: [B, L, H, E].
        key, value: [B, L, K, E] with H a multiple of K.
        segment_ids: int [B, L] or None (all tokens in one segment).
        causal: apply a lower-triangular mask as well.
        implementation: 'xla' or 'cudnn' (jax.nn.dot_product_attention), 'pallas' (the TPU
            splash kernel; L must be a multiple of 128), or 'auto' (`resolve`: per platform).
        scale: logit scale, default 1/sqrt(E).

    Returns:
        [B, L, H, E] in the query dtype.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    implementation = resolve(implementation, length=query.shape[1], dtype=query.dtype)
    head_dim = query.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    if implementation == "pallas":
        return _splash(query, key, value, segment_ids, causal, scale)
    mask = None
    if segment_ids is not None:
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [B, 1, Lq, Lk]
    if causal:
        length = query.shape[1]
        tril = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        mask = tril if mask is None else mask & tril
    return jax.nn.dot_product_attention(
        query, key, value, mask=mask, scale=scale, implementation=implementation
    )


def attend_at(
    query: jax.Array, key: jax.Array, value: jax.Array, *, segment_ids: jax.Array, index: jax.Array
) -> jax.Array:
    """Causal attention of one query per example: the token at `index`.

    Args:
        query: [B, 1, H, E], the query of the token at `index` [B].
        key, value: [B, L, K, E] of the whole sequence.
        segment_ids: int [B, L] (see `attend`).

    Returns:
        [B, 1, H, E]. A single query row is matrix-vector work, so this always uses XLA.
    """
    length = key.shape[1]
    query_segment = jnp.take_along_axis(segment_ids, index[:, None], axis=1)  # [B, 1]
    allowed = (segment_ids == query_segment) & (jnp.arange(length)[None] <= index[:, None])
    return jax.nn.dot_product_attention(
        query, key, value, mask=allowed[:, None, None, :], implementation="xla"
    )


def _splash(query, key, value, segment_ids, causal, scale):
    """Pallas TPU splash attention; GQA runs as one MQA kernel per key/value head."""
    # Imported lazily: the TPU kernel module is only needed (and only lowers) on TPU.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    batch, length, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    if length % 128:
        raise ValueError(
            f"attention='pallas' needs a length that is a multiple of 128, got {length}; "
            "choose length buckets that are multiples of 128 or use attention='xla'."
        )
    groups = num_heads // num_kv_heads
    one_head = sm.CausalMask((length, length)) if causal else sm.FullMask((length, length))
    kernel = sk.make_splash_mqa_single_device(
        sm.MultiHeadMask([one_head] * groups), interpret=jax.default_backend() != "tpu"
    )
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, length), jnp.int32)

    # [B, L, H, E] -> [B, K, H/K, L, E]; key/value [B, L, K, E] -> [B, K, L, E].
    q = (query * scale).reshape(batch, length, num_kv_heads, groups, head_dim)
    q = q.transpose(0, 2, 3, 1, 4)
    k = key.transpose(0, 2, 1, 3)
    v = value.transpose(0, 2, 1, 3)

    def one(q_kg, k_k, v_k, seg):
        return kernel(q_kg, k_k, v_k, segment_ids=sk.SegmentIds(q=seg, kv=seg))

    per_kv = jax.vmap(one, in_axes=(0, 0, 0, None))  # over K
    out = jax.vmap(per_kv, in_axes=(0, 0, 0, 0))(q, k, v, segment_ids)  # [B, K, H/K, L, E]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, num_heads, head_dim)
