"""g2e.models.attention: both masking forms, every kernel equal to XLA, left padding.

The splash kernel runs interpreted on the 8 simulated CPU devices (tests/conftest.py), inside
shard_map over a sharded batch. The cuDNN tests need a GPU: they are skipped here, and
bench/gpu_session.sh runs them on the accelerator machine with JAX_PLATFORMS=cuda.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from g2e.models import attention, hf_io, sharding
from tests.models import checkpoints
from tests.models.test_qwen2_vl import CASES, make_batch

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(
    not ON_GPU,
    reason="cuDNN fused attention needs a GPU (bench/gpu_session.sh runs this with "
    "JAX_PLATFORMS=cuda on the accelerator machine)",
)


def _reference_attention(q, k, v, allowed):
    """numpy attention with GQA; allowed [B, L, L] (query, key)."""
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    logits = np.einsum("blhe,bmhe->bhlm", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(allowed[:, None], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    return np.einsum("bhlm,bmhe->blhe", weights, v)


def _allowed(segment_ids, causal):
    allowed = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        allowed = allowed & np.tril(np.ones(allowed.shape[-2:], bool))
    return allowed


def _qkv(length, rng, batch=2, dtype=np.float32):
    shapes = [(batch, length, 4, 16), (batch, length, 2, 16), (batch, length, 2, 16)]
    return [rng.normal(size=s).astype(dtype) for s in shapes]


def _lengths_to_segments(lengths, length):
    return (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_segments_and_gqa(causal):
    rng = np.random.default_rng(1)
    q, k, v = _qkv(10, rng)
    segment_ids = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 2, 2, 2, 3, 3, 0]])
    out = attention.attend(q, k, v, segment_ids=jnp.asarray(segment_ids), causal=causal)
    expected = _reference_attention(q, k, v, _allowed(segment_ids, causal))
    real = segment_ids > 0
    np.testing.assert_allclose(np.asarray(out)[real], expected[real], atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("causal", [True, False])
def test_lengths_equal_the_segment_mask(causal):
    """The lengths form (cuDNN's, here through the XLA kernel) masks what segment ids mask."""
    rng = np.random.default_rng(2)
    q, k, v = _qkv(12, rng, batch=3)
    lengths = np.array([12, 5, 0], np.int32)  # full, right-padded, and a row of pads only
    segment_ids = _lengths_to_segments(lengths, 12)
    out = attention.attend(q, k, v, lengths=jnp.asarray(lengths), causal=causal)
    expected = _reference_attention(q, k, v, _allowed(segment_ids, causal))
    real = segment_ids > 0
    np.testing.assert_allclose(np.asarray(out)[real], expected[real], atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_aligned_with_lengths_equal_segments(side):
    """The text decoder's path: rotate each row's run to the front, attend with lengths,
    rotate back; equal on real tokens to attention over the batch as padded."""
    rng = np.random.default_rng(3)
    q, k, v = _qkv(9, rng, batch=3)
    sizes = [9, 4, 1]
    mask = np.zeros((3, 9), np.int32)
    for row, size in enumerate(sizes):
        if side == "left":
            mask[row, 9 - size :] = 1
        else:
            mask[row, :size] = 1
    rows = attention.PaddedRows.from_mask(jnp.asarray(mask))
    np.testing.assert_array_equal(rows.lengths, sizes)
    aligned = [rows.align(jnp.asarray(x)) for x in (q, k, v)]
    np.testing.assert_array_equal(rows.align(jnp.asarray(mask)), _lengths_to_segments(sizes, 9))
    out = rows.restore(attention.attend(*aligned, lengths=rows.lengths, causal=True))
    expected = _reference_attention(q, k, v, _allowed(mask, causal=True))
    real = mask > 0
    np.testing.assert_allclose(np.asarray(out)[real], expected[real], atol=1e-5)
    last = np.where(side == "left", 8, np.array(sizes) - 1)
    np.testing.assert_array_equal(rows.aligned_index(jnp.asarray(last), 9), np.array(sizes) - 1)


def test_attend_at_sees_keys_up_to_its_index():
    rng = np.random.default_rng(4)
    q, k, v = _qkv(7, rng)
    index = np.array([6, 2])
    full = attention.attend(q, k, v, lengths=jnp.asarray(index + 1), causal=True)
    one = attention.attend_at(
        jnp.asarray(q[np.arange(2), index][:, None]), k, v, index=jnp.asarray(index)[:, None]
    )
    np.testing.assert_allclose(one[:, 0], np.asarray(full)[np.arange(2), index], atol=1e-5)


@pytest.mark.parametrize(
    "backend, dtype, length, expected",
    [
        ("cpu", jnp.bfloat16, 128, "xla"),
        ("gpu", jnp.bfloat16, 100, "cudnn"),
        ("gpu", jnp.float32, 128, "xla"),  # cuDNN has no float32 fused kernel
        ("tpu", jnp.bfloat16, 256, "pallas"),
        ("tpu", jnp.float32, 100, "xla"),  # splash needs lengths in tiles of 128
    ],
)
def test_auto_attention_is_chosen_per_platform(backend, dtype, length, expected):
    assert attention.resolve("auto", length=length, dtype=dtype, backend=backend) == expected
    assert attention.resolve("xla", length=length, dtype=dtype, backend=backend) == "xla"


def test_kernel_checks_its_name_and_tiles():
    with pytest.raises(ValueError, match="attention must be one of"):
        attention.Kernel("flash")
    with pytest.raises(ValueError, match="block_kv=100"):
        attention.Kernel("pallas", block_kv=100)
    assert attention.as_kernel("xla") == attention.Kernel("xla")
    # The largest multiple of 128 at most the block that divides the length.
    assert [attention._fit_block(512, n) for n in (128, 640, 1024, 1536)] == [128, 128, 512, 512]


# ---- splash (TPU kernel, interpreted on CPU) ------------------------------------------------


def test_pallas_rejects_unaligned_length():
    q, k, v = _qkv(10, np.random.default_rng(5))
    with pytest.raises(ValueError, match="multiple of 128"):
        attention.attend(q, k, v, causal=True, implementation="pallas")


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) >= 8, "tests/conftest.py sets 8 simulated CPU devices"
    return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


@pytest.mark.slow
def test_splash_on_a_sharded_batch_equals_xla(mesh):
    """Splash runs in shard_map (batch over data x fsdp, heads over tensor), built once per
    shape, and gives XLA's values and gradients on real tokens, left padding included."""
    rng = np.random.default_rng(6)
    q, k, v = _qkv(256, rng, batch=4)
    segment_ids = np.ones((4, 256), np.int32)
    segment_ids[1, :37] = 0  # left padding
    segment_ids[2, 100:] = 0  # right padding
    segment_ids[3, 150:] = 2  # a second segment
    real = jnp.asarray(segment_ids > 0)[:, :, None, None]

    def loss(q, k, v, implementation):
        out = attention.attend(
            q, k, v, segment_ids=segment_ids, causal=True, implementation=implementation
        )
        return jnp.sum(jnp.where(real, out, 0) ** 2), out

    def values_and_grads(implementation):
        run = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
        return jax.jit(run, static_argnums=3)(q, k, v, implementation)

    (_, xla), xla_grads = values_and_grads("xla")
    splash_kernel = attention.Kernel("pallas", block_q=128, block_kv=256)
    attention._splash_kernel.cache_clear()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        (_, splash), splash_grads = values_and_grads(splash_kernel)
        jaxpr = str(jax.make_jaxpr(loss, static_argnums=3)(q, k, v, splash_kernel))
    assert "shard_map" in jaxpr and "P(('data', 'fsdp'), 'tensor', None, None)" in jaxpr
    assert attention._splash_kernel.cache_info().misses == 1  # one shape, one kernel
    mask = np.asarray(real[..., 0, 0])
    np.testing.assert_allclose(np.asarray(splash)[mask], np.asarray(xla)[mask], atol=1e-5)
    for ours, reference in zip(splash_grads, xla_grads, strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=5e-5)


def test_splash_needs_a_batch_that_splits_over_the_mesh(mesh):
    q, k, v = _qkv(128, np.random.default_rng(7), batch=2)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        with pytest.raises(ValueError, match="2 rows do not split"):
            attention.attend(q, k, v, causal=True, implementation="pallas")


# ---- cuDNN (GPU only) ------------------------------------------------------------------------

_CUDNN_CASES = {
    # name: (causal, segment_ids rows or None, lengths or None); rows of 128 tokens. The forms
    # g2e passes: lengths (text, causal; single-image vision rows), segments (several images,
    # Qwen2.5-VL windows), and segment ids of a left-padded batch.
    "left_padding": (True, [[0] * 37 + [1] * 91, [1] * 128], None),
    "segments": (False, [[1] * 30 + [2] * 50 + [3] * 40 + [0] * 8, [1] * 64 + [2] * 64], None),
    "causal_segments": (True, [[1] * 60 + [2] * 68, [1] * 100 + [0] * 28], None),
    "lengths": (True, None, [128, 41]),
    "lengths_not_causal": (False, None, [77, 1]),
}


@needs_gpu
@pytest.mark.parametrize("case", sorted(_CUDNN_CASES))
@pytest.mark.parametrize("name", ["cudnn", "auto"])
def test_cudnn_equals_xla(case, name):
    causal, segments, lengths = _CUDNN_CASES[case]
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _qkv(128, np.random.default_rng(8)))
    kwargs = dict(causal=causal)
    real = np.ones((2, 128), bool)
    if segments is not None:
        kwargs["segment_ids"] = jnp.asarray(segments, jnp.int32)
        real &= np.asarray(segments) > 0
    if lengths is not None:
        kwargs["lengths"] = jnp.asarray(lengths, jnp.int32)
        real &= _lengths_to_segments(lengths, 128) > 0
    assert attention.resolve(name, length=128, dtype=jnp.bfloat16) == "cudnn"
    ours = jax.jit(lambda q, k, v: attention.attend(q, k, v, implementation=name, **kwargs))
    xla = jax.jit(lambda q, k, v: attention.attend(q, k, v, implementation="xla", **kwargs))
    out, reference = (np.asarray(f(q, k, v).astype(jnp.float32)) for f in (ours, xla))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[real], reference[real], atol=2e-2, rtol=2e-2)


@needs_gpu
@pytest.mark.parametrize("case", ["mixed_batch_left_padded", "one_image"])
def test_cudnn_model_equals_xla(tmp_path, case):
    """The whole model in bf16: text on lengths (left padding rotated), the vision tower on
    key lengths (one image a row) or segments (several), cuDNN against XLA."""
    path = checkpoints.make_hf_checkpoint(tmp_path, seed=9)[1]
    outputs = {}
    for name in ("cudnn", "xla"):
        model = hf_io.load_model(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention=name)
        batch, _ = make_batch(model.config, *CASES[case], np.random.default_rng(10))
        hidden, embeddings = jax.jit(lambda m, b: (m(b), m.embed(b)))(model, batch)
        outputs[name] = (np.asarray(hidden.astype(jnp.float32)), np.asarray(embeddings))
    real = batch["attention_mask"].astype(bool)
    (hidden, embeddings), (xla_hidden, xla_embeddings) = outputs["cudnn"], outputs["xla"]
    scale = np.abs(xla_hidden[real]).max()
    np.testing.assert_allclose(hidden[real], xla_hidden[real], atol=0.05 * scale, rtol=0)
    assert np.min(np.sum(embeddings * xla_embeddings, axis=-1)) > 0.99
