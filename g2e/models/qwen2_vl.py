"""Qwen2-VL as one nnx.Module: vision tower, embedding merge, text decoder, LM head, pooling.

Letters: the legend of `g2e.models` (Q is the number of positions asked for in `logits_at`).

The batch is the host dict described in the design notes (input_ids, attention_mask,
position_ids [3, B, L], pixel_values [B, P, 1176] (uint8 [B, P, 588] for image-only batches:
g2e.models.vision), vision_segment_ids, vision_positions, image_token_index, last_index). A
batch with P == 0 (or no pixel_values) skips the tower.

Video: an example's `<|video_pad|>` tokens (config.video_token_id) take merged vision tokens
exactly as its `<|image_pad|>` tokens do. image_token_index numbers the vision tokens of both
kinds in text order, and the patches of the example's images and videos lie in pixel_values in
that same order, so one gather serves both (transformers scatters image features and video
features separately, to the same places).

Qwen2.5-VL (config.model_type 'qwen2_5_vl') is the same model with another vision tower; its
batch has one more field, vision_window_ids [B, P] (g2e.models.positions.vision_window_ids:
each patch's attention window, in the same patch order; 0 on padding). Everything else,
image_token_index included, is laid out exactly as for Qwen2-VL.

A packed batch (g2e.data.batching.Batcher.pack) holds several examples per row, one after
another: segment_ids [B, L] (1, 2, ... per example, 0 on padding) keep each example's tokens to
themselves, positions restart per example, and last_index [B, S] names each example's last
token. Its patches lie in vision rows of their own (pixel_values [V, P, ...] and the other
vision fields with V rows, V apart from B: several examples' images per vision row), and
merged_token_index [B, L] replaces image_token_index: each vision token's merged token in the
vision rows flattened to [V * P / 4].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from g2e.models import attention as attention_lib
from g2e.models import lora
from g2e.models.config import Qwen2VLConfig
from g2e.models.text import TextDecoder, _normal
from g2e.models.vision import VisionTower

# The batch fields the vision tower reads (Qwen2.5-VL adds vision_window_ids).
VISION_FIELDS = ("pixel_values", "vision_segment_ids", "vision_positions", "vision_window_ids")


class Qwen2VL(nnx.Module):
    """Qwen2VLForConditionalGeneration (or Qwen2_5_VL...) in JAX: `model(batch)` -> [B, L, D].

    The output is the final-norm hidden state; `config.model_type` picks the vision tower.
    """

    def __init__(
        self,
        config: Qwen2VLConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: str = "none",
        attention: str | attention_lib.Kernel = "xla",
        adapter: lora.AdapterConfig | None = None,
        rngs: nnx.Rngs,
    ):
        """Builds the model with random weights (load real ones with hf_io.load_model).

        Args:
            config: model sizes and special token ids.
            dtype: compute dtype (activations), e.g. jnp.bfloat16.
            param_dtype: parameter storage dtype (float32 or bfloat16).
            remat: rematerialisation policy of the scanned layers: 'none', 'full', 'dots', ...
            attention: a kernel name ('auto', 'xla', 'cudnn', 'pallas') or an attention.Kernel
                (the name and the splash tiles); see g2e.models.attention.
            adapter: LoRA/DoRA config for the text projections, or None.
            rngs: parameter initialisation RNGs.
        """
        self.config = config
        self.dtype = dtype
        self.adapter = adapter
        # Parameters carry logical (not mesh) axis names; sharding.create_sharded places them.
        with nnx.use_eager_sharding(False):
            self.visual = VisionTower(
                config.vision,
                dtype=dtype,
                param_dtype=param_dtype,
                remat=remat,
                attention=attention,
                rngs=rngs,
            )
            self.language_model = TextDecoder(
                config.text,
                dtype=dtype,
                param_dtype=param_dtype,
                remat=remat,
                attention=attention,
                adapter=adapter,
                rngs=rngs,
            )
            # Tied checkpoints reuse the token embedding as the head (see head_kernel).
            self.lm_head = nnx.data(
                None
                if config.tie_word_embeddings
                else nnx.Param(
                    _normal(
                        rngs.params(),
                        (config.text.hidden_size, config.text.vocab_size),
                        param_dtype,
                    ),
                    out_sharding=("embed", "vocab"),
                )
            )

    def vision_tokens(
        self, batch: Mapping[str, jax.Array], *, groups: int = 1, chunk: int = 0
    ) -> jax.Array | None:
        """The frozen tower's merged vision tokens [B, M, D]; None when the batch has no patches.

        A train step computes them once per side, outside the gradient (the tower is frozen
        in training), and hands them to every pass of `embed(..., vision_tokens=)`.

        Args:
            batch: the model batch (its pixel_values and vision fields).
            groups: row groups of the batch, one per device along the batch axes (rows laid
                out device-major); reordering rows stays inside a group.
            chunk: 0 runs the tower over all rows at once. Otherwise each group's rows are put
                image-first and the tower runs over `chunk` rows of every group at a time,
                skipped (zeros) for chunks without an image, so text-only rows cost nothing.

        Returns:
            [B, M, D] in the compute dtype, in the batch's row order (zeros for text rows).
        """
        pixel_values = batch.get("pixel_values")
        if pixel_values is None or pixel_values.shape[1] == 0:
            return None
        fields = {k: batch[k] for k in VISION_FIELDS if batch.get(k) is not None}

        def tower(f):
            return self.visual(
                f["pixel_values"],
                f["vision_segment_ids"],
                f["vision_positions"],
                f.get("vision_window_ids"),
            )

        return tower(fields) if not chunk else _images_first(tower, fields, groups, chunk)

    def input_embeddings(
        self, batch: Mapping[str, jax.Array], vision_tokens: jax.Array | None = None
    ) -> jax.Array:
        """Token embeddings [B, L, D], each <|image_pad|> and <|video_pad|> replaced by its
        merged vision token (image_token_index counts both kinds, in text order).

        `vision_tokens` [B, M, D]: `self.vision_tokens(batch)` computed beforehand (else here);
        for a packed batch (merged_token_index), [V, M, D] or flattened [V * M, D].
        """
        input_ids = batch["input_ids"]
        embeds = self.language_model.embed(input_ids)
        if vision_tokens is None:
            vision_tokens = self.vision_tokens(batch)
        if vision_tokens is None:
            return embeds
        vision_tokens = vision_tokens.astype(embeds.dtype)
        if "merged_token_index" in batch:  # packed: vision rows of their own
            flat = vision_tokens.reshape(-1, vision_tokens.shape[-1])
            gathered = jnp.take(flat, batch["merged_token_index"].astype(jnp.int32), axis=0)
        else:
            index = batch["image_token_index"][..., None].astype(jnp.int32)  # [B, L, 1]
            gathered = jnp.take_along_axis(vision_tokens, index, axis=1)
        is_vision = (input_ids == self.config.image_token_id) | (
            input_ids == self.config.video_token_id
        )
        return jnp.where(is_vision[..., None], gathered, embeds)

    def __call__(
        self,
        batch: Mapping[str, jax.Array],
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """Final-norm hidden states [B, L, D] in the compute dtype.

        `deterministic=False` with an `rng` turns adapter dropout on (training).
        """
        embeds = self.input_embeddings(batch)
        return self.language_model(
            embeds,
            batch["position_ids"],
            batch["attention_mask"],
            deterministic=deterministic,
            rng=rng,
            segment_ids=batch.get("segment_ids"),
        )

    def pooled_hidden(
        self,
        batch: Mapping[str, jax.Array],
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
        vision_tokens: jax.Array | None = None,
        dora_norms: dict | None = None,
    ) -> jax.Array:
        """Final-norm hidden state [B, D] at batch['last_index'] (compute dtype); [B, S, D]
        for a packed batch (last_index [B, S], segment_ids [B, L]: g2e.data.batching).

        Equal to `self(batch)` at those positions, but the last layer runs only there.
        `vision_tokens`, `dora_norms`: computed beforehand (see `embed`).
        """
        embeds = self.input_embeddings(batch, vision_tokens)
        return self.language_model(
            embeds,
            batch["position_ids"],
            batch["attention_mask"],
            deterministic=deterministic,
            rng=rng,
            pool_index=batch["last_index"].astype(jnp.int32),
            dora_norms=dora_norms,
            segment_ids=batch.get("segment_ids"),
        )

    def dora_norms(self) -> dict | None:
        """The text decoder's DoRA weight norms (TextDecoder.dora_norms), for `embed`."""
        return self.language_model.dora_norms()

    def head_kernel(self) -> jax.Array:
        """The LM head as [D, V] (the transposed token embedding when tied)."""
        if self.lm_head is None:
            return self.language_model.embed_tokens.value.T
        return self.lm_head.value

    def logits_at(self, hidden: jax.Array, positions: jax.Array) -> jax.Array:
        """Logits at chosen positions only.

        hidden [B, L, D], positions [B] or [B, Q] -> logits [B, V] or [B, Q, V].

        Only the chosen rows go through the head, so no [B, L, V] tensor is ever formed.
        """
        squeeze = positions.ndim == 1
        positions = positions[:, None] if squeeze else positions
        rows = jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)
        logits = rows @ self.head_kernel().astype(hidden.dtype)
        return logits[:, 0] if squeeze else logits

    def embed(
        self,
        batch: Mapping[str, jax.Array],
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
        vision_tokens: jax.Array | None = None,
        dora_norms: dict | None = None,
    ) -> jax.Array:
        """L2-normalised float32 embeddings [B, D] of the hidden state at batch['last_index']
        ([B, S, D] for a packed batch).

        `deterministic=False` with an `rng` turns adapter dropout on (training).
        `vision_tokens` ([B, M, D], `self.vision_tokens(batch)`) and `dora_norms`
        (`self.dora_norms()`) computed beforehand are used instead of computing them here: a
        train step computes both once and reuses them in every pass over its chunks.
        """
        pooled = self.pooled_hidden(
            batch,
            deterministic=deterministic,
            rng=rng,
            vision_tokens=vision_tokens,
            dora_norms=dora_norms,
        ).astype(jnp.float32)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def _images_first(tower, fields: dict[str, jax.Array], groups: int, chunk: int) -> jax.Array:
    """tower(fields) [B, M, D], run over image rows only, `chunk` rows of every group at a time.

    Each group's rows are stably sorted image-first (a batched gather along the row axis, so
    with one group per device no row leaves its device); a scan over chunks runs the tower
    under lax.cond where some row of the chunk has an image, zeros elsewhere; the inverse
    permutation puts the tokens back in row order.
    """
    rows = fields["pixel_values"].shape[0]
    if rows % groups or (rows // groups) % chunk:
        raise ValueError(
            f"vision_tokens: {rows} rows do not split into {groups} groups of "
            f"chunks of {chunk} rows; make train.vision_chunk divide the rows per "
            "device."
        )
    per_group = rows // groups
    num = per_group // chunk
    grouped = {k: v.reshape(groups, per_group, *v.shape[1:]) for k, v in fields.items()}
    has_image = jnp.any(grouped["vision_segment_ids"] > 0, axis=-1)  # [G, n]
    order = jnp.argsort(~has_image, axis=1, stable=True)

    def take(x, index):  # x [G, n, ...] gathered along n by index [G, n]
        return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

    def to_chunks(x):  # [G, n, ...] -> [J, G * T, ...]
        x = x.reshape(groups, num, chunk, *x.shape[2:]).swapaxes(0, 1)
        return x.reshape(num, groups * chunk, *x.shape[3:])

    chunks = {k: to_chunks(take(v, order)) for k, v in grouped.items()}
    chunk_has_image = jnp.any(to_chunks(take(has_image, order)), axis=1)  # [J]
    first = jax.tree.map(lambda x: x[0], chunks)
    shape = jax.eval_shape(tower, first)

    def body(_, xs):
        any_image, chunk_fields = xs
        tokens = jax.lax.cond(
            any_image, tower, lambda f: jnp.zeros(shape.shape, shape.dtype), chunk_fields
        )
        return None, tokens

    _, tokens = jax.lax.scan(body, None, (chunk_has_image, chunks))  # [J, G * T, M, D]
    tokens = tokens.reshape(num, groups, chunk, *tokens.shape[2:]).swapaxes(0, 1)
    tokens = tokens.reshape(groups, per_group, *tokens.shape[3:])
    tokens = take(tokens, jnp.argsort(order, axis=1))
    return tokens.reshape(rows, *tokens.shape[2:])
