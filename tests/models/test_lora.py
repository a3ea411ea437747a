"""LoRA / DoRA maths against PEFT on the same linear layer and weights."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from g2e.models import lora

IN, OUT, R = 12, 10, 4


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(IN, OUT, bias=True)

    def forward(self, x):
        return self.q_proj(x)


class _FixedDropout(torch.nn.Module):
    """Stands in for torch's dropout with the exact mask the JAX side draws."""

    def __init__(self, keep: np.ndarray, rate: float):
        super().__init__()
        self.scale = torch.tensor(keep.astype(np.float32) / (1.0 - rate))

    def forward(self, x):
        return x * self.scale


def _peft_layer(kind: str, dropout: float, seed: int = 0):
    """A PEFT-wrapped nn.Linear with random (non-initial) adapter weights."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(
        r=R,
        lora_alpha=16,
        lora_dropout=dropout,
        target_modules=["q_proj"],
        use_dora=(kind == "dora"),
        init_lora_weights="gaussian",
    )
    model = peft.get_peft_model(_Block(), cfg)
    layer = model.base_model.model.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0.0, 0.3)
        if kind == "dora":
            layer.lora_magnitude_vector["default"].weight.mul_(1.0 + 0.2 * torch.randn(OUT))
    return model, layer


def _jax_weights(layer, kind: str):
    kernel = jnp.asarray(layer.base_layer.weight.detach().numpy().T)
    bias = jnp.asarray(layer.base_layer.bias.detach().numpy())
    adapter = {
        "lora_a": jnp.asarray(layer.lora_A["default"].weight.detach().numpy().T),
        "lora_b": jnp.asarray(layer.lora_B["default"].weight.detach().numpy().T),
    }
    if kind == "dora":
        adapter["magnitude"] = jnp.asarray(
            layer.lora_magnitude_vector["default"].weight.detach().numpy()
        )
    return kernel, bias, adapter


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("train", [False, True])
def test_forward_and_grads_match_peft(kind, train):
    rate = 0.25
    model, layer = _peft_layer(kind, rate)
    config = lora.AdapterConfig(kind=kind, r=R, alpha=16, dropout=rate, targets=("q_proj",))
    kernel, bias, adapter = _jax_weights(layer, kind)
    x = np.random.default_rng(1).normal(size=(3, 5, IN)).astype(np.float32)
    rng = jax.random.key(7)
    if train:
        keep = np.asarray(lora.keep_mask(rng, rate, x.shape))
        layer.lora_dropout["default"] = _FixedDropout(keep, rate)
        model.train()
    else:
        model.eval()

    x_t = torch.tensor(x)
    y_t = model(x_t)
    y_t.square().sum().backward()

    def loss(adapter):
        y = lora.apply(
            jnp.asarray(x), kernel, bias, adapter, config, deterministic=not train, rng=rng
        )
        return jnp.sum(jnp.square(y)), y

    (_, y), grads = jax.value_and_grad(loss, has_aux=True)(adapter)
    np.testing.assert_allclose(np.asarray(y), y_t.detach().numpy(), rtol=1e-5, atol=1e-5)
    torch_grads = {
        "lora_a": layer.lora_A["default"].weight.grad.numpy().T,
        "lora_b": layer.lora_B["default"].weight.grad.numpy().T,
    }
    if kind == "dora":
        torch_grads["magnitude"] = layer.lora_magnitude_vector["default"].weight.grad.numpy()
    for key, expected in torch_grads.items():
        np.testing.assert_allclose(
            np.asarray(grads[key]), expected, rtol=1e-4, atol=1e-4, err_msg=key
        )


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merge_matches_adapted_forward_and_peft(kind):
    model, layer = _peft_layer(kind, 0.0, seed=3)
    config = lora.AdapterConfig(kind=kind, r=R, alpha=16, dropout=0.0, targets=("q_proj",))
    kernel, bias, adapter = _jax_weights(layer, kind)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, IN)).astype(np.float32))
    merged = lora.merge(kernel, adapter, config)
    adapted = lora.apply(x, kernel, bias, adapter, config, deterministic=True)
    np.testing.assert_allclose(
        np.asarray(x @ merged + bias), np.asarray(adapted), rtol=1e-5, atol=1e-5
    )
    peft_merged = model.merge_and_unload().q_proj.weight.detach().numpy().T
    np.testing.assert_allclose(np.asarray(merged), peft_merged, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_init_is_identity_and_gaussian(kind):
    config = lora.AdapterConfig(kind=kind, r=8)
    kernel = jax.random.normal(jax.random.key(0), (256, 32))
    adapter = lora.init_adapter(jax.random.key(1), 256, 32, kernel, config)
    assert adapter["lora_a"].shape == (256, 8) and adapter["lora_b"].shape == (8, 32)
    # PEFT's 'gaussian' init: std 1/r (0.125 here); 2048 samples pin it to a few percent.
    assert abs(float(jnp.std(adapter["lora_a"])) - 1 / 8) < 0.01
    assert not np.any(np.asarray(adapter["lora_b"]))
    x = jax.random.normal(jax.random.key(2), (3, 256))
    y = lora.apply(x, kernel, None, adapter, config, deterministic=True)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ kernel), rtol=1e-5, atol=1e-4)
    if kind == "dora":
        np.testing.assert_allclose(
            np.asarray(adapter["magnitude"]), np.linalg.norm(np.asarray(kernel), axis=0), rtol=1e-6
        )


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="targets"):
        lora.AdapterConfig(targets=("qproj",))
    with pytest.raises(ValueError, match="kind"):
        lora.AdapterConfig(kind="none")
    assert lora.AdapterConfig.from_config({"kind": "none"}) is None
    with pytest.raises(ValueError, match="rng is None"):
        lora.apply(
            jnp.ones((1, 4)),
            jnp.ones((4, 2)),
            None,
            lora.init_adapter(jax.random.key(0), 4, 2, None, lora.AdapterConfig(kind="lora", r=1)),
            lora.AdapterConfig(kind="lora", r=1),
            deterministic=False,
        )


def test_analytic_dora_norm_equals_the_materialised_one():
    """||W + s A B||_c without forming W + s A B, for one and for stacked layers."""
    config = lora.AdapterConfig(kind="dora", r=R, alpha=16)
    rng = np.random.default_rng(4)
    kernel = rng.normal(size=(3, IN, OUT)).astype(np.float32)
    adapter = {
        "lora_a": rng.normal(size=(3, IN, R)).astype(np.float32) / R,
        "lora_b": rng.normal(size=(3, R, OUT)).astype(np.float32),
    }
    materialised = np.linalg.norm(
        kernel + config.scaling * adapter["lora_a"] @ adapter["lora_b"], axis=-2
    )
    stacked = lora.dora_norm(jnp.asarray(kernel), adapter, config)
    np.testing.assert_allclose(np.asarray(stacked), materialised, rtol=1e-5)
    one = lora.dora_norm(jnp.asarray(kernel[1]), {k: v[1] for k, v in adapter.items()}, config)
    np.testing.assert_allclose(np.asarray(one), materialised[1], rtol=1e-5)
    # A precomputed norm gives the same projection as one computed inside apply.
    adapter1 = {
        **{k: jnp.asarray(v[1]) for k, v in adapter.items()},
        "magnitude": jnp.asarray(materialised[1] * 1.1),
    }
    x = jnp.asarray(rng.normal(size=(5, IN)).astype(np.float32))
    inside = lora.apply(x, jnp.asarray(kernel[1]), None, adapter1, config, deterministic=True)
    hoisted = lora.apply(
        x,
        jnp.asarray(kernel[1]),
        None,
        adapter1,
        config,
        deterministic=True,
        norm=jnp.asarray(materialised[1]),
    )
    np.testing.assert_allclose(np.asarray(hoisted), np.asarray(inside), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(inside),
        1.1
        * np.asarray(x)
        @ (kernel[1] + config.scaling * adapter["lora_a"][1] @ adapter["lora_b"][1]),
        rtol=1e-4,
        atol=1e-4,
    )


def test_dropout_statistics_with_a_fast_key():
    rate = 0.1
    key = jax.random.wrap_key_data(jnp.arange(4, dtype=jnp.uint32), impl="rbg")
    x = jnp.ones((512, 256))
    dropped = np.asarray(lora.dropout(x, rate, False, key))
    kept = dropped != 0
    # 131072 draws: the kept fraction is within 5 standard errors (0.0042) of 0.9.
    assert abs(kept.mean() - (1 - rate)) < 0.0042, kept.mean()
    np.testing.assert_allclose(dropped[kept], 1 / (1 - rate), rtol=1e-6)
    assert abs(dropped.mean() - 1.0) < 0.005  # inverted dropout keeps the mean
    np.testing.assert_array_equal(np.asarray(lora.dropout(x, rate, False, key)), dropped)
    other = np.asarray(lora.dropout(x, rate, False, jax.random.fold_in(key, 1))) != 0
    assert 0.1 < np.mean(other != kept) < 0.25  # independent masks differ in ~2 p (1 - p)
    assert lora.dropout(x, rate, True, None) is x


def test_dropout_bits_are_drawn_per_device_in_a_sharded_step():
    """Under a mesh and the sharding rules (as the train step is traced), each device draws the
    bits of its own rows only: XLA would not partition a global RngBitGenerator draw."""
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from g2e.models import sharding

    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    x = jax.device_put(jnp.ones((64, 16, 32)), NamedSharding(mesh, P(("data", "fsdp"))))
    key = jax.random.wrap_key_data(jnp.arange(4, dtype=jnp.uint32), impl="rbg")
    dropout = jax.jit(lambda x, k: lora.dropout(x, 0.1, False, k))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        text = dropout.lower(x, key).compile().as_text()
        kept = np.asarray(dropout(x, key)) != 0
    drawn = [
        np.prod([int(d) for d in dims.split(",")]) for dims in re.findall(r"u16\[([\d,]+)\]", text)
    ]
    assert drawn and max(drawn) == 8 * 16 * 32, drawn  # one device's rows, not all 64
    assert abs(kept.mean() - 0.9) < 0.01
    assert 0.1 < np.mean(kept[:8] != kept[8:16]) < 0.25  # devices draw different bits
