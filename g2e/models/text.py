"""Qwen2 text decoder with multimodal rotary embeddings (M-RoPE), layers stacked and scanned.

Letters and logical axis names: the legend of `g2e.models`. Parameters: 'vocab' (V), 'embed'
(D), 'heads' (H*E), 'kv_heads' (K*E), 'mlp' (F), 'layers' (N, added by the stacking vmap).
Activations: 'batch' (B), 'length' (L), 'act_embed' (D).

Adapters (g2e.models.lora) sit on the projections. Their parameters are float32 whatever
`param_dtype` is (only they train); the frozen weights keep `param_dtype`. In training, one
dropout mask per input is shared by the projections that read it (q, k and v; gate and up),
and DoRA's weight norms can be computed once per step (`TextDecoder.dora_norms`) and passed in
(`norms=`), so the layer scan does not rebuild them in every call.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2e.models import attention as attention_lib
from g2e.models import lora
from g2e.models.config import TextConfig
from g2e.models.sharding import constrain

# Remat policies by name (the same names as the vision tower's): 'none' keeps every
# activation, 'full' recomputes each layer, 'dots' / 'dots_no_batch' keep matmul outputs.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_normal = nnx.initializers.normal(0.02)


def remat_policy(name: str):
    """Checks a remat policy name; see REMAT_POLICIES."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {name!r}")
    return REMAT_POLICIES[name]


# The remat policy of decoders traced inside `remat_override` (None: each decoder's own).
_REMAT_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "remat_override", default=None
)


@contextlib.contextmanager
def remat_override(name: str | None) -> Iterator[None]:
    """Within, every TextDecoder traced rematerialises its layers per policy `name` (None:
    its own `remat`). The train step's `train.backprop=auto` chooses one per batch shape
    (g2e.training.step.CompiledSteps) without rebuilding the model."""
    if name is not None:
        remat_policy(name)
    token = _REMAT_OVERRIDE.set(name)
    try:
        yield
    finally:
        _REMAT_OVERRIDE.reset(token)


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, scaled after the cast back (as HF Qwen2RMSNorm)."""

    def __init__(
        self, dim: int, *, eps: float, dtype: Any, param_dtype: Any, axis_name: str = "embed"
    ):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis_name,))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale.value.astype(self.dtype) * x32.astype(self.dtype)


class Projection(nnx.Module):
    """Dense y = x @ W (+ b), W [in, out]; carries a LoRA/DoRA adapter when configured.

    All text projections (q/k/v/o, gate/up/down) are this class, so adapters attach in one place:
    `name` is the HF/PEFT projection name matched against `adapter.targets`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        name: str,
        axes: tuple[str, str],
        use_bias: bool,
        dtype: Any,
        param_dtype: Any,
        adapter: lora.AdapterConfig | None,
        rngs: nnx.Rngs,
    ):
        self.name = name
        self.dtype = dtype
        self.kernel = nnx.Param(
            _normal(rngs.params(), (in_features, out_features), param_dtype), out_sharding=axes
        )
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype), out_sharding=(axes[1],))
            if use_bias
            else None
        )
        self.adapter_config = adapter if adapter is not None and name in adapter.targets else None
        if self.adapter_config is not None:
            # float32 (lora.ADAPTER_DTYPE) whatever param_dtype: bf16 rounds small updates away.
            state = lora.init_adapter(
                rngs.params(), in_features, out_features, self.kernel.value, self.adapter_config
            )
            self.lora_a = nnx.LoRAParam(state["lora_a"], out_sharding=(axes[0], None))
            self.lora_b = nnx.LoRAParam(state["lora_b"], out_sharding=(None, axes[1]))
            if "magnitude" in state:
                self.magnitude = nnx.LoRAParam(state["magnitude"], out_sharding=(axes[1],))

    def adapter_state(self) -> dict[str, jax.Array]:
        """The adapter's arrays by lora.py's keys ({} without an adapter)."""
        if self.adapter_config is None:
            return {}
        state = {"lora_a": self.lora_a.value, "lora_b": self.lora_b.value}
        if self.adapter_config.kind == "dora":
            state["magnitude"] = self.magnitude.value
        return state

    def dora_norm(self) -> jax.Array | None:
        """DoRA's ||W + s A B||_c [..., out] (float32, no gradient), or None without DoRA."""
        if self.adapter_config is None or self.adapter_config.kind != "dora":
            return None
        return lora.dora_norm(self.kernel.value, self.adapter_state(), self.adapter_config)

    def __call__(
        self,
        x: jax.Array,
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
        dropped: jax.Array | None = None,
        norm: jax.Array | None = None,
    ) -> jax.Array:
        """y = x @ W (+ b) (+ the adapter's update; `dropped`, `norm`: see lora.apply)."""
        x = x.astype(self.dtype)
        bias = None if self.bias is None else self.bias.value
        if self.adapter_config is not None:
            if dropped is not None:
                dropped = dropped.astype(self.dtype)
            return lora.apply(
                x,
                self.kernel.value,
                bias,
                self.adapter_state(),
                self.adapter_config,
                deterministic=deterministic,
                rng=rng,
                dropped=dropped,
                norm=norm,
            )
        y = x @ self.kernel.value.astype(self.dtype)
        return y if bias is None else y + bias.astype(self.dtype)


def shared_dropout(
    x: jax.Array, projections: tuple[Projection, ...], *, deterministic: bool, rng: jax.Array | None
) -> jax.Array | None:
    """One dropout mask for every adapted projection of the input x (None: no adapter here).

    PEFT draws a mask per projection; sharing one per input halves the random bits and the
    masked copies, and every projection still sees dropout at the configured rate.
    """
    adapted = [p.adapter_config for p in projections if p.adapter_config is not None]
    if not adapted:
        return None
    return lora.dropout(x.astype(projections[0].dtype), adapted[0].dropout, deterministic, rng)


def _split(rng: jax.Array | None, num: int) -> list:
    return [None] * num if rng is None else list(jax.random.split(rng, num))


def _get(norms: dict | None, name: str):
    return None if norms is None else norms.get(name)


def mrope_cos_sin(
    position_ids: jax.Array, config: TextConfig, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, L, E] of M-RoPE from position ids [3, B, L] (HF Qwen2VLRotaryEmbedding).

    Frequency j (of E/2) rotates with the temporal, height or width id according to
    `mrope_section`; the halves are duplicated for rotate-half application.
    """
    head_dim = config.head_dim
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, E/2]
    # Static choice of axis per frequency: section i uses axis i % 3 (HF's
    # recomposition_frequencies).
    axis_of_freq = np.repeat(np.arange(len(config.mrope_section)) % 3, config.mrope_section)
    freqs = jnp.take_along_axis(freqs, axis_of_freq[None, None, None, :], axis=0)[0]
    freqs = jnp.concatenate([freqs, freqs], axis=-1)  # [B, L, E]
    return jnp.cos(freqs).astype(dtype), jnp.sin(freqs).astype(dtype)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, L, H or K, E] rotated by cos/sin [B, L, E] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nnx.Module):
    """Grouped-query self-attention with q/k/v bias and M-RoPE."""

    def __init__(
        self,
        config: TextConfig,
        *,
        dtype,
        param_dtype,
        attention: attention_lib.Kernel | str,
        adapter,
        rngs: nnx.Rngs,
    ):
        d, e = config.hidden_size, config.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, adapter=adapter, rngs=rngs)
        self.q_proj = Projection(
            d, config.num_heads * e, name="q_proj", axes=("embed", "heads"), use_bias=True, **kw
        )
        self.k_proj = Projection(
            d,
            config.num_kv_heads * e,
            name="k_proj",
            axes=("embed", "kv_heads"),
            use_bias=True,
            **kw,
        )
        self.v_proj = Projection(
            d,
            config.num_kv_heads * e,
            name="v_proj",
            axes=("embed", "kv_heads"),
            use_bias=True,
            **kw,
        )
        self.o_proj = Projection(
            config.num_heads * e, d, name="o_proj", axes=("heads", "embed"), use_bias=False, **kw
        )
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, e
        self.attention = attention_lib.as_kernel(attention)

    def _qkv_input(self, x, deterministic, rng):
        return shared_dropout(
            x, (self.q_proj, self.k_proj, self.v_proj), deterministic=deterministic, rng=rng
        )

    def __call__(self, x, cos, sin, lengths, *, deterministic, rng, norms=None, segment_ids=None):
        """Causal self-attention of rows aligned by `PaddedRows` (`lengths` [B] real tokens;
        `segment_ids` [B, L]: packed rows, each token sees its own segment only)."""
        b, l, _ = x.shape
        qkv_key, o_key = _split(rng, 2)
        dropped = self._qkv_input(x, deterministic, qkv_key)
        kw = dict(deterministic=deterministic, dropped=dropped)
        q = self.q_proj(x, norm=_get(norms, "q_proj"), **kw)
        k = self.k_proj(x, norm=_get(norms, "k_proj"), **kw)
        v = self.v_proj(x, norm=_get(norms, "v_proj"), **kw)
        q = q.reshape(b, l, self.num_heads, self.head_dim)
        k = k.reshape(b, l, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, l, self.num_kv_heads, self.head_dim)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = attention_lib.attend(
            q,
            k,
            v,
            lengths=lengths,
            segment_ids=segment_ids,
            causal=True,
            implementation=self.attention,
        )
        return self.o_proj(
            out.reshape(b, l, -1),
            deterministic=deterministic,
            rng=o_key,
            norm=_get(norms, "o_proj"),
        )

    def at_positions(self, x, cos, sin, index, *, deterministic, rng, norms=None, segment_ids=None):
        """Attention output [B, S, D] for the queries at `index` [B, S] of each (aligned) row
        (`segment_ids`: packed rows, see `attention.attend_at`)."""
        (b, l, _), s = x.shape, index.shape[1]
        qkv_key, o_key = _split(rng, 2)
        dropped = self._qkv_input(x, deterministic, qkv_key)
        pick = lambda a: jnp.take_along_axis(a, index[:, :, None], axis=1)  # noqa: E731
        kw = dict(deterministic=deterministic)
        q = self.q_proj(
            pick(x),
            dropped=None if dropped is None else pick(dropped),
            norm=_get(norms, "q_proj"),
            **kw,
        )
        k = self.k_proj(x, dropped=dropped, norm=_get(norms, "k_proj"), **kw)
        v = self.v_proj(x, dropped=dropped, norm=_get(norms, "v_proj"), **kw)
        q = q.reshape(b, s, self.num_heads, self.head_dim)
        k = k.reshape(b, l, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, l, self.num_kv_heads, self.head_dim)
        q, k = _rotate(q, pick(cos), pick(sin)), _rotate(k, cos, sin)
        out = attention_lib.attend_at(q, k, v, index=index, segment_ids=segment_ids)
        return self.o_proj(
            out.reshape(b, s, -1),
            deterministic=deterministic,
            rng=o_key,
            norm=_get(norms, "o_proj"),
        )


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: TextConfig, *, dtype, param_dtype, adapter, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, adapter=adapter, rngs=rngs)
        self.gate_proj = Projection(d, f, name="gate_proj", axes=("embed", "mlp"), **kw)
        self.up_proj = Projection(d, f, name="up_proj", axes=("embed", "mlp"), **kw)
        self.down_proj = Projection(f, d, name="down_proj", axes=("mlp", "embed"), **kw)

    def __call__(self, x, *, deterministic, rng, norms=None):
        in_key, down_key = _split(rng, 2)
        dropped = shared_dropout(
            x, (self.gate_proj, self.up_proj), deterministic=deterministic, rng=in_key
        )
        kw = dict(deterministic=deterministic, dropped=dropped)
        gate = self.gate_proj(x, norm=_get(norms, "gate_proj"), **kw)
        hidden = jax.nn.silu(gate) * self.up_proj(x, norm=_get(norms, "up_proj"), **kw)
        hidden = constrain(hidden, ("batch", "length", "act_mlp"))
        return self.down_proj(
            hidden, deterministic=deterministic, rng=down_key, norm=_get(norms, "down_proj")
        )


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self, config: TextConfig, *, dtype, param_dtype, attention, adapter, rngs: nnx.Rngs
    ):
        norm = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            attention=attention,
            adapter=adapter,
            rngs=rngs,
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, adapter=adapter, rngs=rngs)

    def __call__(self, x, cos, sin, lengths, *, deterministic, rng, norms=None, segment_ids=None):
        keys = _split(rng, 2)
        x = x + self.self_attn(
            self.input_layernorm(x),
            cos,
            sin,
            lengths,
            deterministic=deterministic,
            rng=keys[0],
            norms=_get(norms, "self_attn"),
            segment_ids=segment_ids,
        )
        x = x + self.mlp(
            self.post_attention_layernorm(x),
            deterministic=deterministic,
            rng=keys[1],
            norms=_get(norms, "mlp"),
        )
        return constrain(x, ("batch", "length", "act_embed"))

    def at_positions(self, x, cos, sin, index, *, deterministic, rng, norms=None, segment_ids=None):
        """The block's output [B, S, D] at positions `index` [B, S] only (keys/values from all
        of x)."""
        keys = _split(rng, 2)
        rows = jnp.take_along_axis(x, index[:, :, None], axis=1)  # [B, S, D]
        rows = rows + self.self_attn.at_positions(
            self.input_layernorm(x),
            cos,
            sin,
            index,
            deterministic=deterministic,
            rng=keys[0],
            norms=_get(norms, "self_attn"),
            segment_ids=segment_ids,
        )
        rows = rows + self.mlp(
            self.post_attention_layernorm(rows),
            deterministic=deterministic,
            rng=keys[1],
            norms=_get(norms, "mlp"),
        )
        return rows


class TextDecoder(nnx.Module):
    """Token embedding, N stacked decoder layers (one lax.scan), final RMSNorm."""

    def __init__(
        self,
        config: TextConfig,
        *,
        dtype: Any,
        param_dtype: Any,
        remat: str,
        attention: attention_lib.Kernel | str,
        adapter: lora.AdapterConfig | None,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        self.remat = remat
        remat_policy(remat)
        self.embed_tokens = nnx.Param(
            _normal(rngs.params(), (config.vocab_size, config.hidden_size), param_dtype),
            out_sharding=("vocab", "embed"),
        )

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(layer_rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(
                config,
                dtype=dtype,
                param_dtype=param_dtype,
                attention=attention,
                adapter=adapter,
                rngs=layer_rngs,
            )

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings [B, L, D] in the compute dtype."""
        return jnp.take(self.embed_tokens.value, input_ids, axis=0).astype(self.dtype)

    def dora_norms(self) -> dict | None:
        """Every DoRA weight norm of the stacked layers, {'self_attn': {'q_proj': [N, out], ...},
        'mlp': {...}} (float32, no gradient), for `norms=`; None without DoRA adapters."""
        norms: dict = {}
        for block in ("self_attn", "mlp"):
            for name, module in vars(getattr(self.layers, block)).items():
                norm = module.dora_norm() if isinstance(module, Projection) else None
                if norm is not None:
                    norms.setdefault(block, {})[name] = norm
        return norms or None

    def __call__(
        self,
        inputs_embeds: jax.Array,
        position_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
        pool_index: jax.Array | None = None,
        dora_norms: dict | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Runs the decoder.

        Args:
            inputs_embeds: [B, L, D]; position_ids: [3, B, L]; attention_mask: [B, L], 1 on
                real tokens, which are one run in every row (padded left or right).
            segment_ids: int [B, L] or None: packed rows (g2e.data.batching.Batcher.pack),
                several examples one after another, each token seeing its own example only.
            deterministic, rng: adapter dropout off/on and its key.
            dora_norms: `self.dora_norms()` computed beforehand (once per train step); None
                computes each layer's norms inside the scan.
            pool_index: int [B] or [B, S] (packed rows: S segments), or None. When given,
                only the final hidden states at those positions are computed: the last layer's
                queries, output projection and MLP run for those tokens (their keys/values
                still see all).

        Returns:
            Final-norm hidden states [B, L, D], or [B, D] / [B, S, D] at `pool_index`.
        """
        # One rotation per forward puts every row's real tokens first (left padding included),
        # so each layer's attention takes sequence lengths instead of a mask (see
        # g2e.models.attention); the hidden states are rotated back at the end.
        rows = attention_lib.PaddedRows.from_mask(attention_mask)
        cos, sin = (rows.align(t) for t in mrope_cos_sin(position_ids, self.config, self.dtype))
        graphdef, layer_state = nnx.split(self.layers)
        num_layers = self.config.num_layers
        layer_rngs = (
            jnp.zeros((num_layers,), jnp.uint32)
            if rng is None
            else jax.random.split(rng, num_layers)
        )
        layer_args = dict(cos=cos, sin=sin, deterministic=deterministic, use_rng=rng is not None)
        if segment_ids is not None:
            segment_ids = rows.align(segment_ids)
        body = self._scan_body(graphdef, rows, segment_ids, **layer_args)
        x = rows.align(inputs_embeds.astype(self.dtype))
        x = constrain(x, ("batch", "length", "act_embed"))
        scanned = (layer_state, layer_rngs, dora_norms)
        if pool_index is None:
            x, _ = jax.lax.scan(body, x, scanned)
            return rows.restore(self.norm(x))
        # Every layer but the last over all positions; the last one at the pooled token only.
        x, _ = jax.lax.scan(body, x, jax.tree.map(lambda a: a[:-1], scanned))
        last_state, last_rng, last_norms = jax.tree.map(lambda a: a[-1], scanned)
        index = pool_index if pool_index.ndim == 2 else pool_index[:, None]
        pooled = nnx.merge(graphdef, last_state).at_positions(
            x,
            cos,
            sin,
            rows.aligned_index(index, x.shape[1]),
            deterministic=deterministic,
            rng=last_rng if layer_args["use_rng"] else None,
            norms=last_norms,
            segment_ids=segment_ids,
        )
        pooled = self.norm(pooled)
        return pooled if pool_index.ndim == 2 else pooled[:, 0]

    def _scan_body(self, graphdef, rows, segment_ids, *, cos, sin, deterministic, use_rng):
        """The lax.scan body that applies one stacked layer (rematerialised per `self.remat`,
        or per the policy of an enclosing `remat_override`)."""

        def body(x, scanned):
            state, layer_rng, norms = scanned
            layer = nnx.merge(graphdef, state)
            x = layer(
                x,
                cos,
                sin,
                rows.lengths,
                deterministic=deterministic,
                rng=layer_rng if use_rng else None,
                norms=norms,
                segment_ids=segment_ids,
            )
            return x, None

        remat = _REMAT_OVERRIDE.get() or self.remat
        if remat != "none":
            body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=False)
        return body
