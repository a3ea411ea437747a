"""g2e.models.hf_io: reading transformers-written checkpoints, writing them back, and errors."""

from __future__ import annotations

import copy
import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from flax import nnx

from g2e.models import hf_files, hf_io, lora
from tests.models import checkpoints


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf_model, path = checkpoints.make_hf_checkpoint(tmp_path_factory.mktemp("tiny"), seed=4)
    reference = {
        k: v.numpy() for k, v in safetensors.torch.load_file(path / "model.safetensors").items()
    }
    return hf_model, path, reference


def _assert_state_dict_equal(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray]):
    assert sorted(ours) == sorted(reference)
    for name, array in reference.items():
        assert ours[name].shape == array.shape, name
        np.testing.assert_array_equal(ours[name], array, err_msg=name)


def test_round_trip_names_shapes_values(tiny):
    _, path, reference = tiny
    model = hf_io.load_model(path)
    _assert_state_dict_equal(hf_io.to_hf_state_dict(model), reference)


def test_sharded_checkpoint_with_index(tmp_path, tiny):
    _, _, reference = tiny
    _, path = checkpoints.make_hf_checkpoint(tmp_path, seed=4, max_shard_size="60KB")
    assert (path / hf_files.INDEX_FILE).is_file() and len(list(path.glob("model-*"))) > 2
    _assert_state_dict_equal(hf_io.to_hf_state_dict(hf_io.load_model(path)), reference)


def test_transformers_module_names_accepted(tmp_path, tiny):
    """transformers' in-memory names (model.language_model..., model.visual...) load too."""
    hf_model, path, reference = tiny
    shutil.copy(path / "config.json", tmp_path / "config.json")
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    _assert_state_dict_equal(hf_io.to_hf_state_dict(hf_io.load_model(tmp_path)), reference)


def test_bfloat16_checkpoint(tmp_path, tiny):
    hf_model, _, reference = tiny
    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(tmp_path)
    model = hf_io.load_model(tmp_path)
    ours = hf_io.to_hf_state_dict(model)
    for name, array in reference.items():
        expected = array.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)


def test_save_hf_loads_in_transformers(tmp_path, tiny):
    hf_model, path, reference = tiny
    files = hf_io.save_hf(hf_io.load_model(path), tmp_path / "out", max_shard_bytes=100_000)
    assert len(files) > 1
    index = json.loads((tmp_path / "out" / hf_files.INDEX_FILE).read_text())
    assert sorted(index["weight_map"]) == sorted(reference)
    reloaded = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "out")
    for name, tensor in reloaded.state_dict().items():
        np.testing.assert_array_equal(
            tensor.numpy(), hf_model.state_dict()[name].numpy(), err_msg=name
        )


def test_save_hf_bfloat16(tmp_path, tiny):
    _, path, reference = tiny
    hf_io.save_hf(hf_io.load_model(path), tmp_path, dtype=ml_dtypes.bfloat16)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    loaded = hf_io.to_hf_state_dict(hf_io.load_model(tmp_path))
    name = "model.layers.1.mlp.up_proj.weight"
    np.testing.assert_array_equal(
        loaded[name], reference[name].astype(ml_dtypes.bfloat16).astype(np.float32)
    )


def test_dora_adapter_starts_from_loaded_weights(tiny):
    _, path, reference = tiny
    config = lora.AdapterConfig(kind="dora", r=4, alpha=8.0, targets=("q_proj", "down_proj"))
    model = hf_io.load_model(path, adapter=config)
    q_proj = model.language_model.layers.self_attn.q_proj
    expected = np.linalg.norm(reference["model.layers.1.self_attn.q_proj.weight"], axis=1)
    np.testing.assert_allclose(q_proj.magnitude.value[1], expected, rtol=1e-6)
    adapters = nnx.state(model, nnx.LoRAParam)
    assert len(jax.tree.leaves(adapters)) == 2 * 3  # lora_a, lora_b, magnitude per target
    assert not hasattr(model.language_model.layers.self_attn.k_proj, "lora_a")


# ----------------------------------------------------------------------------- errors


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_io.load_model(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf_io.load_model(tmp_path)


def test_wrong_model_type(tmp_path, tiny):
    _, path, _ = tiny
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type is 'llama', expected 'qwen2_vl'"):
        hf_io.load_model(tmp_path)


def test_missing_weights(tmp_path, tiny):
    _, path, _ = tiny
    shutil.copy(path / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        hf_io.load_model(tmp_path)


def test_index_names_missing_shard(tmp_path):
    _, path = checkpoints.make_hf_checkpoint(tmp_path, seed=4, max_shard_size="60KB")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        hf_io.load_model(path)


def _rewrite(tmp_path, reference, change):
    """A copy of the tiny checkpoint whose tensors are `change(dict)`."""
    tensors = dict(reference)
    change(tensors)
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")


def test_missing_tensor_named(tmp_path, tiny):
    _, path, reference = tiny
    shutil.copy(path / "config.json", tmp_path / "config.json")
    _rewrite(tmp_path, reference, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(KeyError, match="model.layers.1.self_attn.k_proj.bias"):
        hf_io.load_model(tmp_path)


def test_misshaped_tensor_named(tmp_path, tiny):
    _, path, reference = tiny
    shutil.copy(path / "config.json", tmp_path / "config.json")

    def shrink(t):
        t["visual.blocks.0.mlp.fc1.weight"] = t["visual.blocks.0.mlp.fc1.weight"][:-1]

    _rewrite(tmp_path, reference, shrink)
    with pytest.raises(ValueError, match=r"'visual.blocks.0.mlp.fc1.weight' has shape \[63, 32\]"):
        hf_io.load_model(tmp_path)


def test_save_hf_merges_adapters(tmp_path, tiny):
    """A DoRA-adapted model written with save_hf reloads as a plain model with its outputs."""
    _, path, _ = tiny
    config = lora.AdapterConfig(
        kind="dora", r=2, alpha=4.0, dropout=0.0, targets=("v_proj", "up_proj")
    )
    adapted = hf_io.load_model(path, adapter=config)
    for projection in (
        adapted.language_model.layers.self_attn.v_proj,
        adapted.language_model.layers.mlp.up_proj,
    ):
        shape = projection.lora_b.value.shape
        projection.lora_b.value = jax.random.normal(jax.random.key(0), shape) * 0.1
    hf_io.save_hf(adapted, tmp_path)
    merged = hf_io.load_model(tmp_path)
    input_ids = np.array([[5, 17, 33, 2, 9, 41]], np.int32)
    batch = dict(
        input_ids=input_ids,
        attention_mask=np.ones_like(input_ids),
        position_ids=np.broadcast_to(np.arange(6, dtype=np.int32), (3, 1, 6)),
    )
    forward = jax.jit(lambda model: model(batch))
    np.testing.assert_allclose(forward(merged), forward(adapted), atol=1e-5)
    assert not np.allclose(forward(merged), forward(hf_io.load_model(path)), atol=1e-3)
