"""Qwen2-VL as one nnx.Module: vision tower, embedding merge, text decoder, LM head, pooling.

Letters: the legend of `g2e.models` (Q is the number of positions asked for in `logits_at`).

The batch is the host dict described in the design notes (input_ids, attention_mask,
position_ids [3, B, L], pixel_values [B, P, 1176], vision_segment_ids, vision_positions,
image_token_index, last_index). A batch with P == 0 (or no pixel_values) skips the tower.

Qwen2.5-VL (config.model_type 'qwen2_5_vl') is the same model with another vision tower; its
batch has one more field, vision_window_ids [B, P] (g2e.models.positions.vision_window_ids:
each patch's attention window, in the same patch order; 0 on padding). Everything else,
image_token_index included, is laid out exactly as for Qwen2-VL.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from g2e.models import lora
from g2e.models.config import Qwen2VLConfig
from g2e.models.text import TextDecoder, _normal
from g2e.models.vision import VisionTower


class Qwen2VL(nnx.Module):
    """Qwen2VLForConditionalGeneration (or Qwen2_5_VL...) in JAX: `model(batch)` -> [B, L, D].

    The output is the final-norm hidden state; `config.model_type` picks the vision tower.
    """

    def __init__(self, config: Qwen2VLConfig, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, remat: str = "none", attention: str = "xla",
                 adapter: lora.AdapterConfig | None = None, rngs: nnx.Rngs):
        """Builds the model with random weights (load real ones with hf_io.load_model).

        Args:
            config: model sizes and special token ids.
            dtype: compute dtype (activations), e.g. jnp.bfloat16.
            param_dtype: parameter storage dtype (float32 or bfloat16).
            remat: rematerialisation policy of the scanned layers: 'none', 'full', 'dots', ...
            attention: 'xla', 'cudnn' or 'pallas' (see g2e.models.attention.attend).
            adapter: LoRA/DoRA config for the text projections, or None.
            rngs: parameter initialisation RNGs.
        """
        self.config = config
        self.dtype = dtype
        self.adapter = adapter
        # Parameters carry logical (not mesh) axis names; sharding.create_sharded places them.
        with nnx.use_eager_sharding(False):
            self.visual = VisionTower(config.vision, dtype=dtype, param_dtype=param_dtype,
                                      remat=remat, attention=attention, rngs=rngs)
            self.language_model = TextDecoder(config.text, dtype=dtype, param_dtype=param_dtype,
                                              remat=remat, attention=attention, adapter=adapter,
                                              rngs=rngs)
            # Tied checkpoints reuse the token embedding as the head (see head_kernel).
            self.lm_head = nnx.data(None if config.tie_word_embeddings else nnx.Param(
                _normal(rngs.params(), (config.text.hidden_size, config.text.vocab_size),
                        param_dtype),
                out_sharding=("embed", "vocab")))

    def input_embeddings(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Token embeddings [B, L, D], each <|image_pad|> replaced by its merged vision token."""
        input_ids = batch["input_ids"]
        embeds = self.language_model.embed(input_ids)
        pixel_values = batch.get("pixel_values")
        if pixel_values is None or pixel_values.shape[1] == 0:
            return embeds
        vision_tokens = self.visual(pixel_values, batch["vision_segment_ids"],
                                    batch["vision_positions"],
                                    batch.get("vision_window_ids"))  # [B, M, D]
        index = batch["image_token_index"][..., None].astype(jnp.int32)  # [B, L, 1]
        gathered = jnp.take_along_axis(vision_tokens.astype(embeds.dtype), index, axis=1)
        is_image = (input_ids == self.config.image_token_id)[..., None]
        return jnp.where(is_image, gathered, embeds)

    def __call__(self, batch: Mapping[str, jax.Array], *, deterministic: bool = True,
                 rng: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states [B, L, D] in the compute dtype.

        `deterministic=False` with an `rng` turns adapter dropout on (training).
        """
        embeds = self.input_embeddings(batch)
        return self.language_model(embeds, batch["position_ids"], batch["attention_mask"],
                                   deterministic=deterministic, rng=rng)

    def pooled_hidden(self, batch: Mapping[str, jax.Array], *, deterministic: bool = True,
                      rng: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden state [B, D] at batch['last_index'] (compute dtype).

        Equal to `self(batch)` at those positions, but the last layer runs only there.
        """
        embeds = self.input_embeddings(batch)
        return self.language_model(embeds, batch["position_ids"], batch["attention_mask"],
                                   deterministic=deterministic, rng=rng,
                                   pool_index=batch["last_index"].astype(jnp.int32))

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

    def embed(self, batch: Mapping[str, jax.Array], *, deterministic: bool = True,
              rng: jax.Array | None = None) -> jax.Array:
        """L2-normalised float32 embeddings [B, D] of the hidden state at batch['last_index'].

        `deterministic=False` with an `rng` turns adapter dropout on (training).
        """
        pooled = self.pooled_hidden(batch, deterministic=deterministic, rng=rng).astype(
            jnp.float32)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
