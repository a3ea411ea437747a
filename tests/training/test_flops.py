"""FLOP accounting: HLO FLOPs with loops counted, model FLOPs against the compiled programs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2e.models import lora, positions
from g2e.models.config import Qwen2VLConfig
from g2e.models.qwen2_vl import Qwen2VL
from g2e.training import flops
from tests.models import checkpoints

CONFIG = Qwen2VLConfig.from_hf(dict(checkpoints.hf_config_dict("tiny"), model_type="qwen2_vl"))


def test_hlo_flops_count_loop_bodies_by_their_trip_count():
    def scanned(x, w):
        def body(c, wi):
            return jnp.tanh(c @ wi), None

        y = jax.lax.scan(body, x, w)[0]
        return jax.lax.cond(y.sum() > 0, lambda a: a @ w[0], lambda a: a, y).sum()

    def unrolled(x, w):
        for wi in w:
            x = jnp.tanh(x @ wi)
        return (x @ w[0]).sum()

    x, w = jnp.ones((16, 32)), jnp.ones((5, 32, 32))
    expected = 6 * 2 * 16 * 32 * 32
    compiled = jax.jit(scanned).lower(x, w).compile()
    assert flops.hlo_flops(compiled.as_text()) == expected
    assert compiled.cost_analysis()["flops"] < expected / 2  # XLA counts the body once
    # Gradients: the same count as XLA's own for the unrolled program (dots only).
    grad_scan = jax.jit(jax.grad(scanned, argnums=1)).lower(x, w).compile()
    grad_unrolled = jax.jit(jax.grad(unrolled, argnums=1)).lower(x, w).compile()
    reference = grad_unrolled.cost_analysis()["flops"]
    assert abs(flops.hlo_flops(grad_scan.as_text()) - reference) < 0.05 * reference


def _text_batch(lengths, length):
    rows = len(lengths)
    mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = np.where(mask, 7, 0).astype(np.int32)
    return dict(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions.rope_index(
            ids, mask, [[]] * rows, image_token_id=CONFIG.image_token_id
        ),
        last_index=(np.asarray(lengths) - 1).astype(np.int32),
    )


def test_model_flops_of_the_forward_match_the_compiled_embedding():
    """Unpadded rows: the compiled forward does the model's work, except that it computes the
    whole L x L attention where the model counts the causal half."""
    adapter = lora.AdapterConfig(kind="lora", r=4, alpha=8, dropout=0.0)
    model = Qwen2VL(CONFIG, adapter=adapter, rngs=nnx.Rngs(0))
    length, rows = 24, 3
    batch = _text_batch([length] * rows, length)
    compiled = jax.jit(lambda m, b: m.embed(b)).lower(model, batch).compile()
    measured = flops.hlo_flops(compiled.as_text())
    text = CONFIG.text
    counted = flops.text_step_flops(text, np.full(rows, length), adapter, train=False)
    full_minus_causal = (text.num_layers - 1) * rows * (length * length - length * (length + 1) / 2)
    counted += 2 * 2 * text.num_heads * text.head_dim * full_minus_causal
    assert abs(measured - counted) < 0.01 * counted, (measured, counted)


def test_vision_flops_match_the_compiled_tower():
    model = Qwen2VL(CONFIG, rngs=nnx.Rngs(0))
    grid = (1, 4, 6)
    layout = positions.vision_layout([grid], 24)
    pixels = jnp.ones((1, 24, CONFIG.vision.patch_dim))
    compiled = (
        jax.jit(lambda m, p, s, q: m.visual(p, s, q))
        .lower(model, pixels, jnp.asarray(layout[1])[None], jnp.asarray(layout[0])[None])
        .compile()
    )
    measured = flops.hlo_flops(compiled.as_text())
    counted = flops.vision_forward_flops(CONFIG.vision, np.array([24]))
    assert abs(measured - counted) < 0.01 * counted, (measured, counted)


def test_a_train_step_counts_about_twice_its_forward_with_adapters():
    adapter = lora.AdapterConfig(kind="dora", r=8, alpha=64, dropout=0.0)
    lengths = np.array([40, 100, 7])
    forward = flops.text_step_flops(CONFIG.text, lengths, adapter, train=False)
    step = flops.text_step_flops(CONFIG.text, lengths, adapter)
    full = flops.text_step_flops(CONFIG.text, lengths, None)
    assert 2.0 < step / forward < 2.3  # frozen base: no weight gradients
    assert 2.9 < full / flops.text_step_flops(CONFIG.text, lengths, None, train=False) <= 3.0
    batch = {"query": _text_batch(lengths, 100), "candidate": _text_batch(lengths[::-1], 100)}
    batch["ids"] = np.arange(len(lengths))
    total = flops.train_step_flops(CONFIG, batch, adapter)
    assert total > 2 * step
