"""Text decoder pieces: M-RoPE tables vs transformers, pads that never leak into real tokens,
remat, dtypes and the adapter hook of the projections (attention itself: test_attention.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.qwen2_vl import modeling_qwen2_vl

from g2e.models import hf_io, lora, text
from g2e.models.config import Qwen2VLConfig
from tests.models import checkpoints
from tests.models.test_qwen2_vl import CASES, make_batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf_model, path = checkpoints.make_hf_checkpoint(tmp_path_factory.mktemp("tiny"), seed=6)
    return hf_model, path


def test_mrope_tables_match_transformers(tiny):
    hf_model, _ = tiny
    config = Qwen2VLConfig.from_hf(hf_model.config.to_dict())
    rng = np.random.default_rng(0)
    position_ids = rng.integers(0, 300, (3, 2, 9))  # the three axes differ
    rotary = modeling_qwen2_vl.Qwen2VLRotaryEmbedding(hf_model.config.text_config)
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.from_numpy(position_ids))
    ours = text.mrope_cos_sin(jnp.asarray(position_ids), config.text, jnp.float32)
    np.testing.assert_allclose(ours[0], cos.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours[1], sin.numpy(), atol=1e-5)


def test_pad_tokens_do_not_leak_into_real_tokens(tiny):
    _, path = tiny
    model = hf_io.load_model(path)
    batch, _ = make_batch(model.config, *CASES["mixed_batch_left_padded"], np.random.default_rng(4))
    changed = dict(batch)
    changed["input_ids"] = np.where(batch["attention_mask"] == 0, 3, batch["input_ids"])
    forward = jax.jit(lambda m, b: m(b))
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(
        np.asarray(forward(model, changed))[real],
        np.asarray(forward(model, batch))[real],
        atol=1e-6,
    )


def test_remat_and_bf16(tiny):
    """remat='full' changes nothing numerically; bf16 compute stays close with fp32 params."""
    _, path = tiny
    # Text only: the vision tower's remat is covered with the tower.
    batch, _ = make_batch(
        Qwen2VLConfig.from_dir(path), *CASES["text_only"], np.random.default_rng(5)
    )
    plain, remat = hf_io.load_model(path), hf_io.load_model(path, remat="full")

    def loss(model):
        return jnp.mean(jnp.square(model(batch)))

    value, grads = jax.jit(nnx.value_and_grad(loss))(plain)
    remat_value, remat_grads = jax.jit(nnx.value_and_grad(loss))(remat)
    np.testing.assert_allclose(remat_value, value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, atol=1e-6)

    bf16 = hf_io.load_model(path, dtype=jnp.bfloat16)
    hidden = jax.jit(lambda m: m(batch))(bf16)
    assert hidden.dtype == jnp.bfloat16
    assert bf16.language_model.layers.mlp.up_proj.kernel.value.dtype == jnp.float32
    reference = np.asarray(jax.jit(lambda m: m(batch))(plain))
    real = batch["attention_mask"].astype(bool)
    error = np.abs(np.asarray(hidden, np.float32) - reference)[real]
    assert error.mean() < 0.05 * np.abs(reference[real]).mean()


def test_adapter_hook_goes_through_lora_apply(tiny):
    _, path = tiny
    config = lora.AdapterConfig(
        kind="lora", r=2, alpha=4.0, dropout=0.0, targets=("q_proj", "gate_proj")
    )
    base, adapted = hf_io.load_model(path), hf_io.load_model(path, adapter=config)
    batch, _ = make_batch(base.config, *CASES["text_only"], np.random.default_rng(6))
    forward = jax.jit(lambda m: m(batch))
    # lora_b starts at zero: the adapted model is the base model.
    np.testing.assert_allclose(np.asarray(forward(adapted)), np.asarray(forward(base)), atol=1e-6)

    q_proj = adapted.language_model.layers.self_attn.q_proj
    q_proj.lora_b.value = jnp.full(q_proj.lora_b.value.shape, 0.1)
    assert not np.allclose(np.asarray(forward(adapted)), np.asarray(forward(base)), atol=1e-3)

    # One projection by hand: x @ W + b + s * x @ A @ B.
    graphdef, stacked = nnx.split(q_proj)
    layer0 = nnx.merge(graphdef, jax.tree.map(lambda x: x[0], stacked))
    x = jnp.asarray(
        np.random.default_rng(7).normal(size=(3, base.config.text.hidden_size)), jnp.float32
    )
    expected = (
        x @ layer0.kernel.value
        + layer0.bias.value
        + config.scaling * (x @ layer0.lora_a.value) @ layer0.lora_b.value
    )
    np.testing.assert_allclose(np.asarray(layer0(x)), np.asarray(expected), atol=1e-5)

    # Trainable adapter state splits off; gradients reach lora_b.
    graphdef, adapter_state, frozen = nnx.split(adapted, nnx.LoRAParam, ...)

    def loss(adapter_state):
        model = nnx.merge(graphdef, adapter_state, frozen)
        return jnp.mean(jnp.square(model(batch)))

    grads = jax.jit(jax.grad(loss))(adapter_state)
    q_grad = grads["language_model"]["layers"]["self_attn"]["q_proj"]["lora_a"]
    assert float(jnp.abs(q_grad.value).max()) > 0


def test_one_dropout_mask_per_input(tiny, monkeypatch):
    """q, k and v share the mask of their input, as do gate and up: four masks per layer."""
    _, path = tiny
    config = lora.AdapterConfig(
        kind="dora", r=2, alpha=4.0, dropout=0.1, targets=lora.KNOWN_TARGETS
    )
    model = hf_io.load_model(path, adapter=config)
    batch, _ = make_batch(model.config, *CASES["text_only"], np.random.default_rng(8))
    calls = []
    original = lora.dropout

    def counting(x, rate, deterministic, rng):
        calls.append(x.shape)
        return original(x, rate, deterministic, rng)

    monkeypatch.setattr(lora, "dropout", counting)
    model(batch, deterministic=False, rng=jax.random.key(0))  # traced once by the layer scan
    # q/k/v input, o input, gate/up input, down input.
    assert len(calls) == 4, calls
