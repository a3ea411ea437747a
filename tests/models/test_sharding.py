"""Sharding on 8 simulated CPU devices with a (data, fsdp, tensor) = (2, 2, 2) mesh."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from g2e import distributed
from g2e.models import hf_io, sharding
from g2e.models.config import Qwen2VLConfig
from g2e.models.qwen2_vl import Qwen2VL
from tests.models import checkpoints
from tests.models.test_qwen2_vl import make_batch

RULES = sharding.DEFAULT_RULES


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) >= 8, "tests/conftest.py sets 8 simulated CPU devices"
    return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return checkpoints.make_hf_checkpoint(tmp_path_factory.mktemp("tiny"), seed=5)[1]


def test_logical_to_spec():
    assert sharding.logical_to_spec(("batch", "length", "embed"), RULES) == P(
        ("data", "fsdp"), None, None
    )  # 'fsdp' is already taken by the batch
    assert sharding.logical_to_spec(("layers", "embed", "heads"), RULES) == P(
        None, "fsdp", "tensor"
    )
    assert sharding.logical_to_spec(("vocab", "embed"), RULES, ("data", "tensor")) == P(
        "tensor", None
    )


def test_loaded_parameters_carry_expected_shardings(mesh, checkpoint):
    model = hf_io.load_model(checkpoint, mesh=mesh, rules=RULES)
    text = model.language_model
    expected = {
        "embed_tokens": (text.embed_tokens, P("tensor", "fsdp")),
        "q_proj": (text.layers.self_attn.q_proj.kernel, P(None, "fsdp", "tensor")),
        "k_bias": (text.layers.self_attn.k_proj.bias, P(None, "tensor")),
        "o_proj": (text.layers.self_attn.o_proj.kernel, P(None, "tensor", "fsdp")),
        "down_proj": (text.layers.mlp.down_proj.kernel, P(None, "tensor", "fsdp")),
        "norm": (text.layers.input_layernorm.scale, P(None, "fsdp")),
        "lm_head": (model.lm_head, P("fsdp", "tensor")),
        "vision_fc1": (model.visual.blocks.fc1.kernel, P(None, "fsdp", "tensor")),
    }
    for name, (variable, spec) in expected.items():
        array = variable.value
        assert array.sharding.mesh.shape == mesh.shape, name
        assert array.sharding.spec == spec, (name, array.sharding.spec)
        # Each device holds only its shard (nothing whole on one device).
        shard = array.addressable_shards[0].data
        ways = np.prod(
            [
                mesh.shape[a]
                for entry in spec
                if entry
                for a in ((entry,) if isinstance(entry, str) else entry)
            ]
        )
        assert shard.size * ways == array.size, name


def test_sharded_outputs_equal_single_device(mesh, checkpoint):
    single = hf_io.load_model(checkpoint)
    sharded = hf_io.load_model(checkpoint, mesh=mesh, rules=RULES)
    examples = [[3, (1, 4, 4), 6], [11], [2, (1, 2, 6), 1, (1, 4, 2), 3], [7, (1, 2, 2), 2]]
    batch, _ = make_batch(single.config, examples, "left", np.random.default_rng(0))

    def forward(model, batch):
        hidden = model(batch)
        return hidden, model.logits_at(hidden, batch["last_index"])

    expected = jax.device_get(jax.jit(forward)(single, batch))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        placed = distributed.put_batch(batch, mesh, RULES)
        assert placed["input_ids"].sharding.spec == P(("data", "fsdp"), None)
        hidden, logits = jax.jit(forward)(sharded, placed)
        assert hidden.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(jax.device_get(hidden), expected[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(jax.device_get(logits), expected[1], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_create_sharded_initialises_in_place(mesh):
    config = Qwen2VLConfig.from_hf(dict(checkpoints.hf_config_dict("tiny"), model_type="qwen2_vl"))
    model = sharding.create_sharded(lambda: Qwen2VL(config, rngs=nnx.Rngs(0)), mesh, RULES)
    kernel = model.language_model.layers.mlp.gate_proj.kernel.value
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (2, 32, 64)
