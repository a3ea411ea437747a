"""Packed training rows (data.pack_length): the same loss and gradients as one row per example,
by plain backpropagation and by GradCache, on one device and on a mesh."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType

from g2e import distributed
from g2e.data.preprocess import Processor
from g2e.models import sharding
from g2e.training import batches
from g2e.training import loss as loss_lib
from g2e.training import stage as training_stage
from g2e.training import step as step_lib
from tests.training.test_stage import _model, _rows, move_adapters


def _codec(assets, rows, pack_length, row_multiple=1):
    processor = Processor.from_dir(
        assets / "model",
        max_length=128,
        image_resolution="processor",
        length_buckets=(64, 128),
        patch_buckets=(0, 64, 128, 256),
    )
    return batches.RowCodec(
        processor, rows, image_root=None, pack_length=pack_length, row_multiple=row_multiple
    )


def _loss_and_grads(model, batch, mesh, chunk):
    graphdef, trainable, frozen = training_stage.split_model(model, full=False)
    devices = sharding.batch_devices(mesh, sharding.DEFAULT_RULES) if mesh else 1
    prepare_fn, embed_fn = training_stage.model_step_fns(graphdef, devices=devices)
    setup = step_lib.StepSetup(
        embed_fn=embed_fn,
        loss_config=loss_lib.LossConfig(0.05),
        optimizer=optax.sgd(0.0),
        schedule=optax.constant_schedule(0.0),
        mesh=mesh,
        query_chunk=chunk,
        candidate_chunk=chunk,
        prepare_fn=prepare_fn,
    )
    params = {"model": trainable}

    def run(params, frozen, batch):
        frozen, batch = prepare_fn(params["model"], frozen, batch)
        return step_lib._loss_and_grads(setup, params, frozen, batch, jax.random.key(0))

    if mesh is None:
        return jax.jit(run)(params, frozen, batch)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        placed = distributed.put_batch(batch, mesh, sharding.DEFAULT_RULES)
        return jax.jit(run)(params, frozen, placed)


@pytest.mark.parametrize(
    "devices, chunk", [(1, 0), (1, 2), (2, 0)], ids=["direct", "gradcache", "mesh2-direct"]
)
def test_packed_rows_train_like_one_row_per_example(assets, devices, chunk):
    model = _model(assets / "model", "dora", dropout=0.0)
    move_adapters(model)
    rows = _rows(assets)[:8]
    mesh = None
    if devices > 1:
        mesh = jax.make_mesh(
            (devices, 1, 1),
            ("data", "fsdp", "tensor"),
            axis_types=(AxisType.Auto,) * 3,
            devices=jax.devices()[:devices],
        )
    plain = _codec(assets, rows, 0)
    packed = _codec(assets, rows, 256, row_multiple=devices)
    one_per_row = plain.collate([plain.encode(i) for i in range(8)])
    shared = packed.collate([packed.encode(i) for i in range(8)])
    # Rows really are shared, by queries and candidates together (one pool), every example in
    # a slot of its own; the images lie in vision rows of their own.
    pool = shared["pool"]
    assert set(shared) == {"pool", "query_place", "candidate_place", "ids"}
    assert pool["input_ids"].shape[0] < 8 and pool["last_index"].shape[1] > 1
    places = [tuple(p) for side in ("query", "candidate") for p in shared[f"{side}_place"]]
    assert len(set(places)) == 16
    query_rows = {p[0] for p in shared["query_place"]}
    assert query_rows & {p[0] for p in shared["candidate_place"]}
    assert "merged_token_index" in pool and "image_token_index" not in pool
    per_device = pool["input_ids"].shape[0] // devices
    chunk_rows = chunk and max(d for d in range(1, chunk + 1) if per_device % d == 0)
    loss, aux, grads = _loss_and_grads(model, one_per_row, mesh, chunk)
    loss_packed, aux_packed, grads_packed = _loss_and_grads(model, shared, mesh, chunk_rows)
    np.testing.assert_allclose(float(loss_packed), float(loss), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(aux_packed["accuracy"]), float(aux["accuracy"]), atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_packed), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    assert max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(grads)) > 1e-3
