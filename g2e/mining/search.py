"""Device scoring for mining: each query's top `pool` candidates by inner product, and
(for subsets whose candidates have many owners) a query block's similarity to every query.

Candidates are sharded over all axes of a mesh; each shard scans its candidates in chunks of
a fixed size that does not depend on the number of devices (so every similarity comes from
the same matmul shape and the result does not depend on the number of devices), keeps a
running top-pool, and the per-shard top-pools are merged. Ties keep the lower candidate index
because chunks and shards are concatenated in index order and lax.top_k prefers the lower
position among equal values.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@functools.lru_cache(maxsize=16)
def _search_fn(mesh: jax.sharding.Mesh, num_real: int, pool: int, chunk: int):
    """Jitted (queries [B, D], candidates [Cpad, D] sharded, ids [Cpad] sharded) -> top-pool
    (values [B, pool] float32, candidate ids [B, pool] int32), replicated."""
    axes = tuple(mesh.axis_names)
    spec = jax.sharding.PartitionSpec

    def local(queries, candidates, ids):
        num_chunks = candidates.shape[0] // chunk
        chunks = candidates.reshape(num_chunks, chunk, candidates.shape[1])
        chunk_ids = ids.reshape(num_chunks, chunk)
        k = min(pool, chunk)

        def step(carry, xs):
            best_values, best_ids = carry
            block, block_ids = xs
            sims = jnp.einsum(
                "bd,cd->bc",
                queries,
                block,
                precision=jax.lax.Precision.HIGHEST,
                preferred_element_type=jnp.float32,
            )
            sims = jnp.where(block_ids[None, :] < num_real, sims, -jnp.inf)
            values, where = jax.lax.top_k(sims, k)
            # Earlier chunks hold lower ids and come first, so ties keep the lower id.
            values = jnp.concatenate([best_values, values], axis=1)
            found = jnp.concatenate([best_ids, block_ids[where]], axis=1)
            values, where = jax.lax.top_k(values, pool)
            return (values, jnp.take_along_axis(found, where, axis=1)), None

        init = (
            jnp.full((queries.shape[0], pool), -jnp.inf, jnp.float32),
            jnp.full((queries.shape[0], pool), np.iinfo(np.int32).max, jnp.int32),
        )
        init = jax.lax.pcast(init, axes, to="varying")  # the carry differs per shard
        (values, found), _ = jax.lax.scan(step, init, (chunks, chunk_ids))
        # Shards are gathered in index order, so ties again keep the lower id.
        values = jax.lax.all_gather(values, axes, axis=1, tiled=True, to="invarying")
        found = jax.lax.all_gather(found, axes, axis=1, tiled=True, to="invarying")
        values, where = jax.lax.top_k(values, pool)
        return values, jnp.take_along_axis(found, where, axis=1)

    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(spec(), spec(axes), spec(axes)), out_specs=(spec(), spec())
    )
    return jax.jit(sharded)


@functools.lru_cache(maxsize=16)
def _similarity_fn(mesh: jax.sharding.Mesh, chunk: int):
    """Jitted (queries [B, D], rows [Kpad, D] sharded) -> similarities [B, Kpad], replicated."""
    axes = tuple(mesh.axis_names)
    spec = jax.sharding.PartitionSpec

    def local(queries, rows):
        blocks = rows.reshape(rows.shape[0] // chunk, chunk, rows.shape[1])
        sims = jax.lax.map(
            lambda block: jnp.einsum(
                "bd,cd->bc",
                queries,
                block,
                precision=jax.lax.Precision.HIGHEST,
                preferred_element_type=jnp.float32,
            ),
            blocks,
        )
        sims = sims.transpose(1, 0, 2).reshape(queries.shape[0], -1)
        return jax.lax.all_gather(sims, axes, axis=1, tiled=True, to="invarying")

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec(), spec(axes)), out_specs=spec())
    return jax.jit(sharded)


class _ShardedRows:
    """A [num, D] float32 table on a mesh: rows padded to whole fixed-size chunks per shard
    and sharded over all mesh axes. The chunk depends on the table only, never on the
    device count, so every shard runs the same matmul shape."""

    def __init__(self, rows: np.ndarray, mesh: jax.sharding.Mesh | None, chunk: int):
        if mesh is None:
            mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("rows",))
        num, dim = rows.shape
        self.mesh, self.num = mesh, num
        self.chunk = min(chunk, _round_up(num, 128))
        padded = _round_up(num, self.chunk * mesh.size)
        sharding = jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names))
        )
        table = np.zeros((padded, dim), np.float32)
        table[:num] = rows
        ids = np.arange(padded, dtype=np.int32)
        # make_array_from_callback works on one host and on many (each holds all rows).
        self.rows = jax.make_array_from_callback(table.shape, sharding, lambda i: table[i])
        self.ids = jax.make_array_from_callback(ids.shape, sharding, lambda i: ids[i])


def _host(array: jax.Array) -> np.ndarray:
    """A replicated device array on the host (waits for it; any process may call it)."""
    return np.asarray(array.addressable_shards[0].data)


class CandidateIndex(_ShardedRows):
    """Candidate embeddings sharded over a mesh; `search` gives each query's top `pool`."""

    def __init__(
        self, candidates: np.ndarray, pool: int, mesh: jax.sharding.Mesh | None, chunk: int
    ):
        super().__init__(candidates, mesh, chunk)
        self.fn = _search_fn(self.mesh, self.num, pool, self.chunk)

    def dispatch(self, queries: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """Starts the search of a [block, D] query block; returns without waiting."""
        return self.fn(queries, self.rows, self.ids)

    @staticmethod
    def fetch(dispatched: tuple[jax.Array, jax.Array]) -> tuple[np.ndarray, np.ndarray]:
        """Waits for a dispatched search: (values [block, pool], candidate ids [block, pool])."""
        return _host(dispatched[0]), _host(dispatched[1])

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.fetch(self.dispatch(queries))


class SimilarityTable(_ShardedRows):
    """Vectors sharded over a mesh; a query block's similarity to every one of them."""

    def __init__(self, vectors: np.ndarray, mesh: jax.sharding.Mesh | None, chunk: int):
        super().__init__(vectors, mesh, chunk)
        self.fn = _similarity_fn(self.mesh, self.chunk)

    def dispatch(self, queries: np.ndarray) -> jax.Array:
        """Starts [block, D] queries x all vectors; returns without waiting."""
        return self.fn(queries, self.rows)

    @staticmethod
    def fetch(dispatched: jax.Array) -> np.ndarray:
        """Waits for it: float32 [block, num (padded)]; columns past `num` are 0."""
        return _host(dispatched)


def top_pool(
    query_embeddings: np.ndarray,
    candidate_embeddings: np.ndarray,
    pool: int,
    *,
    mesh: jax.sharding.Mesh | None = None,
    block_size: int = 256,
    candidate_chunk: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's `pool` most similar candidates by inner product, ties to the lower index.

    Candidates are sharded over all axes of `mesh` (default: all devices); queries go in
    blocks of `block_size`. Returns (similarities float32 [Q, pool], candidate ids int32
    [Q, pool]), best first. `pool` is clipped to the number of candidates.
    """
    pool = min(pool, len(candidate_embeddings))
    index = CandidateIndex(
        np.asarray(candidate_embeddings, np.float32), pool, mesh, candidate_chunk
    )
    values, found = [], []
    for start in range(0, len(query_embeddings), block_size):
        block = padded_block(query_embeddings[start : start + block_size], block_size)
        v, f = index.search(block)
        count = min(block_size, len(query_embeddings) - start)
        values.append(v[:count])
        found.append(f[:count])
    if not values:
        return np.zeros((0, pool), np.float32), np.zeros((0, pool), np.int32)
    return np.concatenate(values), np.concatenate(found)


def padded_block(queries: np.ndarray, block_size: int) -> np.ndarray:
    """A fixed-shape [block_size, D] float32 block (zeros after the real rows): one compile."""
    block = np.zeros((block_size, queries.shape[1]), np.float32)
    block[: len(queries)] = queries
    return block
