"""Qwen2.5-VL: config, window layout, float32 parity with transformers, checkpoints in and out.

Checkpoints are written by transformers' Qwen2_5_VLForConditionalGeneration from random configs
(tests/models/checkpoints.py with model_type='qwen2_5_vl'); batches are the Qwen2-VL tests'
(test_qwen2_vl.make_batch) plus the one field Qwen2.5-VL adds, vision_window_ids.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from transformers import vision_utils

from g2e import distributed
from g2e.demo import tiny
from g2e.models import hf_io, positions, sharding
from g2e.models.config import Qwen2VLConfig
from g2e.models.qwen2_vl import Qwen2VL
from tests.models import checkpoints
from tests.models.test_qwen2_vl import (
    check_logits_at_several_positions,
    check_parity,
    forward,
    hf_reference,
    make_batch,
)

QWEN2_5_VL = "qwen2_5_vl"

# The tiny preset's windows are 56 pixels: 2x2 merged units, 4x4 patches. Pieces as in
# test_qwen2_vl: ints are text runs, tuples (t, h, w) image grids in patches.
CASES = {
    "text_only": ([[9], [13]], "right"),
    "one_image": ([[5, (1, 8, 8), 7]], "right"),
    "two_images_of_different_sizes": ([[4, (1, 8, 4), 3, (1, 6, 10), 5]], "right"),
    "mixed_batch_left_padded": ([[3, (1, 4, 4), 6], [11], [2, (1, 2, 6), 1, (1, 4, 2), 3]], "left"),
    # 5x3 and 3x7 merged units: the last row and column of windows are partial.
    "windows_not_dividing_the_grid": ([[3, (1, 10, 6), 4], [2, (1, 6, 14), 2]], "left"),
}

# config.json of the released Qwen2.5-VL-3B-Instruct (top-level text fields), abridged.
RELEASED_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}


def make_batch25(config, examples, side, rng):
    """test_qwen2_vl.make_batch plus vision_window_ids: (batch of numpy arrays, hf kwargs)."""
    batch, hf_inputs = make_batch(config, examples, side, rng)
    num_patches = batch["pixel_values"].shape[1]
    batch["vision_window_ids"] = np.stack(
        [
            positions.vision_window_ids(
                [p for p in pieces if not isinstance(p, int)],
                num_patches,
                config.vision.window_merged,
            )
            for pieces in examples
        ]
    )
    return batch, hf_inputs


@pytest.fixture(scope="module")
def tiny25(tmp_path_factory):
    hf_model, path = checkpoints.make_hf_checkpoint(
        tmp_path_factory.mktemp("tiny25"), seed=1, model_type=QWEN2_5_VL
    )
    return hf_model, path, hf_io.load_model(path)


# ----------------------------------------------------------------------------- config


def test_config_reads_released_layout_and_writes_transformers_layout():
    config = Qwen2VLConfig.from_hf(RELEASED_3B)
    vision, text = config.vision, config.text
    assert config.model_type == QWEN2_5_VL and vision.is_qwen2_5
    assert (
        vision.depth,
        vision.embed_dim,
        vision.num_heads,
        vision.mlp_width,
        vision.hidden_size,
    ) == (32, 1280, 16, 3420, 2048)
    assert (vision.window_size, vision.window_merged, vision.tokens_per_second) == (112, 4, 2)
    assert [i for i, full in enumerate(vision.full_attention_blocks) if full] == [7, 15, 23, 31]
    assert (
        text.hidden_size,
        text.num_heads,
        text.num_kv_heads,
        text.intermediate_size,
        text.num_layers,
        text.mrope_section,
    ) == (2048, 16, 2, 11008, 36, (16, 24, 24))
    assert config.tie_word_embeddings and config.image_token_id == 151655

    written = config.to_hf()
    assert written["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    hf = transformers.Qwen2_5_VLConfig(**written)
    hf_vision = hf.vision_config
    assert (
        hf_vision.hidden_size,
        hf_vision.out_hidden_size,
        hf_vision.intermediate_size,
        hf_vision.window_size,
        list(hf_vision.fullatt_block_indexes),
    ) == (1280, 2048, 3420, 112, [7, 15, 23, 31])
    assert hf.text_config.hidden_size == 2048 and hf.tie_word_embeddings
    # Our writing, and transformers' own nested layout, read back to the same config.
    assert Qwen2VLConfig.from_hf(written) == config
    assert Qwen2VLConfig.from_hf(hf.to_dict()) == config


def test_config_rejects_window_smaller_than_a_merged_unit():
    bad = json.loads(json.dumps(RELEASED_3B))
    bad["vision_config"]["window_size"] = 14
    with pytest.raises(ValueError, match="vision_config.window_size=14"):
        Qwen2VLConfig.from_hf(bad)


# ----------------------------------------------------------------------------- window layout


def test_window_ids_match_transformers_window_index():
    """Our windows (segment ids in processor order) are transformers' windows, numbered alike."""
    grids = [(1, 8, 8), (1, 6, 10), (2, 4, 6), (1, 10, 2)]
    real = sum(t * h * w for t, h, w in grids)
    num_patches = real + 8
    window_ids = positions.vision_window_ids(grids, num_patches, window_merged=2)
    window_index, cu_window_seqlens = vision_utils.get_vision_window_index(
        torch.tensor(grids), spatial_merge_size=2, window_size=56, patch_size=14
    )
    # transformers reorders merged units (4 consecutive patches each) into window order.
    patch_order = (window_index.numpy()[:, None] * 4 + np.arange(4)).reshape(-1)
    expected = np.zeros(num_patches, np.int32)
    bounds = cu_window_seqlens.numpy()
    for window, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        expected[patch_order[start:end]] = window + 1
    assert window_ids.dtype == np.int32
    np.testing.assert_array_equal(window_ids, expected)
    assert window_ids.max() == 4 + 6 + 2 * 2 + 3  # partial windows counted once each
    with pytest.raises(ValueError, match="window_merged=0"):
        positions.vision_window_ids(grids, num_patches, window_merged=0)
    with pytest.raises(ValueError, match="larger patch bucket"):
        positions.vision_window_ids(grids, real - 4, window_merged=2)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_parity(tiny25, case):
    hf_model, _, model = tiny25
    assert model.config.vision.full_attention_blocks == (False, True)
    examples, side = CASES[case]
    batch, hf_inputs = make_batch25(model.config, examples, side, np.random.default_rng(0))
    check_parity(model, hf_model, batch, hf_inputs, atol=1e-4)


def test_logits_at_several_positions(tiny25):
    hf_model, _, model = tiny25
    examples, side = CASES["mixed_batch_left_padded"]
    batch, hf_inputs = make_batch25(model.config, examples, side, np.random.default_rng(2))
    check_logits_at_several_positions(model, hf_model, batch, hf_inputs)


def test_windowed_blocks_change_the_result(tiny25):
    """The tiny preset really splits images into windows: full attention everywhere differs."""
    _, _, model = tiny25
    batch, _ = make_batch25(
        model.config, *CASES["windows_not_dividing_the_grid"], np.random.default_rng(0)
    )
    assert (batch["vision_window_ids"].max(1) > 2 * batch["vision_segment_ids"].max(1)).all()
    everywhere_full = dict(batch, vision_window_ids=batch["vision_segment_ids"])
    real = batch["attention_mask"].astype(bool)
    windowed, _, _ = jax.device_get(forward(model, batch))
    full, _, _ = jax.device_get(forward(model, everywhere_full))
    assert np.abs(windowed[real] - full[real]).max() > 1e-2
    with pytest.raises(ValueError, match="vision_window_ids"):
        model({k: v for k, v in batch.items() if k != "vision_window_ids"})


def test_remat_keeps_values_and_gradients(tiny25):
    """The scanned blocks (with their per-layer full/windowed flag) under remat='full'."""
    _, path, model = tiny25
    remat = hf_io.load_model(path, remat="full")
    batch, _ = make_batch25(
        model.config, *CASES["windows_not_dividing_the_grid"], np.random.default_rng(6)
    )

    @jax.jit
    def loss_and_grad(model, batch):
        def loss(pixel_values):
            return jnp.mean(jnp.square(model(dict(batch, pixel_values=pixel_values))))

        return jax.value_and_grad(loss)(batch["pixel_values"])

    expected_loss, expected_grad = jax.device_get(loss_and_grad(model, batch))
    got_loss, got_grad = jax.device_get(loss_and_grad(remat, batch))
    assert np.abs(expected_grad).max() > 0
    np.testing.assert_allclose(got_loss, expected_loss, rtol=1e-6)
    np.testing.assert_allclose(got_grad, expected_grad, atol=1e-5 * np.abs(expected_grad).max())


@pytest.mark.slow
def test_3b_widths_parity(tmp_path):
    """Qwen2.5-VL-3B widths (tied embeddings), 2 layers each, one image of two windows."""
    hf_model, path = checkpoints.make_hf_checkpoint(
        tmp_path, widths="3b", seed=3, model_type=QWEN2_5_VL
    )
    model = hf_io.load_model(path)
    vision = model.config.vision
    assert (vision.embed_dim, vision.mlp_width, vision.hidden_size, vision.window_merged) == (
        1280,
        3420,
        2048,
        4,
    )
    assert model.lm_head is None
    # 6x4 merged units: windows of 4x4 units split the rows 4 + 2.
    batch, hf_inputs = make_batch25(
        model.config, [[3, (1, 12, 8), 4]], "right", np.random.default_rng(3)
    )
    assert batch["vision_window_ids"].max() == 2
    # At these widths float32 rounding alone moves the logits by ~1e-4: transformers' own float32
    # logits differ from its float64 ones by 9e-5 here. Measured: hidden 7e-5, logits 1.5e-4
    # (|logits| up to 7.7); a wrong op is off by far more.
    check_parity(model, hf_model, batch, hf_inputs, atol=2e-4)


# ----------------------------------------------------------------------------- checkpoints


def _reference(path):
    return {
        k: v.numpy() for k, v in safetensors.torch.load_file(path / "model.safetensors").items()
    }


def _assert_state_dict_equal(ours, reference):
    assert sorted(ours) == sorted(reference)
    for name, array in reference.items():
        np.testing.assert_array_equal(ours[name], array, err_msg=name)


def test_hf_names_round_trip(tiny25):
    _, path, model = tiny25
    reference = _reference(path)
    assert "visual.blocks.0.mlp.gate_proj.weight" in reference
    assert "visual.merger.ln_q.weight" in reference
    _assert_state_dict_equal(hf_io.to_hf_state_dict(model), reference)


def test_transformers_module_names_accepted(tmp_path, tiny25):
    """transformers' in-memory names (model.visual..., model.language_model...) load too."""
    hf_model, path, _ = tiny25
    shutil.copy(path / "config.json", tmp_path / "config.json")
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert "model.visual.blocks.0.mlp.up_proj.weight" in state
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    _assert_state_dict_equal(hf_io.to_hf_state_dict(hf_io.load_model(tmp_path)), _reference(path))


def test_save_hf_loads_in_transformers_with_equal_outputs(tmp_path, tiny25):
    hf_model, _, model = tiny25
    hf_io.save_hf(model, tmp_path, max_shard_bytes=200_000)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == QWEN2_5_VL
    reloaded, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    batch, hf_inputs = make_batch25(
        model.config, *CASES["two_images_of_different_sizes"], np.random.default_rng(4)
    )
    _, hidden, logits = hf_reference(hf_model, hf_inputs)
    _, hidden_again, logits_again = hf_reference(reloaded.eval(), hf_inputs)
    np.testing.assert_array_equal(hidden_again, hidden)
    np.testing.assert_array_equal(logits_again, logits)


def test_sharded_load_equals_single_device(tiny25):
    _, path, single = tiny25
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rules = sharding.DEFAULT_RULES
    sharded = hf_io.load_model(path, mesh=mesh, rules=rules)
    blocks = sharded.visual.blocks
    assert blocks.gate_proj.kernel.value.sharding.spec == P(None, "fsdp", "tensor")
    assert blocks.down_proj.kernel.value.sharding.spec == P(None, "tensor", "fsdp")
    assert blocks.norm1.scale.value.sharding.spec == P(None, "fsdp")
    shard = blocks.gate_proj.kernel.value.addressable_shards[0].data
    assert shard.shape == (2, 16, 24)  # [layers, V/fsdp, F/tensor]: each device reads a slice
    for (path_, expected), (_, loaded) in zip(
        nnx.to_flat_state(nnx.state(single)), nnx.to_flat_state(nnx.state(sharded))
    ):
        np.testing.assert_array_equal(
            jax.device_get(loaded.value), jax.device_get(expected.value), err_msg=str(path_)
        )
    batch, _ = make_batch25(
        single.config, *CASES["mixed_batch_left_padded"], np.random.default_rng(5)
    )
    batch = {
        k: v[[0, 2, 1, 0]] if k != "position_ids" else v[:, [0, 2, 1, 0]] for k, v in batch.items()
    }  # 4 rows: the batch axis spans data x fsdp
    expected = jax.device_get(forward(single, batch))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        placed = distributed.put_batch(batch, mesh, rules)
        assert placed["vision_window_ids"].sharding.spec == P(("data", "fsdp"), None)
        got = jax.device_get(forward(sharded, placed))
    for ours, reference in zip(got, expected):
        np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- tiny assets


def test_tiny_assets_write_a_qwen2_5_checkpoint(tmp_path):
    """g2e.demo.tiny writes a 2.5 config that transformers and g2e both read, with the
    tokenizer's special ids; weights transformers writes next to it load in g2e."""
    written = tiny.write_assets(tmp_path, vocab_size=300, model_type=QWEN2_5_VL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(hf, transformers.Qwen2_5_VLConfig)
    assert hf.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert hf.vision_config.out_hidden_size == hf.text_config.hidden_size
    config = Qwen2VLConfig.from_dir(tmp_path)
    assert config.model_type == QWEN2_5_VL and config.vision.window_merged == 2
    assert config.vision.full_attention_blocks == (False, True)
    assert config.image_token_id == written["image_token_id"]
    preprocessor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert preprocessor["processor_class"] == "Qwen2_5_VLProcessor"
    torch.manual_seed(0)
    transformers.Qwen2_5_VLForConditionalGeneration(hf).save_pretrained(tmp_path)
    model = hf_io.load_model(tmp_path)
    assert isinstance(model, Qwen2VL) and model.config == config
