"""A toy SPMD job for tests/test_distributed.py: an evaluation, a few training steps, a checkpoint.

    python tests/multihost_toy.py --out=DIR [--config.distributed.coordinator_address=HOST:PORT
        --config.distributed.num_processes=N --config.distributed.process_id=I]

It goes through every multi-host path of g2e.distributed the real stages use: `initialize` from
config keys, an 8-device mesh, each host reading only its `host_slice` of the items, global
batches assembled from host rows, per-item results gathered back in input order, a global-batch
contrastive loss, an Orbax checkpoint written by all processes together, and files written by
process 0 only. It also asks `put_batch` for a batch whose 'batch' rule names no mesh axis,
which several processes must refuse (each would take its rows for the whole batch). Run as one process with 8 devices or as two with 4 each, it must write the same
results (DIR/results.npz) — the test compares them; DIR/meta.json records the process layout
and the refusal.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from g2e import distributed
from g2e.models import sharding

_OUT = flags.DEFINE_string("out", None, "directory for results.npz and meta.json", required=True)
_CONFIG = config_flags.DEFINE_config_dict(
    "config",
    ml_collections.ConfigDict(
        dict(
            distributed=dict(coordinator_address="", num_processes=0, process_id=-1),
            mesh=dict(data=-1, fsdp=2, tensor=2),
        )
    ),
)

NUM_ITEMS = 22  # not a multiple of the process count: shares differ by one
GLOBAL_BATCH = 8
WIDTH, EMBED = 16, 8
TEMPERATURE = 0.1


def embed(weights: jax.Array, x: jax.Array) -> jax.Array:
    """The 'model': a linear map, L2-normalised (stands in for the MLLM's last-token state)."""
    y = x @ weights
    return y / jnp.linalg.norm(y, axis=-1, keepdims=True)


def contrastive_loss(weights, queries, candidates):
    """InfoNCE of every query against all candidates of the global batch."""
    logits = embed(weights, queries) @ embed(weights, candidates).T / TEMPERATURE
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.arange(logits.shape[0])
    ).mean()


def evaluate(weights, items, lengths, mesh):
    """Embeds the items in global batches, each host feeding its own share; returns [N, D].

    Items have a valid length (features past it are zero); each step is padded to the largest
    length any host needs, as the real embedder pads to length buckets.
    """
    share = distributed.host_slice(len(items))
    local_items, local_lengths = items[share], lengths[share]
    local_batch = GLOBAL_BATCH // jax.process_count()
    embed_fn = jax.jit(embed)
    steps = distributed.num_host_batches(len(items), local_batch)
    chunks = [slice(step * local_batch, (step + 1) * local_batch) for step in range(steps)]
    widths = distributed.max_across_processes(
        [local_lengths[rows].max(initial=1) for rows in chunks]
    )
    outputs = []
    for rows, width in zip(chunks, widths):
        chunk = local_items[rows]
        padded = np.zeros((local_batch, width), np.float32)
        padded[: len(chunk)] = chunk[:, :width]
        padded[len(chunk) :] = 1.0  # any finite row; its embedding is dropped below
        batch = distributed.put_batch({"x": padded}, mesh, sharding.DEFAULT_RULES)
        outputs.append(distributed.local_rows(embed_fn(weights[:width], batch["x"]))[: len(chunk)])
    return distributed.gather_in_order(np.concatenate(outputs), len(items))


def train_step(weights, queries, candidates, learning_rate=0.5):
    loss, grads = jax.value_and_grad(contrastive_loss)(weights, queries, candidates)
    return weights - learning_rate * grads, loss


def train(weights, queries, candidates, mesh, steps=3):
    """A few SGD steps; each host supplies its rows of every global batch."""
    step_fn = jax.jit(train_step, donate_argnums=0)
    losses = []
    for step in range(steps):
        rows = slice(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
        mine = distributed.host_slice(GLOBAL_BATCH)
        batch = distributed.put_batch(
            {"queries": queries[rows][mine], "candidates": candidates[rows][mine]},
            mesh,
            sharding.DEFAULT_RULES,
        )
        weights, loss = step_fn(weights, batch["queries"], batch["candidates"])
        losses.append(float(loss))
    return weights, np.array(losses)


def checkpoint_round_trip(weights, directory):
    """Saves the sharded weights with Orbax (all processes together) and restores them."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, "weights"), {"weights": weights})
        checkpointer.wait_until_finished()
        abstract = {
            "weights": jax.ShapeDtypeStruct(weights.shape, weights.dtype, sharding=weights.sharding)
        }
        return checkpointer.restore(os.path.join(directory, "weights"), abstract)["weights"]


def replicated_batch_refusal(mesh) -> str:
    """put_batch's error for a 'batch' rule that names no mesh axis ('' when it places it)."""
    try:
        distributed.put_batch({"x": np.zeros((2, WIDTH), np.float32)}, mesh, [("batch", None)])
    except ValueError as error:
        return str(error)
    return ""


def main(_):
    config = _CONFIG.value
    distributed.initialize(config)
    mesh = distributed.make_mesh(config.mesh)
    rng = np.random.default_rng(0)  # the same data on every host; each reads its share
    items = rng.normal(size=(NUM_ITEMS, WIDTH)).astype(np.float32)
    lengths = np.sort(rng.integers(2, WIDTH + 1, size=NUM_ITEMS))  # hosts need different widths
    items[np.arange(WIDTH) >= lengths[:, None]] = 0.0
    queries = rng.normal(size=(3 * GLOBAL_BATCH, WIDTH)).astype(np.float32)
    candidates = (queries + 1.0 * rng.normal(size=queries.shape)).astype(np.float32)
    initial = rng.normal(size=(WIDTH, EMBED)).astype(np.float32)
    # Weights sharded over every mesh axis, data included, so the embedding step, gradients and
    # updates all exchange data between hosts (and a shape mismatch between hosts would fail).
    weights = jax.device_put(
        initial, NamedSharding(mesh, PartitionSpec("fsdp", ("data", "tensor")))
    )

    refusal = replicated_batch_refusal(mesh)
    embeddings = evaluate(weights, items, lengths, mesh)
    reference = items @ initial
    reference /= np.linalg.norm(reference, axis=-1, keepdims=True)
    weights, losses = train(weights, queries, candidates, mesh)
    restored = checkpoint_round_trip(weights, os.path.abspath(_OUT.value))
    final = multihost_utils.process_allgather(weights, tiled=True)
    final_restored = multihost_utils.process_allgather(restored, tiled=True)

    if distributed.is_primary():
        np.savez(
            os.path.join(_OUT.value, "results.npz"),
            embeddings=embeddings,
            reference=reference,
            losses=losses,
            weights=final,
            restored=final_restored,
            initial=initial,
        )
        with open(os.path.join(_OUT.value, "meta.json"), "w") as f:
            json.dump(
                dict(
                    process_count=jax.process_count(),
                    device_count=jax.device_count(),
                    mesh=dict(mesh.shape),
                    replicated_batch_refusal=refusal,
                ),
                f,
            )
    distributed.barrier("multihost_toy_done")


if __name__ == "__main__":
    app.run(main)
