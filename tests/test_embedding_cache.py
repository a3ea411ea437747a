"""EmbeddingCache.get_sides and embed_sides: several lists embedded together, shard by shard."""

import numpy as np
import pytest

from g2e.embedding_cache import EmbeddingCache, embed_sides


def vectors(items):
    return np.asarray([[float(x), 1.0] for x in items], np.float32)


def test_missing_shards_of_every_side_are_one_call_per_round(tmp_path):
    """Shard k of the queries and of the candidates go to the embedder in one call; each round's
    shards are stored before the next round runs, so a failure keeps them; a second run
    embeds nothing and returns the same."""
    sides = {"queries": list(range(5)), "candidates": list(range(100, 108))}
    keys = {name: [f"{name}-{i}" for i in items] for name, items in sides.items()}
    calls = []

    def embed(items, label):
        calls.append((label, list(items)))
        if len(calls) == 3:
            raise RuntimeError("preempted")
        return vectors(items)

    cache = EmbeddingCache(tmp_path, "model-a", shard_size=3)
    with pytest.raises(RuntimeError):
        embed_sides(embed, sides, keys, cache, desc="Subset")
    assert calls == [
        ("Subset queries+candidates", [0, 1, 2, 100, 101, 102]),
        ("Subset queries+candidates", [3, 4, 103, 104, 105]),
        ("Subset candidates", [106, 107]),
    ]
    calls.clear()
    again = embed_sides(embed, sides, keys, cache, desc="Subset")
    assert calls == [("Subset candidates", [106, 107])]  # only the shard the failure lost
    for name, items in sides.items():
        np.testing.assert_array_equal(again[name], vectors(items))
    calls.clear()
    assert all(
        np.array_equal(embed_sides(embed, sides, keys, cache, desc="S")[n], vectors(sides[n]))
        for n in sides
    )
    assert calls == []


def test_without_a_cache_everything_is_one_call():
    calls = []

    def embed(items, label):
        calls.append(label)
        return vectors(items)

    out = embed_sides(embed, {"a": [1, 2], "b": [3]}, {"a": [], "b": []}, None, desc="T")
    assert calls == ["T a+b"]
    np.testing.assert_array_equal(out["b"], vectors([3]))
