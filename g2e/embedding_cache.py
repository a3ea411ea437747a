"""The one embedding cache of g2e: what evaluation and mining embed, kept on disk in shards.

A rerun, or a stage resumed after a kill, embeds only what is not stored yet. The cache is
versioned, written atomically shard by shard, and tied to a fingerprint of the model, prompt
and preprocessing and to the items' keys, so nothing is ever reused for other items.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from g2e import atomic, distributed, killpoints

CACHE_FORMAT = 3
CACHE_DTYPES = ("float32", "float16")


def _keys_digest(keys: Sequence[Any]) -> str:
    """A sha1 over the items' keys, in order: the cache holds embeddings of exactly these."""
    digest = hashlib.sha1()
    for key in keys:
        digest.update(json.dumps(key).encode())
        digest.update(b"\n")
    return digest.hexdigest()


class EmbeddingCache:
    """Embeddings of keyed items under `directory`, one sharded array per name, resumable.

    `<name>.json` holds the format version, the fingerprint (model + prompt + preprocessing),
    the number of items, a digest of their keys in order, the shard size and the storage
    dtype; `<name>/<shard>.npy` holds the [<= shard_size, D] embeddings of items
    shard*shard_size.. . Every file is written atomically and a shard only after its items
    are embedded, so a killed run keeps every finished shard and the next run embeds only
    the missing ones. An index of another fingerprint, other keys or another layout makes
    the old shards go; nothing is ever reused for other items.

    The stages keep one cache per subset, in a directory named for it; the kill point
    `embedding_shard_<subset>/<name>_<shard>` (g2e.killpoints) follows each shard written.

    Multi-host: every process reads the same directory (one all hosts see) and decides which
    shards are missing before any is written (a barrier separates the two), so all of them
    run the same embedding steps; only processes with `writable` write.
    """

    def __init__(
        self,
        directory: str | pathlib.Path,
        fingerprint: str,
        *,
        writable: bool = True,
        shard_size: int = 4096,
        dtype: str = "float32",
    ):
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"embedding cache dtype {dtype!r}: use one of {CACHE_DTYPES}")
        self.directory = pathlib.Path(directory)
        self.fingerprint = fingerprint
        self.writable = writable
        self.shard_size = shard_size
        self.dtype = dtype

    def _index(self, keys: Sequence[Any]) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "fingerprint": self.fingerprint,
            "count": len(keys),
            "keys_sha1": _keys_digest(keys),
            "shard_size": self.shard_size,
            "dtype": self.dtype,
        }

    def _shards(self, name: str, count: int) -> list[pathlib.Path]:
        return [
            self.directory / name / f"{start // self.shard_size:05d}.npy"
            for start in range(0, count, self.shard_size)
        ]

    def missing(self, name: str, keys: Sequence[Any]) -> list[int]:
        """The shards of `keys` not stored yet (all of them for another model or data)."""
        shards = self._shards(name, len(keys))
        try:
            index = json.loads((self.directory / f"{name}.json").read_text())
        except (OSError, ValueError):
            return list(range(len(shards)))
        if index != self._index(keys):
            logging.info(
                "cache %s/%s is for another model, prompt or data; re-embedding",
                self.directory,
                name,
            )
            return list(range(len(shards)))
        return [i for i, path in enumerate(shards) if not path.is_file()]

    def get(
        self, name: str, keys: Sequence[Any], compute: Callable[[np.ndarray], np.ndarray]
    ) -> np.ndarray:
        """float32 [len(keys), D]: the stored embeddings of `keys`, the missing shards computed.

        `compute(indices)` embeds the items at `indices` (int64, ascending) and returns
        [len(indices), D]; it is called once per missing shard, and each shard is stored as
        soon as it is computed. A stored shard that does not read back is computed again.
        """
        return self.get_sides({name: keys}, lambda wanted: {name: compute(wanted[name])})[name]

    def get_sides(
        self,
        sides: Mapping[str, Sequence[Any]],
        compute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    ) -> dict[str, np.ndarray]:
        """`get` for several names at once ({name: keys} -> {name: [len(keys), D]}): shard k
        of every name that lacks it is computed in one `compute({name: indices})` call, round
        by round, each round's shards stored as soon as it is done (one embedding call over a
        subset's queries and candidates leaves fewer partly filled steps than two)."""
        shards = {name: self._shards(name, len(keys)) for name, keys in sides.items()}
        missing = {name: set(self.missing(name, keys)) for name, keys in sides.items()}
        for name, keys in sides.items():
            distributed.barrier(f"embedding-cache-{self.directory}-{name}")
            if self.writable and len(missing[name]) == len(shards[name]):
                self._reset(name, keys)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in sides}
        for number in range(max(map(len, shards.values()), default=0)):
            wanted = {}
            for name, keys in sides.items():
                if number >= len(shards[name]):
                    continue
                indices = np.arange(
                    number * self.shard_size, min((number + 1) * self.shard_size, len(keys))
                )
                stored = None
                if number not in missing[name]:
                    stored = self._read(shards[name][number], len(indices))
                if stored is None:
                    wanted[name] = indices
                else:
                    parts[name].append(stored)
            computed = compute(wanted) if wanted else {}
            for name, indices in wanted.items():
                stored = np.asarray(computed[name], np.float32)
                if stored.ndim != 2 or stored.shape[0] != len(indices):
                    raise ValueError(
                        f"cache {self.directory}/{name}: compute gave "
                        f"{stored.shape} for {len(indices)} items"
                    )
                if self.writable:
                    self._write(shards[name][number], stored)
                    # A test may kill the process here: this shard is whole, the next absent.
                    killpoints.reached(f"embedding_shard_{self.directory.name}/{name}_{number}")
                parts[name].append(stored)
        for name in sides:
            if missing[name] and len(missing[name]) < len(shards[name]):
                logging.info(
                    "cache %s/%s: %d of %d shards reused",
                    self.directory,
                    name,
                    len(shards[name]) - len(missing[name]),
                    len(shards[name]),
                )
        return {
            name: np.concatenate(parts[name]) if parts[name] else np.zeros((0, 0), np.float32)
            for name in sides
        }

    def _reset(self, name: str, keys: Sequence[Any]) -> None:
        """Removes another index's shards and writes the index of `keys`."""
        for stale in (self.directory / name).glob("*.npy"):
            stale.unlink()
        atomic.write_json(self.directory / f"{name}.json", self._index(keys))

    def _read(self, path: pathlib.Path, rows: int) -> np.ndarray | None:
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            logging.warning("cache shard %s is unreadable (%s); re-embedding it", path, error)
            return None
        if array.ndim != 2 or array.shape[0] != rows:
            logging.warning(
                "cache shard %s holds %s, not %d rows; re-embedding it", path, array.shape, rows
            )
            return None
        return array.astype(np.float32)

    def _write(self, path: pathlib.Path, embeddings: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, embeddings.astype(self.dtype), allow_pickle=False)
        atomic.write_bytes(path, buffer.getvalue())


def embed_sides(
    embed: Callable[[list[Any], str], np.ndarray],
    sides: Mapping[str, Sequence[Any]],
    keys: Mapping[str, Sequence[Any]],
    cache: EmbeddingCache | None,
    *,
    desc: str,
) -> dict[str, np.ndarray]:
    """{name: float32 [len(items), D]} of several lists of items (e.g. a subset's queries and
    candidates), from `cache` where held (`EmbeddingCache.get_sides`; keys[name] name the
    items), what is missing of all lists embedded in one `embed(items, label)` call per round,
    so that a packed embedder fills its steps with all of them."""

    def compute(wanted: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chosen = [sides[name][i] for name, indices in wanted.items() for i in indices]
        embedded = embed(chosen, f"{desc} {'+'.join(wanted)}")
        ends = np.cumsum([len(indices) for indices in wanted.values()])[:-1]
        return dict(zip(wanted, np.split(embedded, ends)))

    if cache is None:
        return compute({name: np.arange(len(items)) for name, items in sides.items()})
    return cache.get_sides(keys, compute)
