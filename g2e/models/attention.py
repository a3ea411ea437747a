"""The one attention module of g2e: the text decoder and the vision tower both call `attend`.

Letters: the legend of `g2e.models`.

Which keys a query sees is said in one of two forms, and the callers pick the cheaper one:

* `lengths` [B]: row b's real tokens are positions [0, lengths[b]), padding (if any) is on the
  right. cuDNN takes this as its sequence lengths: no mask exists, and with `causal` the tiles
  above the diagonal are skipped. XLA builds its mask from the lengths; splash gets segment ids.
  The text decoder's rows are one run of real tokens each, padded left or right; `PaddedRows`
  moves every run to the start of its row once per forward, so every layer can use lengths.
* `segment_ids` [B, L]: a query sees only keys of its own segment id (0 on padding); any
  layout (several images in one vision row, Qwen2.5-VL's windows, left padding). cuDNN gets
  this form as a dense [B, 1, L, L] mask, which JAX turns into a bias that every head rereads
  and that skips no tile, so callers use it only where lengths cannot say the same.

Both may be given (segments within the lengths). Rows that see no key at all (pads) get finite
values, never NaN: lengths are at least 1, and the XLA mask fills with a large negative number.

Kernels (`Kernel.name`): 'xla' and 'cudnn' (`jax.nn.dot_product_attention`), 'pallas' (the
TPU splash kernel), 'auto' (`resolve`: per platform). Splash is a bare `pallas_call`, which
GSPMD cannot partition: left alone, every device would gather and compute the whole batch.
`_splash` runs it in `shard_map` over the mesh's batch axes (and the head axes, where they divide
both head counts), each device on its own rows and heads, with a kernel built once per shape
(its block masks are numpy work) and tiles from `Kernel`. The mesh and rule table are the ones
`g2e.models.sharding.constrain` reads (`jax.set_mesh` and `nnx.logical_axis_rules`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import flax.core.spmd
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from g2e.models import sharding

Implementation = Literal["auto", "xla", "cudnn", "pallas"]
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")
SPLASH_TILE = 128  # splash's lengths and tiles come in multiples of this


@dataclasses.dataclass(frozen=True)
class Kernel:
    """The attention kernel, and the tiles of the splash kernel (used only by 'pallas').

    name: 'auto', 'xla', 'cudnn' or 'pallas' (see the module docstring).
    block_q, block_kv: splash tiles along queries and keys, multiples of 128. For a length L
        the largest multiple of 128 that divides L and is at most the block is used.
    """

    name: str = "auto"
    block_q: int = 512
    block_kv: int = 512

    def __post_init__(self):
        if self.name not in IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {self.name!r}")
        for field in ("block_q", "block_kv"):
            block = getattr(self, field)
            if block < SPLASH_TILE or block % SPLASH_TILE:
                raise ValueError(
                    f"attention {field}={block}: splash tiles are positive multiples of "
                    f"{SPLASH_TILE}"
                )


def as_kernel(attention: str | Kernel) -> Kernel:
    """A `Kernel` from a kernel name ('auto', 'xla', ...) or a `Kernel` (returned as is)."""
    return attention if isinstance(attention, Kernel) else Kernel(attention)


def resolve(
    implementation: str | Kernel, *, length: int, dtype: Any, backend: str | None = None
) -> str:
    """The kernel name `attend` runs: 'auto' picks per platform, anything else is kept.

    auto: on a GPU, cuDNN's fused attention where it applies (16-bit compute: cuDNN has no
    float32 kernel); on a TPU, the splash kernel where the length is a multiple of 128 (its
    tile); XLA everywhere else (CPU, float32 on a GPU, unaligned lengths on a TPU).
    """
    name = as_kernel(implementation).name
    if name != "auto":
        return name
    backend = backend or jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype).itemsize == 2:
        return "cudnn"
    if backend == "tpu" and length % SPLASH_TILE == 0:
        return "pallas"
    return "xla"


@dataclasses.dataclass(frozen=True)
class PaddedRows:
    """Rows holding one run of real tokens each (padded on the left, the right, or not at all).

    `align` moves each row's run to the start of the row (a per-row rotation), so attention can
    take `lengths` whichever side the batch was padded on; `restore` undoes it. Attention sees
    the same tokens in the same order, and positions travel with the tokens (M-RoPE ids are
    inputs), so the result on real tokens does not change.
    """

    starts: jax.Array  # int [B]: the first real position of each row
    lengths: jax.Array  # int32 [B]: real tokens of each row, at least 1 (a row of pads sees one)

    @classmethod
    def from_mask(cls, attention_mask: jax.Array) -> PaddedRows:
        """From a [B, L] mask (1 on real tokens) whose ones are one run in every row."""
        real = attention_mask > 0
        starts = jnp.argmax(real, axis=1).astype(jnp.int32)
        lengths = jnp.maximum(jnp.sum(real, axis=1, dtype=jnp.int32), 1)
        return cls(starts=starts, lengths=lengths)

    def _rotate(self, x: jax.Array, shift: jax.Array) -> jax.Array:
        length = x.shape[1]
        index = (jnp.arange(length)[None, :] + shift[:, None]) % length  # [B, L]
        return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

    def align(self, x: jax.Array) -> jax.Array:
        """x [B, L, ...] with each row's run of real tokens moved to positions [0, length)."""
        return self._rotate(x, self.starts)

    def restore(self, x: jax.Array) -> jax.Array:
        """The inverse of `align`: x [B, L, ...] back in the batch's own positions."""
        return self._rotate(x, -self.starts)

    def aligned_index(self, index: jax.Array, length: int) -> jax.Array:
        """Positions [B] or [B, S] of the batch mapped to their place in the aligned rows."""
        starts = self.starts.reshape(self.starts.shape + (1,) * (index.ndim - 1))
        return (index - starts) % length


def attend(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    causal: bool,
    segment_ids: jax.Array | None = None,
    lengths: jax.Array | None = None,
    implementation: str | Kernel = "xla",
    scale: float | None = None,
) -> jax.Array:
    """Scaled dot-product attention with grouped-query heads.

    Args:
        query: [B, L, H, E].
        key, value: [B, L, K, E] with H a multiple of K.
        causal: also apply a lower-triangular mask.
        segment_ids: int [B, L] or None: queries see keys of their own segment only.
        lengths: int [B] or None: row b's keys and queries are positions [0, lengths[b]).
        implementation: a kernel name or `Kernel`: 'xla', 'cudnn', 'pallas' (L a multiple of
            128) or 'auto' (`resolve`).
        scale: logit scale, default 1/sqrt(E).

    Returns:
        [B, L, H, E] in the query dtype; the outputs of padding are unspecified (finite).
    """
    kernel = as_kernel(implementation)
    name = resolve(kernel, length=query.shape[1], dtype=query.dtype)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if name == "pallas":
        if lengths is not None:
            in_length = jnp.arange(query.shape[1])[None, :] < lengths[:, None]
            inside = jnp.ones(in_length.shape, jnp.int32) if segment_ids is None else segment_ids
            segment_ids = jnp.where(in_length, inside, 0)
        return _splash(query, key, value, segment_ids, causal, scale, kernel)
    mask = None
    if segment_ids is not None:
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [B, 1, L, L]
    if lengths is not None:
        lengths = lengths.astype(jnp.int32)
    return jax.nn.dot_product_attention(
        query,
        key,
        value,
        mask=mask,
        scale=scale,
        is_causal=causal,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=name,
    )


def attend_at(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    index: jax.Array,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Causal attention of a few queries per row: the tokens at `index`.

    Args:
        query: [B, S, H, E], the queries of the tokens at `index` [B, S] (S = 1: one per row;
            a packed row asks for the last token of each of its segments).
        key, value: [B, L, K, E] of the whole sequence.
        segment_ids: int [B, L] or None. None: every key at or before `index` is real (rows
            aligned by `PaddedRows`); else only keys of the query's segment count.

    Returns:
        [B, S, H, E]. A few query rows are matrix-vector work, so this always uses XLA.
    """
    allowed = jnp.arange(key.shape[1])[None, None] <= index[..., None]  # [B, S, L]
    if segment_ids is not None:
        query_segment = jnp.take_along_axis(segment_ids, index, axis=1)  # [B, S]
        allowed = allowed & (segment_ids[:, None, :] == query_segment[..., None])
    return jax.nn.dot_product_attention(
        query, key, value, mask=allowed[:, None], implementation="xla"
    )


# ---- TPU splash attention ------------------------------------------------------------------


def _fit_block(block: int, length: int) -> int:
    """The largest multiple of 128 that divides `length` and is at most `block`."""
    return max(
        b for b in range(SPLASH_TILE, min(block, length) + 1, SPLASH_TILE) if length % b == 0
    )


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, length: int, causal: bool, block_q: int, block_kv: int, interpret):
    """The splash kernel for `heads` query heads of `length` tokens, built once per shape.

    Built outside any trace (`ensure_compile_time_eval`), so the cached block masks are concrete
    arrays that every later trace can reuse.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    shape = (length, length)
    one_head = sm.CausalMask(shape) if causal else sm.FullMask(shape)
    blocks = sk.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(
            sm.MultiHeadMask([one_head] * heads),
            block_sizes=blocks,
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )


def _splash_partition(batch: int, heads: int, kv_heads: int):
    """(mesh, batch mesh axes, head mesh axes) to run splash over; mesh None: no shard_map.

    The batch goes over the 'batch' rule's mesh axes, the heads over the 'heads' rule's where
    they divide both head counts (else every device of those axes runs all heads of its rows).
    """
    rules = flax.core.spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh is None or mesh.empty:
        return None, (), ()

    def ways(axes):
        size = 1
        for axis in axes:
            size *= mesh.shape[axis]
        return size

    batch_axes = sharding.batch_axes(rules, mesh.axis_names)
    if batch % ways(batch_axes):
        raise ValueError(
            f"attention='pallas': {batch} rows do not split over the mesh's batch axes "
            f"{batch_axes} ({ways(batch_axes)} devices); make the batch a multiple of that."
        )
    entry = sharding.logical_to_spec(("heads",), rules, mesh.axis_names)[0]
    head_axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    head_axes = tuple(a for a in head_axes if a not in batch_axes)
    if heads % ways(head_axes) or kv_heads % ways(head_axes):
        head_axes = ()
    return mesh, batch_axes, head_axes


def _shard_map(body, mesh, in_specs, out_specs):
    """`jax.shard_map` (jax >= 0.7), else the older `jax.experimental.shard_map`."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(
            body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )
    from jax.experimental.shard_map import shard_map  # pragma: no cover (jax < 0.7)

    return shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _splash(query, key, value, segment_ids, causal, scale, kernel: Kernel):
    """Splash attention in shard_map over the batch (and head) mesh axes; see the docstring."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    batch, length, heads, _ = query.shape
    kv_heads = key.shape[2]
    if length % SPLASH_TILE:
        raise ValueError(
            f"attention='pallas' needs a length that is a multiple of {SPLASH_TILE}, got "
            f"{length}; choose length buckets that are multiples of {SPLASH_TILE} or use "
            "attention='xla'."
        )
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
    mesh, batch_axes, head_axes = _splash_partition(batch, heads, kv_heads)
    head_ways = 1
    for axis in head_axes:
        head_ways *= mesh.shape[axis]
    splash = _splash_kernel(
        heads // head_ways,
        length,
        causal,
        _fit_block(kernel.block_q, length),
        _fit_block(kernel.block_kv, length),
        jax.default_backend() != "tpu",
    )
    # [B, L, H, E] -> [B, H, L, E], the kernel's layout (it takes K key/value heads as they are).
    q, k, v = (x.transpose(0, 2, 1, 3) for x in ((query * scale).astype(query.dtype), key, value))

    def rows(splash, q, k, v, ids):
        one = lambda q, k, v, ids: splash(q, k, v, segment_ids=sk.SegmentIds(q=ids, kv=ids))  # noqa: E731
        return jax.vmap(one)(q, k, v, ids)

    if mesh is None:
        out = rows(splash, q, k, v, segment_ids)
    else:
        batch_entry = batch_axes or None
        heads_entry = head_axes or None
        qkv = PartitionSpec(batch_entry, heads_entry, None, None)
        ids = PartitionSpec(batch_entry, None)
        out = _shard_map(rows, mesh, (PartitionSpec(), qkv, qkv, qkv, ids), qkv)(
            splash, q, k, v, segment_ids
        )
    return out.transpose(0, 2, 1, 3)
