"""g2e.models.vision against transformers' Qwen2-VL vision tower (float32 parity)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

from g2e.models import positions, vision
from g2e.models.config import Qwen2VLConfig
from tests.models import checkpoints

# Image sizes (width, height) in pixels: grids (t, h, w) = (1, 6, 4) and (1, 4, 8).
IMAGE_SIZES = [(56, 84), (112, 56)]
NUM_PATCHES = 64  # 24 + 32 = 56 real patches in the fuller example, padded to a multiple of 4


def _hf_vision(widths: str):
    """A float32 transformers vision tower with normal(0, 0.05) weights, and our config."""
    hf_dict = checkpoints.hf_config_dict(widths)
    hf_config = transformers.Qwen2VLConfig(**hf_dict)
    vision_config = hf_config.vision_config
    vision_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = (
        transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel(
            vision_config
        )
        .float()
        .eval()
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.05
            param.copy_(1.0 + noise if "norm" in name or "ln_q" in name else noise)
    config = Qwen2VLConfig.from_hf(hf_config.to_dict())
    return model, config.vision


def _images():
    """Pixel patches and grids of two random images, as the HF image processor emits them."""
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in IMAGE_SIZES
    ]
    out = transformers.Qwen2VLImageProcessorPil()(images=images, return_tensors="np")
    grids = [tuple(int(x) for x in g) for g in out["image_grid_thw"]]
    sizes = [t * h * w for t, h, w in grids]
    patches = np.split(out["pixel_values"], np.cumsum(sizes)[:-1])
    return patches, grids


def _batch(patches, grids, examples, pad_noise=0.0):
    """Packs examples (lists of image indices) into padded [B, P, ...] arrays."""
    rng = np.random.default_rng(1)
    pixel_values = pad_noise * rng.standard_normal((len(examples), NUM_PATCHES, 1176))
    pixel_values = pixel_values.astype(np.float32)
    segment_ids = np.zeros((len(examples), NUM_PATCHES), np.int32)
    layout = np.zeros((len(examples), NUM_PATCHES, 2), np.int32)
    for b, images in enumerate(examples):
        packed = np.concatenate([patches[i] for i in images])
        pixel_values[b, : len(packed)] = packed
        layout[b], segment_ids[b] = positions.vision_layout([grids[i] for i in images], NUM_PATCHES)
    return pixel_values, segment_ids, layout


def _tower(config, params, **kwargs):
    """A VisionTower holding `params` (a pure dict); built from shapes, no random init."""
    tower = nnx.eval_shape(lambda: vision.VisionTower(config, rngs=nnx.Rngs(0), **kwargs))
    state = nnx.state(tower)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(tower, state)
    return tower


def _hf_params(hf_model, config):
    hf_state = {name: t.numpy() for name, t in hf_model.state_dict().items()}
    return vision.vision_params_from_hf(hf_state.__getitem__, config, prefix="")


def _run(tower, pixel_values, segment_ids, layout):
    graphdef, state = nnx.split(tower)
    apply = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
    return np.asarray(apply(state, pixel_values, segment_ids, layout).astype(jnp.float32))


def _hf_merged(hf_model, patches, grids, images):
    with torch.no_grad():
        out = hf_model(
            torch.from_numpy(np.concatenate([patches[i] for i in images])),
            grid_thw=torch.tensor([grids[i] for i in images]),
        )
    return out.pooler_output.numpy()


@pytest.fixture(scope="module")
def tiny():
    hf_model, config = _hf_vision("tiny")
    return hf_model, config, _tower(config, _hf_params(hf_model, config))


# Example 0: one image, its padding filled with noise (must not leak into the image);
# example 1: two images of different sizes packed together.
EXAMPLES = [[0], [1, 0]]
# One image per row: the tower attends with key lengths instead of segment ids.
ONE_IMAGE_PER_ROW = [[0], [1]]


def _check_parity(hf_model, tower, atol, examples=EXAMPLES):
    patches, grids = _images()
    pixel_values, segment_ids, layout = _batch(patches, grids, examples, pad_noise=1.0)
    ours = _run(tower, pixel_values, segment_ids, layout)
    assert ours.shape == (len(examples), NUM_PATCHES // 4, tower.config.hidden_size)
    for b, images in enumerate(examples):
        expected = _hf_merged(hf_model, patches, grids, images)
        np.testing.assert_allclose(ours[b, : len(expected)], expected, atol=atol, rtol=0)
        np.testing.assert_array_equal(ours[b, len(expected) :], 0.0)
    return ours


@pytest.mark.parametrize("examples", [EXAMPLES, ONE_IMAGE_PER_ROW], ids=["segments", "lengths"])
def test_tiny_parity_one_and_two_images(tiny, examples):
    hf_model, _, tower = tiny
    _check_parity(hf_model, tower, atol=1e-4, examples=examples)


def test_remat_and_bfloat16_keep_the_result(tiny):
    hf_model, config, tower = tiny
    patches, grids = _images()
    batch = _batch(patches, grids, EXAMPLES)
    reference = _run(tower, *batch)
    params = _hf_params(hf_model, config)
    remat = _tower(config, params, remat="full")
    np.testing.assert_allclose(_run(remat, *batch), reference, atol=1e-5, rtol=0)
    half = _tower(
        config,
        jax.tree.map(lambda x: x.astype(jnp.bfloat16), params),
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
    )
    out = _run(half, *batch)
    assert jax.tree.leaves(nnx.state(half))[0].dtype == jnp.bfloat16
    # bf16 keeps ~3 significant digits; a wrong op would be off by O(1).
    np.testing.assert_allclose(out, reference, atol=0.05 * np.abs(reference).max(), rtol=0)


def test_hf_names_round_trip_and_cover_every_parameter(tiny):
    hf_model, config, tower = tiny
    hf_state = {f"visual.{name}": t.numpy() for name, t in hf_model.state_dict().items()}
    params = vision.vision_params_from_hf(hf_state.__getitem__, config)
    flat_ours = {path for path, _ in nnx.to_flat_state(nnx.state(tower))}
    flat_read = {path for path, _ in nnx.to_flat_state(nnx.State(params))}
    assert flat_read == flat_ours
    back = vision.vision_params_to_hf(nnx.state(tower).to_pure_dict(), config)
    assert sorted(back) == sorted(hf_state)
    for name, array in hf_state.items():
        np.testing.assert_array_equal(back[name], array, err_msg=name)


def test_unknown_remat_policy_is_rejected(tiny):
    _, config, _ = tiny
    with pytest.raises(ValueError, match="remat"):
        vision.VisionTower(config, remat="sometimes", rngs=nnx.Rngs(0))


def test_2b_width_parity_one_and_two_images():
    hf_model, config = _hf_vision("2b")
    assert (config.embed_dim, config.num_heads, config.hidden_size) == (1280, 16, 1536)
    tower = _tower(config, _hf_params(hf_model, config))
    _check_parity(hf_model, tower, atol=1e-4)
