"""LoRA and DoRA adapters as plain functions over arrays.

A projection y = x @ W + b with kernel W [in, out] gets a low-rank update through A [in, R]
and B [R, out] (R the rank, legend of `g2e.models`), scaled by s = alpha / R:

    LoRA:  y = x @ W + b + s * drop(x) @ A @ B
    DoRA:  y = m / ||W + s A B||_c * (x @ W + s x @ A @ B) + b         (no dropout / eval)

where ||.||_c is the column norm (one per output feature) and m [out] the learned magnitude.
The maths follows PEFT (peft/tuners/lora/layer.py, dora.py, variants.py) so that weights move
between the two without change:
- lora_A is Gaussian with std 1/r for init='gaussian' (Kaiming-uniform for 'kaiming'), lora_B
    zeros, and the DoRA magnitude starts as the column norms of W (so the adapter starts as the
    identity);
- the DoRA weight norm is detached from the gradient (DoRA paper, section 4.3);
- with dropout active, PEFT's DoRA adds its correction to the undropped base output:
    y = x @ W + b + (m/n - 1) * drop(x) @ W + (m/n) * s * drop(x) @ A @ B.

Adapter state is a dict with keys 'lora_a' [in, R], 'lora_b' [R, out] and, for DoRA,
'magnitude' [out]. The model stores these as nnx.LoRAParam; this module never sees modules.

Precision. Adapters are stored in float32 whatever the frozen base's dtype (ADAPTER_DTYPE): in
bfloat16 an update of lr 5e-5 rounds away on most entries of lora_A and on every DoRA magnitude.
Matmuls run in the compute dtype of x; the DoRA ratio m/n and the correction terms it scales are
formed in float32 and rounded once, when the output is cast back to the compute dtype (as PEFT,
whose adapter weights are float32 too).

Speed. `dora_norm` gives n = ||W + s A B||_c analytically, without forming the [in, out] matrix:
  n^2 = ||W||_c^2 + 2 s <W^T A, B^T>_c + s^2 <(A^T A) B, B>_c,
so a train step computes it once per projection (`norm=` of `apply`) instead of in every layer
call. Dropout masks come from 16 random bits per entry (`keep_mask`), and one mask can serve
several projections of the same input (`dropped=` of `apply`: q, k and v share theirs).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import flax.core.spmd
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from g2e.models import sharding

Array = jax.Array

KINDS = ("lora", "dora")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
KNOWN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Trainable adapter parameters (and so their optimizer moments) are stored in this dtype.
ADAPTER_DTYPE = jnp.float32


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Which projections get an adapter and how it is shaped (docs/method.md §3 defaults).

    Attributes:
        kind: 'lora' or 'dora'.
        r: rank of the update.
        alpha: scaling numerator; the update is scaled by alpha / r.
        dropout: dropout rate on the adapter's input while training.
        targets: projection names (text model) that carry an adapter.
        init: 'gaussian' (lora_A ~ N(0, 1/r^2), PEFT's init_lora_weights='gaussian') or
            'kaiming' (PEFT's default Kaiming-uniform with a=sqrt(5)).
    """

    kind: Literal["lora", "dora"] = "dora"
    r: int = 8
    alpha: float = 64.0
    dropout: float = 0.1
    targets: tuple[str, ...] = DEFAULT_TARGETS
    init: Literal["gaussian", "kaiming"] = "gaussian"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(
                f"AdapterConfig.kind={self.kind!r}: use 'lora' or 'dora' "
                "(train.adapter.kind='none' means full fine-tuning, no adapter)."
            )
        if self.r < 1:
            raise ValueError(f"AdapterConfig.r={self.r}: the rank must be >= 1.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig.dropout={self.dropout}: must be in [0, 1).")
        if self.init not in ("gaussian", "kaiming"):
            raise ValueError(f"AdapterConfig.init={self.init!r}: use 'gaussian' or 'kaiming'.")
        unknown = [t for t in self.targets if t not in KNOWN_TARGETS]
        if unknown:
            raise ValueError(
                f"AdapterConfig.targets has unknown projections {unknown}; "
                f"choose from {KNOWN_TARGETS}."
            )
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scaling(self) -> float:
        """The update's scale, alpha / r (PEFT without rsLoRA)."""
        return self.alpha / self.r

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> AdapterConfig | None:
        """Builds from the `train.adapter` config block; None when kind is 'none' (full FT)."""
        kind = cfg["kind"]
        if kind == "none":
            return None
        return cls(
            kind=kind,
            r=int(cfg["r"]),
            alpha=float(cfg["alpha"]),
            dropout=float(cfg["dropout"]),
            targets=tuple(cfg["targets"]),
            init=cfg.get("init", "gaussian"),
        )


def init_adapter(
    rng: Array,
    in_features: int,
    out_features: int,
    kernel: Array | None,
    config: AdapterConfig,
    dtype: Any = ADAPTER_DTYPE,
) -> dict[str, Array]:
    """Initial adapter state for one projection, as PEFT initialises it.

    Args:
        rng: PRNG key for lora_a.
        in_features, out_features: the projection's shape.
        kernel: the base kernel [in, out]; needed for DoRA (the magnitude starts as its column
            norms), ignored for LoRA.
        config: the adapter config.
        dtype: dtype of the returned arrays.

    Returns:
        {'lora_a': [in, r], 'lora_b': [r, out]} plus 'magnitude': [out] for DoRA.
    """
    shape = (in_features, config.r)
    if config.init == "gaussian":
        lora_a = jax.random.normal(rng, shape, jnp.float32) / config.r
    else:
        # torch's kaiming_uniform_(a=sqrt(5)) on a [r, in] weight: bound = 1 / sqrt(in).
        bound = 1.0 / math.sqrt(in_features)
        lora_a = jax.random.uniform(rng, shape, jnp.float32, -bound, bound)
    state = {"lora_a": lora_a.astype(dtype), "lora_b": jnp.zeros((config.r, out_features), dtype)}
    if config.kind == "dora":
        if kernel is None:
            raise ValueError("init_adapter: DoRA needs the base kernel to set the magnitude.")
        if kernel.shape != (in_features, out_features):
            raise ValueError(
                f"init_adapter: kernel shape {kernel.shape} != ({in_features}, {out_features})."
            )
        # B = 0, so ||W + s A B||_c = ||W||_c.
        state["magnitude"] = _column_norm(kernel.astype(jnp.float32)).astype(dtype)
    return state


def _column_norm(weight: Array) -> Array:
    """L2 norm of each output column of a [..., in, out] weight -> [..., out]."""
    return jnp.sqrt(jnp.sum(jnp.square(weight), axis=-2))


def dora_norm(kernel: Array, adapter: Mapping[str, Array], config: AdapterConfig) -> Array:
    """DoRA's weight norm ||W + s A B||_c [..., out], float32, detached from the gradient.

    Computed analytically (see the module docstring): no [in, out] float32 matrix is formed, so
    a step can compute it for every stacked layer at once. Stacked kernels [N, in, out] run one
    layer at a time (lax.map) to bound the float32 temporaries.
    """
    if kernel.ndim > 2:
        return jax.lax.map(
            lambda args: dora_norm(args[0], args[1], config),
            (kernel, {k: adapter[k] for k in ("lora_a", "lora_b")}),
        )
    highest = jax.lax.Precision.HIGHEST
    w = kernel.astype(jnp.float32)
    lora_a = adapter["lora_a"].astype(jnp.float32)
    lora_b = adapter["lora_b"].astype(jnp.float32)
    s = config.scaling
    w_norm2 = jnp.sum(jnp.square(w), axis=0)
    wta = jnp.einsum("io,ir->ro", w, lora_a, precision=highest)  # (W^T A)^T [R, out]
    gram = jnp.einsum("ir,iq->rq", lora_a, lora_a, precision=highest)  # A^T A [R, R]
    cross = jnp.sum(wta * lora_b, axis=0)
    quad = jnp.sum(jnp.einsum("rq,qo->ro", gram, lora_b, precision=highest) * lora_b, axis=0)
    norm2 = w_norm2 + 2.0 * s * cross + s * s * quad
    return jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(norm2, 0.0)))


def keep_mask(rng: Array, rate: float, shape: tuple[int, ...]) -> Array:
    """Dropout's keep mask: True with probability 1 - rate (to 2^-16), from 16 bits per entry.

    Half the random bits of a float draw; with an 'rbg' key (the trainer's) the bits come from
    the backend's fast generator (XLA's RngBitGenerator).
    """
    threshold = round((1.0 - rate) * 65536)
    return _random_bits(rng, tuple(shape)).astype(jnp.uint32) < threshold


def _random_bits(rng: Array, shape: tuple[int, ...]) -> Array:
    """uint16 random bits of `shape`, whose first dimension is the batch.

    When traced under a mesh and logical-axis rules (the train step) with the batch split over
    devices, every device draws only its own rows (shard_map, its key folded with its index):
    XLA does not partition RngBitGenerator, so a global draw would give every device the bits
    of the whole batch (8x the work and, in the 7B plan, 30 GB per device).
    """
    mesh = jax.sharding.get_abstract_mesh()
    rules = flax.core.spmd.get_logical_axis_rules()
    if not rules or mesh is None or mesh.empty or not shape:
        return jax.random.bits(rng, shape, jnp.uint16)
    axes = sharding.batch_axes(rules, mesh.axis_names)
    devices = sharding.batch_devices(mesh, rules)
    if devices <= 1 or shape[0] % devices:
        return jax.random.bits(rng, shape, jnp.uint16)
    local = (shape[0] // devices, *shape[1:])

    def draw(key):
        index = jax.lax.axis_index(axes)
        return jax.random.bits(jax.random.fold_in(key, index), local, jnp.uint16)

    return jax.shard_map(draw, in_specs=P(), out_specs=P(axes), check_vma=False)(rng)


def dropout(x: Array, rate: float, deterministic: bool, rng: Array | None) -> Array:
    """Inverted dropout of the adapter input; x itself when off (deterministic or rate 0)."""
    if deterministic or rate == 0.0:
        return x
    if rng is None:
        raise ValueError(
            "lora.apply: dropout is active (deterministic=False) but rng is None; "
            "pass a PRNG key or deterministic=True."
        )
    keep = keep_mask(rng, rate, x.shape)
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros_like(x))


def apply(
    x: Array,
    kernel: Array,
    bias: Array | None,
    adapter: Mapping[str, Array],
    config: AdapterConfig,
    *,
    deterministic: bool,
    rng: Array | None = None,
    dropped: Array | None = None,
    norm: Array | None = None,
) -> Array:
    """The adapted projection, y = x @ W (+ b) with the adapter's update.

    Args:
        x: inputs [..., in] in the compute dtype.
        kernel: frozen base kernel [in, out].
        bias: base bias [out] or None.
        adapter: {'lora_a', 'lora_b'} (+ 'magnitude' for DoRA), see init_adapter.
        config: the adapter config.
        deterministic: True turns dropout off (evaluation, embedding, mining).
        rng: PRNG key for dropout; required when deterministic is False, dropout > 0 and
            `dropped` is not given.
        dropped: x with dropout already applied (a mask shared with other projections of the
            same input); None draws this projection's own mask from `rng`.
        norm: DoRA's ||W + s A B||_c [out] computed beforehand (`dora_norm`); None computes it.

    Returns:
        [..., out] in x's dtype.
    """
    dtype = x.dtype
    stored_kernel, kernel = kernel, kernel.astype(dtype)
    s = config.scaling
    base = x @ kernel
    if dropped is None:
        dropped = dropout(x, config.dropout, deterministic, rng)
    update = (dropped @ adapter["lora_a"].astype(dtype)) @ adapter["lora_b"].astype(dtype)
    if config.kind == "lora":
        y = base + s * update
    else:
        if norm is None:
            norm = dora_norm(stored_kernel, adapter, config)
        # PEFT detaches the norm: gradients reach m and the update, never ||W + s A B||_c.
        ratio = adapter["magnitude"].astype(jnp.float32) / jax.lax.stop_gradient(norm)
        # PEFT: result + (m/n - 1) * base(drop(x)) + (m/n) * s * lora(drop(x)); without dropout
        # drop(x) = x and this is (m/n) * (x W + s x A B). Formed in float32, rounded once.
        base_dropped = base if dropped is x else dropped @ kernel
        correction = (ratio - 1.0) * base_dropped.astype(jnp.float32) + ratio * (
            s * update.astype(jnp.float32)
        )
        y = (base.astype(jnp.float32) + correction).astype(dtype)
    if bias is not None:
        y = y + bias.astype(dtype)
    return y


def merge(kernel: Array, adapter: Mapping[str, Array], config: AdapterConfig) -> Array:
    """Folds the adapter into the base kernel, so x @ merged == apply(x, ...) (deterministic).

    Works on stacked (scanned) layers too: kernel [..., in, out] with adapters [..., in, r] etc.

    Args:
        kernel: base kernel [in, out].
        adapter: the adapter state for this projection.
        config: the adapter config.

    Returns:
        The merged kernel [in, out] in kernel's dtype (computed in float32).
    """
    w = kernel.astype(jnp.float32)
    delta = adapter["lora_a"].astype(jnp.float32) @ adapter["lora_b"].astype(jnp.float32)
    merged = w + config.scaling * delta
    if config.kind == "dora":
        magnitude = adapter["magnitude"].astype(jnp.float32)[..., None, :]
        merged = merged * (magnitude / _column_norm(merged)[..., None, :])
    return merged.astype(kernel.dtype)


def merge_adapters(model: Any) -> int:
    """Folds every adapter of an nnx model into its base kernel, in place.

    Each module with an `adapter_config` (g2e.models.text.Projection) gets kernel <- merge(...),
    loses its nnx.LoRAParam variables and runs as a plain projection afterwards; the model's
    `adapter` attribute, if any, is cleared. Stacked (scanned) layers merge all at once.

    Returns:
        The number of projection modules merged (stacked layers count once).
    """
    from flax import nnx  # Only this model-level helper needs Flax.

    count = 0
    for _, module in list(nnx.iter_graph(model)):
        config = getattr(module, "adapter_config", None)
        if not isinstance(module, nnx.Module) or config is None:
            continue
        module.kernel.value = merge(module.kernel.value, module.adapter_state(), config)
        for name in ("lora_a", "lora_b", "magnitude"):
            if hasattr(module, name):
                delattr(module, name)
        module.adapter_config = None
        count += 1
    if hasattr(model, "adapter"):
        model.adapter = None
    return count
