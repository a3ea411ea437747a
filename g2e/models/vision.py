"""Qwen2-VL and Qwen2.5-VL vision towers: patch embedding, 2-D rotary ViT blocks, 2x2 merger.

Letters and logical axis names: the legend of `g2e.models` (W vision width, H vision heads,
F vision MLP width, C flattened patch, M = P // 4 merged tokens, S = 3 for query/key/value).

Several images (and videos) of one example are packed into its P patches (as the HF image
and video processors emit them, each 2x2 merge window's patches consecutive); `segment_ids`
(1, 2, ... per image and per temporal group of a video, 0 on padding) confine attention to one
image or one group of frames, like transformers' `cu_seqlens`. The host builds `segment_ids`
and the (row, col) rotary `positions` with `g2e.models.positions.vision_layout`. Where every
row holds at most one segment, attention takes each row's patch count as its key lengths
instead (no mask for cuDNN; `VisionTower._blocks`).

Video, and what it costs images. A patch of Qwen2-VL spans two temporal frames (the kernel is
[C = 3 x 2 x 14 x 14, W]). A still image's two frames are equal, so the host sends images one
frame wide (uint8 [B, P, 588]) and `embed_patches` multiplies by the kernel's two temporal
halves summed. A video's temporal group holds two different frames, so a batch holding any
video is sent two frames wide (uint8 [B, P, 1176]; its images' frames duplicated on the host,
which gives the same embedding as the summed kernel). The width is a property of the batch,
not a per-patch flag: image-only batches keep exactly today's bytes, program and FLOPs, and a
batch with video is one more program. A video of T frames (T even) is one input of grid
(T / 2, h, w): T / 2 segments, each the same (row, col) rotary positions, as transformers does.

Qwen2.5-VL (`VisionConfig.is_qwen2_5`) changes three things, all local: RMSNorm instead of
LayerNorm (blocks and merger), a SwiGLU MLP (gate_proj, up_proj, down_proj, with biases), and
attention within windows (`window_ids` from `g2e.models.positions.vision_window_ids`, in the same
patch order) in every block except `fullatt_block_indexes`. A per-layer boolean, scanned with the
stacked blocks, picks the block's segment ids: the image's or the window's.

Parameter logical axes: 'vision_embed' (W), 'vision_heads' (H), 'vision_mlp' (F and the
merger's hidden width), 'embed' (D), 'layers' (added by the stacking vmap). Activations:
'batch', 'patches', 'act_vision_embed', 'vision_heads', 'vision_mlp'.

Blocks are created stacked along a leading 'layers' axis (`nnx.vmap`) and run with
`jax.lax.scan`, rematerialised per layer by the text decoder's named policies
(`g2e.models.text.REMAT_POLICIES`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2e.models import attention as attention_lib
from g2e.models.config import VisionConfig
from g2e.models.sharding import constrain
from g2e.models.text import RMSNorm, remat_policy

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}

_LN_EPS = 1e-6  # transformers' vision LayerNorms (Qwen2-VL) and RMSNorms (Qwen2.5-VL)


def _axes(*names: str | None) -> dict[str, tuple[str | None, ...]]:
    return {"out_sharding": names}


def _layer_norm(width: int, axis: str, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance: the fast E[x^2] - E[x]^2 form loses the 1e-4 parity at width 1280.
    return nnx.LayerNorm(
        width,
        epsilon=_LN_EPS,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_metadata=_axes(axis),
        bias_metadata=_axes(axis),
        rngs=rngs,
    )


def _norm(
    config: VisionConfig, width: int, dtype, param_dtype, rngs: nnx.Rngs
) -> nnx.LayerNorm | RMSNorm:
    """Qwen2-VL's LayerNorm, or Qwen2.5-VL's RMSNorm (no bias; same eps)."""
    if config.is_qwen2_5:
        return RMSNorm(
            width, eps=_LN_EPS, dtype=dtype, param_dtype=param_dtype, axis_name="vision_embed"
        )
    return _layer_norm(width, "vision_embed", dtype, param_dtype, rngs)


def _linear(
    fan_in: int,
    fan_out: int,
    axes: tuple[str | None, str | None],
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    return nnx.Linear(
        fan_in,
        fan_out,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_metadata=_axes(*axes),
        bias_metadata=_axes(axes[1]),
        rngs=rngs,
    )


def rotary_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """float32 cos, sin [B, P, E] of the 2-D rotary embedding of (row, col) `positions` [B, P, 2].

    As transformers: E/4 frequencies; the first half of the head rotates with the row, the
    second half with the column, each half laid out [freqs, freqs] for `rotate_half`.
    """
    spatial = head_dim // 2
    inv_freq = 1.0 / theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, P, 2, E/4]
    angles = angles.reshape(*positions.shape[:-1], spatial)  # [row freqs, col freqs]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Applies the rotary tables [B, P, E] to x [B, P, H, E] in float32 (as transformers)."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


class VisionBlock(nnx.Module):
    """Pre-norm ViT block: x + Attn(norm1(x)), then x + MLP(norm2(x)).

    Qwen2-VL: LayerNorms, MLP fc2(act(fc1(x))) with QuickGELU. Qwen2.5-VL: RMSNorms, MLP
    down_proj(act(gate_proj(x)) * up_proj(x)) with SiLU.
    """

    def __init__(
        self,
        config: VisionConfig,
        *,
        dtype,
        param_dtype,
        attention: str | attention_lib.Kernel,
        rngs: nnx.Rngs,
    ):
        width, heads, head_dim = config.embed_dim, config.num_heads, config.head_dim
        mlp = config.mlp_width
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"vision_config.hidden_act={config.hidden_act!r} is not supported; "
                f"use one of {sorted(_ACTIVATIONS)}."
            )
        self.activation = config.hidden_act
        self.attention = attention_lib.as_kernel(attention)
        self.swiglu = config.is_qwen2_5
        self.norm1 = _norm(config, width, dtype, param_dtype, rngs)
        self.qkv = nnx.Einsum(
            "bpw,wshe->bpshe",
            (width, 3, heads, head_dim),
            (3, heads, head_dim),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            kernel_metadata=_axes("vision_embed", None, "vision_heads", None),
            bias_metadata=_axes(None, "vision_heads", None),
        )
        self.proj = nnx.Einsum(
            "bphe,hew->bpw",
            (heads, head_dim, width),
            (width,),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            kernel_metadata=_axes("vision_heads", None, "vision_embed"),
            bias_metadata=_axes("vision_embed"),
        )
        self.norm2 = _norm(config, width, dtype, param_dtype, rngs)
        up, down = ("vision_embed", "vision_mlp"), ("vision_mlp", "vision_embed")
        if self.swiglu:
            self.gate_proj = _linear(width, mlp, up, dtype, param_dtype, rngs)
            self.up_proj = _linear(width, mlp, up, dtype, param_dtype, rngs)
            self.down_proj = _linear(mlp, width, down, dtype, param_dtype, rngs)
        else:
            self.fc1 = _linear(width, mlp, up, dtype, param_dtype, rngs)
            self.fc2 = _linear(mlp, width, down, dtype, param_dtype, rngs)

    def mlp(self, x: jax.Array) -> jax.Array:
        """[B, P, W] -> [B, P, W]."""
        activation = _ACTIVATIONS[self.activation]
        axes = ("batch", "patches", "vision_mlp")
        if self.swiglu:
            hidden = activation(self.gate_proj(x)) * self.up_proj(x)
            return self.down_proj(constrain(hidden, axes))
        return self.fc2(constrain(activation(self.fc1(x)), axes))

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        lengths: jax.Array | None = None,
    ) -> jax.Array:
        """x [B, P, W] -> [B, P, W]; patches attend within `segment_ids` or `lengths`."""
        qkv = self.qkv(self.norm1(x))  # [B, P, S, H, E]
        query, key, value = (qkv[:, :, i] for i in range(3))
        query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
        query = constrain(query, ("batch", "patches", "vision_heads", None))
        out = attention_lib.attend(
            query,
            key,
            value,
            segment_ids=segment_ids,
            lengths=lengths,
            causal=False,
            implementation=self.attention,
        )
        x = x + self.proj(out)
        x = x + self.mlp(self.norm2(x))
        return constrain(x, ("batch", "patches", "act_vision_embed"))


class PatchMerger(nnx.Module):
    """Norm (LayerNorm; RMSNorm in 2.5), each 2x2 window's 4 patches concatenated, MLP to D."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.window = config.spatial_merge_size**2
        merged = config.embed_dim * self.window
        self.ln_q = _norm(config, config.embed_dim, dtype, param_dtype, rngs)
        self.fc1 = _linear(merged, merged, ("vision_embed", "vision_mlp"), dtype, param_dtype, rngs)
        self.fc2 = _linear(
            merged, config.hidden_size, ("vision_mlp", "embed"), dtype, param_dtype, rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, P, W] -> [B, M, D]."""
        batch, patches, width = x.shape
        x = self.ln_q(x).reshape(batch, patches // self.window, self.window * width)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
    """Qwen2(.5)-VL vision encoder: flattened patches [B, P, C] -> merged tokens [B, M, D]."""

    def __init__(
        self,
        config: VisionConfig,
        out_width: int | None = None,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        attention: str | attention_lib.Kernel = "xla",
        rngs: nnx.Rngs,
    ):
        """Builds the tower with random weights (real ones: `vision_params_from_hf`).

        Args:
          config: vision sizes.
          out_width: merger output width D; default `config.hidden_size` (the text width).
          dtype: compute dtype; param_dtype: parameter storage dtype.
          remat: per-layer rematerialisation policy name (see g2e.models.text.REMAT_POLICIES).
          attention: a kernel name or attention.Kernel (g2e.models.attention).
          rngs: initialisation RNGs.
        """
        remat_policy(remat)  # Fails early on an unknown name.
        if out_width is not None and out_width != config.hidden_size:
            config = dataclasses.replace(config, hidden_size=out_width)
        attention = attention_lib.as_kernel(attention)  # Fails early on an unknown name.
        self.attention = attention
        self.config = config
        self.dtype = dtype
        self.remat = remat
        # Parameters carry logical axis names only; g2e.models.sharding places them on a mesh.
        with nnx.use_eager_sharding(False):
            # Conv3d with stride = kernel over one patch is a matmul over the flattened patch.
            self.patch_embed = nnx.Param(
                nnx.initializers.lecun_normal()(
                    rngs.params(), (config.patch_dim, config.embed_dim), param_dtype
                ),
                out_sharding=(None, "vision_embed"),
            )

            @nnx.split_rngs(splits=config.depth)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs: nnx.Rngs) -> VisionBlock:
                return VisionBlock(
                    config, dtype=dtype, param_dtype=param_dtype, attention=attention, rngs=rngs
                )

            self.blocks = make_blocks(rngs)
            self.merger = PatchMerger(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def embed_patches(self, pixel_values: jax.Array) -> jax.Array:
        """Patch embeddings [B, P, W] of float patches [B, P, C] or uint8 patches.

        uint8 patches come one frame wide [B, P, C / 2] (an image: both temporal frames of a
        still image are equal) or two frames wide [B, P, C] (a video's temporal group, or any
        patch of a batch that holds video; laid out channel, frame, row, column as the HF
        processors flatten them). Each value is looked up in the processor's normalisation
        table (exact). One frame wide, the two temporal halves of the patch kernel are summed
        once instead of multiplying a duplicated frame, so an image costs half a video patch.
        """
        kernel = self.patch_embed[...]
        if pixel_values.dtype != jnp.uint8:
            return jnp.einsum(
                "bpc,cw->bpw", pixel_values.astype(self.dtype), kernel.astype(self.dtype)
            )
        config = self.config
        channels, frames = config.in_channels, config.temporal_patch_size
        batch, patches, width = pixel_values.shape
        if width not in (config.patch_dim, config.patch_dim // frames):
            raise ValueError(
                f"uint8 pixel_values have {width} values per patch; one frame of "
                f"{config.patch_dim // frames} (images) or {frames} frames of "
                f"{config.patch_dim} (video) are expected"
            )
        table = jnp.asarray(config.pixel_table())  # [3, 256]
        values = pixel_values.reshape(batch, patches, channels, -1).astype(jnp.int32)
        normalised = table[jnp.arange(channels)[:, None], values]  # [B, P, 3, C / 3]
        if width == config.patch_dim:
            patch_kernel = kernel
        else:
            patch_kernel = kernel.reshape(channels, frames, -1, kernel.shape[-1]).sum(axis=1)
        return jnp.einsum(
            "bpc,cw->bpw",
            normalised.reshape(batch, patches, width).astype(self.dtype),
            patch_kernel.reshape(width, -1).astype(self.dtype),
        )

    def __call__(
        self,
        pixel_values: jax.Array,
        segment_ids: jax.Array,
        positions: jax.Array,
        window_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Encodes packed images.

        Args:
          pixel_values: [B, P, C] flattened patches (HF image processor layout), zero padding;
            or, as the host sends them, uint8 [B, P, C / 2]: one frame of 8-bit values (an
            image's two temporal frames are equal), or uint8 [B, P, C] (both frames: a batch
            with video), normalised here with `pixel_table` (`embed_patches`).
          segment_ids: int [B, P], 1..n per image or per video temporal group (HF's
            cu_seqlens), 0 on padding.
          positions: int [B, P, 2] (row, col) of each patch.
          window_ids: int [B, P], Qwen2.5-VL's attention window of each patch
            (positions.vision_window_ids), 0 on padding; required by Qwen2.5-VL, unused by
            Qwen2-VL.

        Returns:
          [B, M, D] merged vision tokens in the compute dtype; rows of padding are zero.

        Raises:
          ValueError: P is not a multiple of 4, or a Qwen2.5-VL tower gets no window_ids.
        """
        window = self.config.spatial_merge_size**2
        if pixel_values.shape[1] % window:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} patches per example; the "
                f"patch bucket must be a multiple of {window}."
            )
        full_attention = self.config.full_attention_blocks
        if not all(full_attention) and window_ids is None:
            raise ValueError(
                "this Qwen2.5-VL vision tower attends within windows, so the batch "
                "needs 'vision_window_ids' (g2e.models.positions.vision_window_ids)."
            )
        x = self.embed_patches(pixel_values)
        x = constrain(x, ("batch", "patches", "act_vision_embed"))
        x = self._blocks(x, segment_ids, positions, window_ids)
        merged = self.merger(x)
        real = (segment_ids[:, ::window] > 0)[..., None]
        return jnp.where(real, merged, 0).astype(merged.dtype)

    def _blocks(self, x, segment_ids, positions, window_ids):
        """The stacked blocks over x [B, P, W], each image's patches attending to that image.

        Where every row holds at most one image (patches from position 0 on), attention takes
        each row's patch count as its key lengths: cuDNN then builds no [B, 1, P, P] mask. A
        row of several images (or video frames) needs segment ids, a mask on every kernel but
        splash; lax.cond picks per batch. Qwen2.5-VL's windowed blocks always need segments.
        """
        cos, sin = rotary_tables(positions, self.config.head_dim, self.config.rope_theta)
        graphdef, layers = nnx.split(self.blocks)
        full_attention = self.config.full_attention_blocks

        def run(x, segment_ids, lengths):
            def layer(x, scanned):
                layer_state, full = scanned
                ids = segment_ids
                if window_ids is not None:
                    ids = jnp.where(full, segment_ids, window_ids)
                block = nnx.merge(graphdef, layer_state)
                return block(x, cos, sin, segment_ids=ids, lengths=lengths), None

            if self.remat != "none":
                layer = jax.checkpoint(layer, policy=remat_policy(self.remat), prevent_cse=False)
            x, _ = jax.lax.scan(layer, x, (layers, jnp.asarray(full_attention)))
            return x

        kernel = attention_lib.resolve(self.attention, length=x.shape[1], dtype=self.dtype)
        if kernel == "pallas" or not all(full_attention):
            return run(x, segment_ids, None)
        lengths = jnp.maximum(jnp.sum(segment_ids > 0, axis=1, dtype=jnp.int32), 1)
        return jax.lax.cond(
            jnp.all(segment_ids <= 1),
            lambda x: run(x, None, lengths),
            lambda x: run(x, segment_ids, None),
            x,
        )


# ---- Hugging Face weight names -------------------------------------------------------------
# (our path in nnx.state(tower).to_pure_dict(), HF name after the prefix, kind). `{i}` marks a
# per-layer tensor stacked on our leading 'layers' axis. Kinds say how HF's layout maps to ours.
HF_NAMES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("patch_embed",), "patch_embed.proj.weight", "conv"),
    (("blocks", "norm1", "scale"), "blocks.{i}.norm1.weight", "same"),
    (("blocks", "norm1", "bias"), "blocks.{i}.norm1.bias", "same"),
    (("blocks", "qkv", "kernel"), "blocks.{i}.attn.qkv.weight", "qkv"),
    (("blocks", "qkv", "bias"), "blocks.{i}.attn.qkv.bias", "qkv_bias"),
    (("blocks", "proj", "kernel"), "blocks.{i}.attn.proj.weight", "proj"),
    (("blocks", "proj", "bias"), "blocks.{i}.attn.proj.bias", "same"),
    (("blocks", "norm2", "scale"), "blocks.{i}.norm2.weight", "same"),
    (("blocks", "norm2", "bias"), "blocks.{i}.norm2.bias", "same"),
    (("blocks", "fc1", "kernel"), "blocks.{i}.mlp.fc1.weight", "linear"),
    (("blocks", "fc1", "bias"), "blocks.{i}.mlp.fc1.bias", "same"),
    (("blocks", "fc2", "kernel"), "blocks.{i}.mlp.fc2.weight", "linear"),
    (("blocks", "fc2", "bias"), "blocks.{i}.mlp.fc2.bias", "same"),
    (("merger", "ln_q", "scale"), "merger.ln_q.weight", "same"),
    (("merger", "ln_q", "bias"), "merger.ln_q.bias", "same"),
    (("merger", "fc1", "kernel"), "merger.mlp.0.weight", "linear"),
    (("merger", "fc1", "bias"), "merger.mlp.0.bias", "same"),
    (("merger", "fc2", "kernel"), "merger.mlp.2.weight", "linear"),
    (("merger", "fc2", "bias"), "merger.mlp.2.bias", "same"),
)

# Qwen2.5-VL: the same attention, patch embedding and merger MLP; its RMSNorms have no bias and
# the block MLP is SwiGLU.
HF_NAMES_QWEN2_5: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("patch_embed",), "patch_embed.proj.weight", "conv"),
    (("blocks", "norm1", "scale"), "blocks.{i}.norm1.weight", "same"),
    (("blocks", "qkv", "kernel"), "blocks.{i}.attn.qkv.weight", "qkv"),
    (("blocks", "qkv", "bias"), "blocks.{i}.attn.qkv.bias", "qkv_bias"),
    (("blocks", "proj", "kernel"), "blocks.{i}.attn.proj.weight", "proj"),
    (("blocks", "proj", "bias"), "blocks.{i}.attn.proj.bias", "same"),
    (("blocks", "norm2", "scale"), "blocks.{i}.norm2.weight", "same"),
    (("blocks", "gate_proj", "kernel"), "blocks.{i}.mlp.gate_proj.weight", "linear"),
    (("blocks", "gate_proj", "bias"), "blocks.{i}.mlp.gate_proj.bias", "same"),
    (("blocks", "up_proj", "kernel"), "blocks.{i}.mlp.up_proj.weight", "linear"),
    (("blocks", "up_proj", "bias"), "blocks.{i}.mlp.up_proj.bias", "same"),
    (("blocks", "down_proj", "kernel"), "blocks.{i}.mlp.down_proj.weight", "linear"),
    (("blocks", "down_proj", "bias"), "blocks.{i}.mlp.down_proj.bias", "same"),
    (("merger", "ln_q", "scale"), "merger.ln_q.weight", "same"),
    (("merger", "fc1", "kernel"), "merger.mlp.0.weight", "linear"),
    (("merger", "fc1", "bias"), "merger.mlp.0.bias", "same"),
    (("merger", "fc2", "kernel"), "merger.mlp.2.weight", "linear"),
    (("merger", "fc2", "bias"), "merger.mlp.2.bias", "same"),
)


def hf_names(config: VisionConfig) -> tuple[tuple[tuple[str, ...], str, str], ...]:
    """The HF name table of the tower `config` describes (Qwen2-VL or Qwen2.5-VL)."""
    return HF_NAMES_QWEN2_5 if config.is_qwen2_5 else HF_NAMES


def _from_hf_layout(kind: str, array: np.ndarray, config: VisionConfig) -> np.ndarray:
    heads, head_dim = config.num_heads, config.head_dim
    if kind == "same":
        return array
    if kind == "linear":  # torch [out, in] -> [in, out]
        return array.T
    if kind == "conv":  # [W, 3, 2, 14, 14] -> [C, W]
        return array.reshape(array.shape[0], -1).T
    if kind == "qkv":  # [S*H*E, W] -> [W, S, H, E]
        return array.T.reshape(array.shape[1], 3, heads, head_dim)
    if kind == "qkv_bias":  # [S*H*E] -> [S, H, E]
        return array.reshape(3, heads, head_dim)
    if kind == "proj":  # [W, H*E] -> [H, E, W]
        return array.T.reshape(heads, head_dim, array.shape[0])
    raise ValueError(f"unknown layout kind {kind!r}")


def _to_hf_layout(kind: str, array: np.ndarray, config: VisionConfig) -> np.ndarray:
    if kind == "same":
        return array
    if kind == "linear":
        return array.T
    if kind == "conv":
        return array.T.reshape(
            config.embed_dim,
            config.in_channels,
            config.temporal_patch_size,
            config.patch_size,
            config.patch_size,
        )
    if kind == "qkv":
        return array.reshape(array.shape[0], -1).T
    if kind == "qkv_bias":
        return array.reshape(-1)
    if kind == "proj":
        return array.reshape(-1, array.shape[-1]).T
    raise ValueError(f"unknown layout kind {kind!r}")


def vision_params_from_hf(
    get_tensor: Callable[[str], np.ndarray], config: VisionConfig, prefix: str = "visual."
) -> dict:
    """Reads HF vision weights into a pure dict shaped like `nnx.state(VisionTower(...))`.

    Args:
      get_tensor: returns the numpy array stored under a full HF name (raises KeyError if
        absent).
      config: the vision config (head split of the fused qkv weight).
      prefix: HF name prefix of the tower ('visual.' in saved checkpoints, 'model.visual.' in
        transformers 5 module names).

    Returns:
      nested dict of numpy arrays; use `nnx.replace_by_pure_dict(state, result)`.
    """
    out: dict = {}
    for path, hf_name, kind in hf_names(config):
        if "{i}" in hf_name:
            array = np.stack(
                [
                    _from_hf_layout(kind, get_tensor(prefix + hf_name.format(i=i)), config)
                    for i in range(config.depth)
                ]
            )
        else:
            array = _from_hf_layout(kind, get_tensor(prefix + hf_name), config)
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = array
    return out


def vision_params_to_hf(
    params: dict, config: VisionConfig, prefix: str = "visual."
) -> dict[str, np.ndarray]:
    """The inverse of `vision_params_from_hf`: pure dict of the tower -> {HF name: array}."""
    out = {}
    for path, hf_name, kind in hf_names(config):
        array = params
        for key in path:
            array = array[key]
        array = np.asarray(array)
        if "{i}" in hf_name:
            for i in range(config.depth):
                out[prefix + hf_name.format(i=i)] = _to_hf_layout(kind, array[i], config)
        else:
            out[prefix + hf_name] = _to_hf_layout(kind, array, config)
    return out
