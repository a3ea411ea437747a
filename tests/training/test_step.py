"""The Qwen2VL train step: the fast paths equal the plain one, and bf16 models train adapters as
float32 ones do."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from g2e.models import lora, sharding
from g2e.models.config import Qwen2VLConfig
from g2e.models.qwen2_vl import Qwen2VL
from g2e.training import gradcache, optimizer, step
from g2e.training import loss as loss_lib
from g2e.training import stage as training_stage
from tests.models import checkpoints
from tests.models.test_qwen2_vl import make_batch

CONFIG = Qwen2VLConfig.from_hf(dict(checkpoints.hf_config_dict("tiny"), model_type="qwen2_vl"))
# Eight pairs: image rows and text-only rows mixed on both sides, so with 2 devices x chunks of
# 2 rows some vision chunks hold no image and are skipped.
QUERIES = [[5, (1, 4, 4), 3], [9], [7], [2, (1, 2, 4), 3], [8], [4, (1, 4, 2), 2], [6], [3]]
CANDIDATES = [[6], [2, (1, 2, 2), 4], [10], [5], [3, (1, 4, 4), 1], [7], [4], [9]]


def _model(dtype=jnp.float32, dropout=0.0, seed=0):
    adapter = lora.AdapterConfig(kind="dora", r=4, alpha=16, dropout=dropout)
    model = Qwen2VL(CONFIG, dtype=dtype, param_dtype=dtype, adapter=adapter, rngs=nnx.Rngs(seed))
    # Move the adapters off their identity start so every term of DoRA matters.
    _, adapters, _ = nnx.split(model, nnx.LoRAParam, ...)
    keys = iter(jax.random.split(jax.random.key(seed + 5), 64))
    nnx.update(
        model,
        jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), adapters),
    )
    return model


def _batch():
    rng = np.random.default_rng(0)
    sides = {
        side: make_batch(CONFIG, examples, "right", rng)[0]
        for side, examples in (("query", QUERIES), ("candidate", CANDIDATES))
    }
    return {**sides, "ids": np.arange(len(QUERIES), dtype=np.int32)}


def _loss_fn(ids):
    def fn(queries, candidates, params):
        loss, accuracy = loss_lib.infonce(
            queries, candidates, ids, loss_lib.LossConfig(0.05), mesh=None
        )
        return loss, {"accuracy": accuracy}

    return fn


@pytest.mark.slow
def test_vision_once_and_hoisted_norms_in_gradcache_equal_plain_backprop():
    """The step's fast path vs the plain one on one batch (dropout off): the tower run once per
    side with text-only chunks skipped, DoRA norms computed once per step, GradCache chunks on
    2 devices; against backprop through `Qwen2VL.embed` computing everything itself."""
    model = _model()
    graphdef, trainable, frozen = training_stage.split_model(model, full=False)
    params = {"model": trainable}
    batch = _batch()
    loss_fn = _loss_fn(jnp.asarray(batch["ids"]))
    rng = jax.random.key(0)

    def plain_embed(p, f, b, key):  # the tower and the norms inside the call
        return nnx.merge(graphdef, nnx.State(p["model"]), f).embed(b, deterministic=False, rng=key)

    plain = jax.jit(functools.partial(gradcache.direct_loss_and_grads, plain_embed, loss_fn))(
        params, frozen, jax.tree.map(jnp.asarray, batch), rng
    )

    prepare, embed = training_stage.model_step_fns(graphdef, devices=2, vision_chunk=2)
    mesh = jax.make_mesh(
        (2, 1, 1),
        ("data", "fsdp", "tensor"),
        axis_types=(AxisType.Auto,) * 3,
        devices=jax.devices()[:2],
    )
    placed = {
        side: {
            k: jax.device_put(
                v, NamedSharding(mesh, P(*([None] * sharding.batch_dim(k) + ["data"])))
            )
            for k, v in batch[side].items()
        }
        for side in ("query", "candidate")
    }

    def fast(params, frozen, batch):
        frozen, batch = prepare(params["model"], frozen, batch)
        assert "pixel_values" not in batch["query"] and "vision_tokens" in batch["query"]
        return gradcache.loss_and_grads(
            lambda p, f, b, key: embed(p["model"], f, b, key),
            loss_fn,
            params,
            frozen,
            batch,
            rng,
            query_chunk=2,
            candidate_chunk=2,
            mesh=mesh,
            rules=sharding.DEFAULT_RULES,
        )

    loss, aux, grads = jax.jit(fast)(params, frozen, placed)
    np.testing.assert_allclose(float(loss), float(plain[0]), rtol=1e-5)
    assert float(aux["accuracy"]) == float(plain[1]["accuracy"])
    for (path, g), ref in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(plain[2])
    ):
        scale = float(jnp.abs(ref).max())
        assert scale > 0, path
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(ref), atol=1e-4 * scale, rtol=0, err_msg=str(path)
        )


def _setup(model, *, lr, temperature, mesh=None):
    """(the step's StepSetup for `model`'s adapters at a constant `lr`, trainable, frozen)."""
    graphdef, trainable, frozen = training_stage.split_model(model, full=False)
    prepare, embed = training_stage.model_step_fns(graphdef)
    cfg = dict(lr=lr, warmup_steps=0, steps=10**6, weight_decay=0.0, grad_clip=1.0)
    opt, schedule = optimizer.make_optimizer(type("Cfg", (), cfg))
    setup = step.StepSetup(
        embed_fn=embed,
        loss_config=loss_lib.LossConfig(temperature),
        optimizer=opt,
        schedule=schedule,
        mesh=mesh,
        prepare_fn=prepare,
    )
    return setup, trainable, frozen


def _train(model, batch, steps):
    """`steps` direct-backprop train steps at lr 5e-5 on one batch; (initial, final) adapters."""
    setup, trainable, frozen = _setup(model, lr=5e-5, temperature=0.02)
    state = step.init_state(trainable, setup.optimizer, 0, setup.loss_config)
    initial = jax.tree.map(np.asarray, trainable)
    train_step = jax.jit(functools.partial(step.train_step, setup))
    for _ in range(steps):
        state, metrics = train_step(state, frozen, batch)
        assert np.isfinite(float(metrics["loss"]))
    return initial, jax.tree.map(np.asarray, state["params"]["model"])


def _by_name(tree, name):
    return [x for path, x in jax.tree_util.tree_leaves_with_path(tree) if path[-1].key == name]


@pytest.mark.slow
def test_bf16_model_trains_its_adapters_like_float32():
    """bf16 base, lr 5e-5, 20 steps: every DoRA magnitude vector and >= 99% of lora_A entries
    move, and the adapters travel within 10% of the float32 run's distance."""
    batch = jax.tree.map(jnp.asarray, _batch())
    text_only = {
        side: {
            k: v
            for k, v in batch[side].items()
            if k not in ("pixel_values", "vision_segment_ids", "vision_positions")
        }
        for side in ("query", "candidate")
    }
    text_only["ids"] = batch["ids"]
    runs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = _model(dtype, dropout=0.1, seed=1)
        assert model.language_model.layers.mlp.down_proj.kernel.value.dtype == dtype
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
        runs[dtype] = _train(model, text_only, 20)
    for dtype, (initial, final) in runs.items():
        for before, after in zip(_by_name(initial, "magnitude"), _by_name(final, "magnitude")):
            moved = np.any(after != before, axis=-1)  # one vector per stacked layer
            assert moved.all(), (dtype, moved)
        a_before = np.concatenate([x.ravel() for x in _by_name(initial, "lora_a")])
        a_after = np.concatenate([x.ravel() for x in _by_name(final, "lora_a")])
        assert np.mean(a_after != a_before) >= 0.99, (dtype, np.mean(a_after != a_before))
        print(f"{jnp.dtype(dtype).name}: lora_A entries moved {np.mean(a_after != a_before):.4f}")
    distance = {
        dtype: {
            name: optax.global_norm(
                jax.tree.map(lambda a, b: a - b, _by_name(final, name), _by_name(initial, name))
            )
            for name in ("lora_a", "lora_b", "magnitude")
        }
        for dtype, (initial, final) in runs.items()
    }
    for name, reference in distance[jnp.float32].items():
        ratio = float(distance[jnp.bfloat16][name] / reference)
        print(
            f"{name}: distance travelled bf16 {float(distance[jnp.bfloat16][name]):.4g}, "
            f"float32 {float(reference):.4g}, ratio {ratio:.3f}"
        )
        assert 0.9 <= ratio <= 1.1, (name, ratio, distance)


def test_auto_backprop_picks_the_lightest_remat_that_fits():
    """train.backprop=auto with a memory limit the direct step without remat exceeds: it picks
    a heavier remat policy of the text decoder, one that fits, without rebuilding the model,
    and that step trains exactly as the one without."""
    mesh = jax.make_mesh(
        (1, 1, 1),
        ("data", "fsdp", "tensor"),
        axis_types=(AxisType.Auto,) * 3,
        devices=jax.devices()[:1],
    )
    setup, trainable, frozen = _setup(_model(), lr=1e-3, temperature=0.05, mesh=mesh)
    replicated = NamedSharding(mesh, P())
    batch = jax.device_put(_batch(), replicated)

    def fresh_state():  # the step donates its state
        state = step.init_state(
            jax.tree.map(jnp.copy, trainable), setup.optimizer, 0, setup.loss_config
        )
        return jax.device_put(state, replicated)

    shardings = jax.tree.map(lambda x: x.sharding, fresh_state())
    probe = step.CompiledSteps(setup, shardings)
    plain, full = (probe._compile(fresh_state(), frozen, batch, 0, 0, r) for r in ("none", "full"))
    print(f"per-device memory planned: remat none {plain.memory_bytes}, full {full.memory_bytes}")
    assert full.memory_bytes < plain.memory_bytes  # the override reaches the decoder's scan
    limit = int(plain.memory_bytes / 0.9) - 1  # just under what the step without remat needs
    steps = step.CompiledSteps(setup, shardings, memory_limit=limit)
    chosen = steps.get(fresh_state(), frozen, batch)
    assert chosen.backprop == "direct" and chosen.remat in ("dots", "full")
    assert chosen.memory_bytes <= 0.9 * limit
    (new, metrics), (reference, reference_metrics) = (
        compiled.executable(fresh_state(), frozen, batch) for compiled in (chosen, plain)
    )
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(metrics[key]), float(reference_metrics[key]), rtol=1e-5)
    # One Adam step of about lr = 1e-3 per entry; float32 reassociation moves it by < 1e-5.
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(reference["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
