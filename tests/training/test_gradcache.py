"""Global InfoNCE and GradCache: equal to plain backprop and to the single-device result."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from g2e.models import sharding
from g2e.training import gradcache
from g2e.training import loss as loss_lib
from tests.training import toy

N = 16


# The mesh axes of the default 'batch' sharding rule.
BATCH_AXES = sharding.batch_axes(sharding.DEFAULT_RULES, ("data", "fsdp", "tensor"))


def _mesh(shape):
    return jax.make_mesh(
        shape,
        ("data", "fsdp", "tensor"),
        axis_types=(AxisType.Auto,) * 3,
        devices=jax.devices()[: int(np.prod(shape))],
    )


def _batch(num=N, seed=0):
    q, c = toy.data(num, seed)
    return {"query": {"features": jnp.asarray(q)}, "candidate": {"features": jnp.asarray(c)}}


def _loss_fn(config, ids, mesh):
    def fn(queries, candidates, params):
        loss, acc = loss_lib.infonce(
            queries,
            candidates,
            ids,
            config,
            mesh=mesh,
            batch_axes=BATCH_AXES,
            log_inverse_temperature=params.get("log_t"),
        )
        return loss, {"accuracy": acc}

    return fn


def _embed(params, frozen, batch, rng):
    return toy.embed_fn(params["model"], frozen, batch, rng)


def test_infonce_matches_cross_entropy_reference():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(N, 8))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    c = rng.normal(size=(N, 8))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    c[3] = q[3]  # query 3 ranks its positive first for sure
    config = loss_lib.LossConfig(temperature=0.02)
    loss, acc = loss_lib.infonce(
        jnp.asarray(q, jnp.float32), jnp.asarray(c, jnp.float32), jnp.arange(N), config, mesh=None
    )
    logits = q @ c.T / 0.02
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, np.arange(N)).mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(acc) == pytest.approx(np.mean(logits.argmax(1) == np.arange(N)))
    assert float(acc) >= 1 / N


def test_infonce_options_mask_and_reweight():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(4, 8))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    c = q + 0.3 * rng.normal(size=(4, 8))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    q, c = jnp.asarray(q, jnp.float32), jnp.asarray(c, jnp.float32)
    sims = np.asarray(q @ c.T)
    # Same row id for candidates 0 and 1: each is the other's positive, not a negative.
    dup = loss_lib.infonce(q, c, jnp.array([7, 7, 2, 3]), loss_lib.LossConfig(0.1), mesh=None)[0]
    logits = sims / 0.1
    logits[0, 1] = logits[1, 0] = -np.inf
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, np.arange(4)).mean()
    np.testing.assert_allclose(float(dup), expected, rtol=1e-5)
    # Hardness weighting: negatives' logits + alpha * sim / T.
    hard = loss_lib.infonce(
        q, c, jnp.arange(4), loss_lib.LossConfig(0.1, hardness_alpha=0.5), mesh=None
    )[0]
    logits = (sims + 0.5 * sims * (1 - np.eye(4))) / 0.1
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, np.arange(4)).mean()
    np.testing.assert_allclose(float(hard), expected, rtol=1e-5)
    # False-negative masking: negatives above the positive's similarity + margin drop out.
    masked = loss_lib.infonce(
        q, c, jnp.arange(4), loss_lib.LossConfig(0.1, false_negative_margin=-2.0), mesh=None
    )[0]
    assert float(masked) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("learnable", [False, True])
def test_gradcache_equals_plain_gradients(learnable):
    trainable, frozen = toy.params()
    params = {"model": trainable}
    if learnable:
        params["log_t"] = jnp.float32(2.5)
    config = loss_lib.LossConfig(temperature=0.05, learnable_temperature=learnable)
    loss_fn = _loss_fn(config, jnp.arange(N), None)
    batch, rng = _batch(), jax.random.key(0)
    cached = jax.jit(
        functools.partial(
            gradcache.loss_and_grads, _embed, loss_fn, query_chunk=4, candidate_chunk=2
        )
    )
    loss, aux, grads = cached(params, frozen, batch, rng)
    ref_loss, ref_aux, ref_grads = jax.jit(
        functools.partial(gradcache.direct_loss_and_grads, _embed, loss_fn)
    )(params, frozen, batch, rng)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    assert float(aux["accuracy"]) == float(ref_aux["accuracy"])
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))[path]
        assert float(jnp.abs(ref).max()) > 0, path
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(ref), atol=1e-5, rtol=0, err_msg=str(path)
        )


def test_gradcache_with_dropout_reuses_the_chunk_masks():
    """Dropout masks of the re-run equal those of the first pass: grads equal the chunk-wise
    plain gradient of the same masks."""
    trainable, frozen = toy.params()
    params = {"model": trainable}
    embed = lambda p, f, b, r: toy.embed_fn(p["model"], f, b, r, dropout=0.5)
    loss_fn = _loss_fn(loss_lib.LossConfig(0.05), jnp.arange(N), None)
    batch, rng = _batch(), jax.random.key(3)
    # With one chunk per side, GradCache and plain backprop draw identical masks.
    loss, _, grads = gradcache.loss_and_grads(
        embed, loss_fn, params, frozen, batch, rng, query_chunk=N, candidate_chunk=N
    )

    def chunked_key_embed(p, f, b, r):  # plain backprop with the chunk-0 key GradCache uses
        return embed(p, f, b, jax.random.fold_in(r, 0))

    ref_loss, _, ref = gradcache.direct_loss_and_grads(
        chunked_key_embed, loss_fn, params, frozen, batch, rng
    )
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_eight_devices_equal_one_device():
    trainable, frozen = toy.params()
    params = {"model": trainable}
    config = loss_lib.LossConfig(temperature=0.05, hardness_alpha=0.3)
    batch, ids, rng = _batch(), jnp.arange(N), jax.random.key(0)
    results = []
    for shape in [(1, 1, 1), (4, 2, 1)]:
        mesh = _mesh(shape)
        shard = NamedSharding(mesh, P(("data", "fsdp")))
        placed = jax.tree.map(lambda x: jax.device_put(x, shard), batch)
        fn = jax.jit(
            functools.partial(
                gradcache.loss_and_grads,
                _embed,
                _loss_fn(config, jax.device_put(ids, shard), mesh),
                query_chunk=2,
                candidate_chunk=1,
                mesh=mesh,
                rules=sharding.DEFAULT_RULES,
            )
        )
        results.append(fn(params, frozen, placed, rng))
    (loss1, aux1, g1), (loss8, aux8, g8) = results
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-6)
    assert float(aux8["accuracy"]) == float(aux1["accuracy"])
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_peak_memory_follows_the_chunk_not_the_batch():
    """Compiled temp memory grows with the batch under plain backprop, barely under GradCache."""
    wide = 2048
    w_in = jax.random.normal(jax.random.key(1), (toy.FEATURES, wide)) / 3
    params = {"model": {"w_out": jax.random.normal(jax.random.key(2), (wide, toy.DIM)) / 50}}

    def embed(p, frozen, batch, rng):
        e = jnp.tanh(batch["features"] @ frozen) @ p["model"]["w_out"]
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

    def temp_bytes(fn, num):
        loss_fn = _loss_fn(loss_lib.LossConfig(0.05), jnp.arange(num), None)
        compiled = (
            jax.jit(functools.partial(fn, embed, loss_fn))
            .lower(params, w_in, _batch(num), jax.random.key(0))
            .compile()
        )
        return compiled.memory_analysis().temp_size_in_bytes

    cached = functools.partial(gradcache.loss_and_grads, query_chunk=4, candidate_chunk=4)
    growth = temp_bytes(cached, 128) - temp_bytes(cached, 16)
    plain_growth = temp_bytes(gradcache.direct_loss_and_grads, 128) - temp_bytes(
        gradcache.direct_loss_and_grads, 16
    )
    # One example's activations are 2048 floats (8 KB): 112 more examples cost plain backprop
    # about a megabyte; GradCache only adds the [N, D] embeddings and [n, N] logits.
    assert plain_growth > 112 * 8192, plain_growth
    assert growth < 0.25 * plain_growth, (growth, plain_growth)


def test_unmasked_identical_positives_are_the_release_loss():
    """mask_identical_positives=False: plain cross-entropy over q @ c^T / T, duplicates of a
    positive scored as negatives (the release); True masks them."""
    rng = np.random.default_rng(2)
    q = rng.normal(size=(6, 8))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    c = q + 0.1 * rng.normal(size=(6, 8))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    c[3] = c[1]  # rows 1, 3 and 5 share a label: identical positives
    c[5] = c[1]
    ids = jnp.array([0, 1, 2, 1, 4, 1])
    q32, c32 = jnp.asarray(q, jnp.float32), jnp.asarray(c, jnp.float32)
    logits = q @ c.T / 0.02
    release = optax.softmax_cross_entropy_with_integer_labels(logits, np.arange(6)).mean()
    off = loss_lib.infonce(
        q32, c32, ids, loss_lib.LossConfig(0.02, mask_identical_positives=False), mesh=None
    )[0]
    np.testing.assert_allclose(float(off), release, rtol=1e-5)
    masked_logits = logits.copy()
    for i, j in [(1, 3), (1, 5), (3, 1), (3, 5), (5, 1), (5, 3)]:
        masked_logits[i, j] = -np.inf
    masked = optax.softmax_cross_entropy_with_integer_labels(masked_logits, np.arange(6)).mean()
    on = loss_lib.infonce(q32, c32, ids, loss_lib.LossConfig(0.02), mesh=None)[0]
    np.testing.assert_allclose(float(on), masked, rtol=1e-5)
    assert float(off) > float(on) + 0.1
    cfg = toy.train_config(mask_identical_positives=False)
    assert not loss_lib.LossConfig.from_config(cfg).mask_identical_positives
    assert loss_lib.LossConfig.from_config(toy.train_config()).mask_identical_positives
