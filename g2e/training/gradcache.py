"""GradCache (Gao et al., 2021) in JAX: a large contrastive batch at the memory cost of a chunk.

Letters: N global pairs, G batch groups (devices along the batch mesh axes), T rows per device
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

from g2e.models.sharding import batch_dim

Array = jax.Array
PyTree = Any
# embed_fn(trainable, frozen, batch, rng) -> [b, D] embeddings of the b examples in `batch`.
EmbedFn = Callable[[PyTree, PyTree, Mapping[str, Array], Array], Array]
# loss_fn(queries [N, D], candidates [N, D], trainable) -> (loss, aux metrics).
LossFn = Callable[[Array, Array, PyTree], tuple[Array, Mapping[str, Array]]]


def _groups(mesh: Mesh | None, batch_axes: tuple[str, ...]) -> int:
    if mesh is None:
        return 1
    size = 1
    for axis in batch_axes:
        size *= mesh.shape.get(axis, 1)
    return size


def _constrain(x: Array, mesh: Mesh | None, spec: P) -> Array:
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def to_chunks(batch: Mapping[str, Array], chunk: int, groups: int) -> dict[str, Array]:
    """[N, ...] arrays -> [J, G * T, ...] with chunk j holding rows j*T.. of every group."""
    out = {}
    for key, x in batch.items():
        x = jnp.moveaxis(x, batch_dim(key), 0)
        total = x.shape[0]
        if total % (groups * chunk):
            raise ValueError(
                f"GradCache: batch of {total} ('{key}') does not split into "
                f"{groups} devices x chunks of {chunk}; make train.query_chunk / "
                "train.candidate_chunk divide the per-device batch."
            )
        num = total // (groups * chunk)
        x = x.reshape(groups, num, chunk, *x.shape[1:]).swapaxes(0, 1)
        out[key] = x.reshape(num, groups * chunk, *x.shape[3:])
    return out


def from_chunk(chunk_batch: Mapping[str, Array]) -> dict[str, Array]:
    """One chunk's arrays with the batch axis put back where the model expects it."""
    return {k: jnp.moveaxis(x, 0, batch_dim(k)) for k, x in chunk_batch.items()}


def from_chunks(embeddings: Array, groups: int) -> Array:
    """[J, G * T, D] chunked embeddings -> [N, D] in the batch's row order."""
    num, gc, dim = embeddings.shape
    x = embeddings.reshape(num, groups, gc // groups, dim).swapaxes(0, 1)
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
    batch_axes: tuple[str, ...] = (),
) -> Array:
    """Embeddings [N, D] of a batch, computed T rows per device at a time, not differentiated."""
    groups = _groups(mesh, batch_axes)
    axes = tuple(a for a in batch_axes if mesh is not None and a in mesh.axis_names)
    chunks = to_chunks(batch, chunk, groups)
    num = next(iter(chunks.values())).shape[0]
    trainable = jax.lax.stop_gradient(trainable)

    def body(_, xs):
        index, chunk_batch = xs
        chunk_batch = {k: _constrain(v, mesh, P(axes)) for k, v in chunk_batch.items()}
        emb = embed_fn(trainable, frozen, from_chunk(chunk_batch), jax.random.fold_in(rng, index))
        return None, _constrain(emb.astype(jnp.float32), mesh, P(axes))

    _, embeddings = jax.lax.scan(body, None, (jnp.arange(num), chunks))
    return _constrain(from_chunks(embeddings, groups), mesh, P(axes))


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
    batch_axes: tuple[str, ...],
) -> PyTree:
    """acc + d(sum(embeddings * cotangents))/d(trainable), one chunk's backward at a time."""
    groups = _groups(mesh, batch_axes)
    axes = tuple(a for a in batch_axes if mesh is not None and a in mesh.axis_names)
    chunks = to_chunks(batch, chunk, groups)
    chunked_cot = to_chunks({"cot": cotangents}, chunk, groups)["cot"]
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
    batch_axes: tuple[str, ...] = (),
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
      mesh, batch_axes: the device mesh and the mesh axes the batch is split over
        (`sharding.batch_axes`; with a mesh, () means the batch is not split).

    Returns:
      (loss, aux metrics of loss_fn, float32 gradients shaped like `trainable`).
    """
    query_rng, candidate_rng = jax.random.split(rng)
    common = dict(mesh=mesh, batch_axes=batch_axes)
    queries = embed_in_chunks(
        embed_fn, trainable, frozen, batch["query"], query_rng, query_chunk, **common
    )
    candidates = embed_in_chunks(
        embed_fn, trainable, frozen, batch["candidate"], candidate_rng, candidate_chunk, **common
    )
    (loss, aux), (query_cot, candidate_cot, direct) = jax.value_and_grad(
        loss_fn, argnums=(0, 1, 2), has_aux=True
    )(queries, candidates, trainable)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), direct)
    grads = _accumulate_grads(
        embed_fn,
        trainable,
        frozen,
        batch["query"],
        query_cot,
        query_rng,
        query_chunk,
        grads,
        mesh,
        batch_axes,
    )
    grads = _accumulate_grads(
        embed_fn,
        trainable,
        frozen,
        batch["candidate"],
        candidate_cot,
        candidate_rng,
        candidate_chunk,
        grads,
        mesh,
        batch_axes,
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
        queries = embed_fn(params, frozen, batch["query"], query_rng)
        candidates = embed_fn(params, frozen, batch["candidate"], candidate_rng)
        return loss_fn(queries.astype(jnp.float32), candidates.astype(jnp.float32), params)

    (loss, aux), grads = jax.value_and_grad(total, has_aux=True)(trainable)
    return loss, aux, jax.tree.map(lambda g: g.astype(jnp.float32), grads)
