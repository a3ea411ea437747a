"""GradCache (Gao et al., 2021) in JAX: a large contrastive batch at the memory cost of a chunk.

Letters: N global pairs, G devices along the batch mesh axes (`sharding.batch_devices`), T rows per device
in one chunk, J = N / (G * T) chunks, D embedding width.

1. Embed all queries and all candidates chunk by chunk (a `lax.scan`) without differentiating,
   so no activation outlives its chunk.
2. Take the loss and its gradient with respect to the [N, D] embeddings (and any parameter the
   loss holds directly, e.g. a learnable temperature).
3. Re-run each chunk under `jax.vjp` and pull the parameter gradient through with that chunk's
   embedding gradient, accumulating in float32 (another scan).
The dropout key of a chunk is the same in steps 1 and 3, so the re-run reproduces the embeddings
exactly. Everything is one traced function; jit it as a whole.

Chunking keeps sharding: the global batch is laid out device-major ([G, n] with n = N / G rows
per device), and chunk j takes rows j*T..(j+1)*T of every device, so each device embeds T of its
own rows per scan step with no data movement. Peak memory is that of one chunk's forward and
backward plus the [N, D] embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from g2e.models import sharding
from g2e.models.sharding import batch_dim

Array = jax.Array
PyTree = Any
# embed_fn(trainable, frozen, batch, rng) -> [b, D] embeddings of the b examples in `batch`;
# of a packed batch (b rows of S segment slots each), [b * S, D], row-major.
EmbedFn = Callable[[PyTree, PyTree, Mapping[str, Array], Array], Array]
# loss_fn(queries [N, D], candidates [N, D], trainable) -> (loss, aux metrics).
LossFn = Callable[[Array, Array, PyTree], tuple[Array, Mapping[str, Array]]]


def _layout(mesh: Mesh | None, rules: sharding.Rules | None) -> tuple[int, tuple[str, ...]]:
    """(G, the mesh axes the batch is split over); (1, ()) without a mesh."""
    if mesh is None:
        return 1, ()
    axes = sharding.batch_axes(sharding.rules_or_default(rules), mesh.axis_names)
    return sharding.batch_devices(mesh, rules), axes


def _constrain(x: Array, mesh: Mesh | None, spec: P) -> Array:
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def to_chunks(batch: Mapping[str, Array], chunk: int, devices: int) -> dict[str, Array]:
    """[N, ...] arrays -> [J, G * T, ...] with chunk j holding rows j*T.. of every device."""
    out = {}
    for key, x in batch.items():
        x = jnp.moveaxis(x, batch_dim(key), 0)
        total = x.shape[0]
        if total % (devices * chunk):
            raise ValueError(
                f"GradCache: batch of {total} ('{key}') does not split into "
                f"{devices} devices x chunks of {chunk}; make train.query_chunk / "
                "train.candidate_chunk divide the per-device batch."
            )
        num = total // (devices * chunk)
        x = x.reshape(devices, num, chunk, *x.shape[1:]).swapaxes(0, 1)
        out[key] = x.reshape(num, devices * chunk, *x.shape[3:])
    return out


def from_chunk(chunk_batch: Mapping[str, Array]) -> dict[str, Array]:
    """One chunk's arrays with the batch axis put back where the model expects it."""
    return {k: jnp.moveaxis(x, 0, batch_dim(k)) for k, x in chunk_batch.items()}


def from_chunks(embeddings: Array, devices: int) -> Array:
    """[J, G * T, D] chunked embeddings -> [N, D] in the batch's row order (packed rows:
    [J, G * T * S, D] -> [N * S, D], each row's S slots in a run)."""
    num, gc, dim = embeddings.shape
    x = embeddings.reshape(num, devices, gc // devices, dim).swapaxes(0, 1)
    return x.reshape(num * gc, dim)


def embed_in_chunks(
    embed_fn: EmbedFn,
    trainable: PyTree,
    frozen: PyTree,
    batch: Mapping[str, Array],
    rng: Array,
    chunk: int,
    *,
    mesh: Mesh | None = None,
    rules: sharding.Rules | None = None,
) -> Array:
    """Embeddings [N, D] of a batch, computed T rows per device at a time, not differentiated."""
    devices, axes = _layout(mesh, rules)
    chunks = to_chunks(batch, chunk, devices)
    num = next(iter(chunks.values())).shape[0]
    trainable = jax.lax.stop_gradient(trainable)

    def body(_, xs):
        index, chunk_batch = xs
        chunk_batch = {k: _constrain(v, mesh, P(axes)) for k, v in chunk_batch.items()}
        emb = embed_fn(trainable, frozen, from_chunk(chunk_batch), jax.random.fold_in(rng, index))
        return None, _constrain(emb.astype(jnp.float32), mesh, P(axes))

    _, embeddings = jax.lax.scan(body, None, (jnp.arange(num), chunks))
    return _constrain(from_chunks(embeddings, devices), mesh, P(axes))


def _accumulate_grads(
    embed_fn: EmbedFn,
    trainable: PyTree,
    frozen: PyTree,
    batch: Mapping[str, Array],
    cotangents: Array,
    rng: Array,
    chunk: int,
    acc: PyTree,
    mesh: Mesh | None,
    rules: sharding.Rules | None,
) -> PyTree:
    """acc + d(sum(embeddings * cotangents))/d(trainable), one chunk's backward at a time."""
    devices, axes = _layout(mesh, rules)
    chunks = to_chunks(batch, chunk, devices)
    # A packed row holds S examples, and embed_fn gives one embedding per segment slot.
    key, first = next(iter(batch.items()))
    slots = cotangents.shape[0] // first.shape[batch_dim(key)]
    chunked_cot = to_chunks({"cot": cotangents}, chunk * slots, devices)["cot"]
    num = chunked_cot.shape[0]

    def body(acc, xs):
        index, chunk_batch, cot = xs
        chunk_batch = {k: _constrain(v, mesh, P(axes)) for k, v in chunk_batch.items()}
        key = jax.random.fold_in(rng, index)
        emb, pullback = jax.vjp(
            lambda p: embed_fn(p, frozen, from_chunk(chunk_batch), key), trainable
        )
        (grads,) = pullback(_constrain(cot, mesh, P(axes)).astype(emb.dtype))
        acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
        return acc, None

    acc, _ = jax.lax.scan(body, acc, (jnp.arange(num), chunks, chunked_cot))
    return acc


def loss_and_grads(
    embed_fn: EmbedFn,
    loss_fn: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    batch: Mapping[str, Mapping[str, Array]],
    rng: Array,
    *,
    query_chunk: int,
    candidate_chunk: int,
    mesh: Mesh | None = None,
    rules: sharding.Rules | None = None,
) -> tuple[Array, Mapping[str, Array], PyTree]:
    """GradCache loss and gradient of the trainable parameters.

    Args:
      embed_fn: embeds one chunk (see EmbedFn).
      loss_fn: contrastive loss of all [N, D] query / candidate embeddings (see LossFn).
      trainable: differentiated parameters (adapters, or everything for full fine-tuning).
      frozen: the rest of the parameters (not differentiated).
      batch: {'query': model batch, 'candidate': model batch}, N rows each, row i of the
        candidates is the positive of query i.
      rng: dropout key of this step.
      query_chunk, candidate_chunk: rows per device per chunk.
      mesh, rules: the device mesh and the logical-axis rules, whose 'batch' rule names the
        mesh axes the batch is split over (None: no mesh, one device).

    A batch {'pool': model batch, ...} (packed rows holding the queries and the candidates)
    is embedded once, in chunks of `query_chunk`; loss_fn gets the pool's embeddings as both
    arguments (it finds each side's in them) and the pool's gradient is the sum of the two.

    Returns:
      (loss, aux metrics of loss_fn, float32 gradients shaped like `trainable`).
    """
    if "pool" in batch:
        pool = embed_in_chunks(
            embed_fn, trainable, frozen, batch["pool"], rng, query_chunk, mesh=mesh, rules=rules
        )
        (loss, aux), (query_cot, candidate_cot, direct) = jax.value_and_grad(
            loss_fn, argnums=(0, 1, 2), has_aux=True
        )(pool, pool, trainable)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), direct)
        grads = _accumulate_grads(
            embed_fn,
            trainable,
            frozen,
            batch["pool"],
            query_cot + candidate_cot,
            rng,
            query_chunk,
            grads,
            mesh,
            rules,
        )
        return loss, aux, grads
    query_rng, candidate_rng = jax.random.split(rng)
    sides = (("query", query_rng, query_chunk), ("candidate", candidate_rng, candidate_chunk))
    # 1. Every embedding, chunk by chunk, without differentiating.
    queries, candidates = (
        embed_in_chunks(
            embed_fn, trainable, frozen, batch[side], key, chunk, mesh=mesh, rules=rules
        )
        for side, key, chunk in sides
    )
    # 2. The loss and its gradient with respect to the embeddings (and the loss's own params).
    (loss, aux), (query_cot, candidate_cot, direct) = jax.value_and_grad(
        loss_fn, argnums=(0, 1, 2), has_aux=True
    )(queries, candidates, trainable)
    # 3. Each chunk again under jax.vjp, pulling its embeddings' gradient into the parameters.
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), direct)
    for (side, key, chunk), cotangents in zip(sides, (query_cot, candidate_cot)):
        grads = _accumulate_grads(
            embed_fn, trainable, frozen, batch[side], cotangents, key, chunk, grads, mesh, rules
        )
    return loss, aux, grads


def direct_loss_and_grads(
    embed_fn: EmbedFn,
    loss_fn: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    batch: Mapping[str, Mapping[str, Array]],
    rng: Array,
) -> tuple[Array, Mapping[str, Array], PyTree]:
    """The same loss and gradients by plain backpropagation through the whole batch.

    Memory grows with the batch; this is the reference GradCache is tested against.
    """
    query_rng, candidate_rng = jax.random.split(rng)

    def total(params):
        if "pool" in batch:  # packed: one pass over the queries and candidates together
            pool = embed_fn(params, frozen, batch["pool"], rng).astype(jnp.float32)
            return loss_fn(pool, pool, params)
        queries = embed_fn(params, frozen, batch["query"], query_rng)
        candidates = embed_fn(params, frozen, batch["candidate"], candidate_rng)
        return loss_fn(queries.astype(jnp.float32), candidates.astype(jnp.float32), params)

    (loss, aux), grads = jax.value_and_grad(total, has_aux=True)(trainable)
    return loss, aux, jax.tree.map(lambda g: g.astype(jnp.float32), grads)
