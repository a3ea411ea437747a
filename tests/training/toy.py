"""A toy embedder and data set for training tests: an MLP over feature vectors.

Queries and candidates are random features; a candidate is a fixed linear map of its query's
features plus noise, so contrastive training has something to learn. Row i's query and
positive are `QUERY[i]` and `CANDIDATE[i]`.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from g2e import configuration
from g2e.data.errors import BadInputReport

FEATURES, HIDDEN, DIM = 6, 16, 8


def data(num_rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(num_rows, FEATURES)).astype(np.float32)
    mix = rng.normal(size=(FEATURES, FEATURES)).astype(np.float32)
    candidates = queries @ mix + 0.1 * rng.normal(size=(num_rows, FEATURES)).astype(np.float32)
    return queries, candidates.astype(np.float32)


def params(seed: int = 0) -> tuple[dict, dict]:
    """(trainable, frozen) float32 parameters."""
    keys = jax.random.split(jax.random.key(seed), 3)
    trainable = {
        "w1": jax.random.normal(keys[0], (FEATURES, HIDDEN)) / np.sqrt(FEATURES),
        "w2": jax.random.normal(keys[1], (HIDDEN, DIM)) / np.sqrt(HIDDEN),
    }
    frozen = {"proj": jax.random.normal(keys[2], (FEATURES, FEATURES)) / np.sqrt(FEATURES)}
    return trainable, frozen


def embed_fn(trainable, frozen, batch, rng, dropout: float = 0.0):
    """L2-normalised [b, DIM] embeddings of batch['features'] [b, FEATURES]."""
    x = batch["features"] @ frozen["proj"]
    h = jnp.tanh(x @ trainable["w1"])
    if dropout:
        keep = jax.random.bernoulli(rng, 1.0 - dropout, h.shape)
        h = jnp.where(keep, h / (1.0 - dropout), 0.0)
    e = h @ trainable["w2"]
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


class Codec:
    """The toy's rows as host batches {'query': {...}, 'candidate': {...}, 'ids': row ids}
    (the four methods and `report` of g2e.training.batches.RowCodec); `delay` seconds of host
    work per row; its rows never fail, and a failure would stop training ('error')."""

    def __init__(self, queries: np.ndarray, candidates: np.ndarray, delay: float = 0.0):
        self.queries, self.candidates, self.delay = queries, candidates, delay
        self.report = BadInputReport("error")

    def encode(self, row: int):
        if self.delay:
            time.sleep(self.delay)
        return row

    def shape(self, batch):
        return [len(batch["ids"])]

    def collate(self, encoded):
        rows = np.asarray(encoded, np.int64)
        return {
            "query": {"features": self.queries[rows]},
            "candidate": {"features": self.candidates[rows]},
            "ids": rows.astype(np.int32),
        }

    def widen(self, batch, shape):
        return batch


def encode(queries: np.ndarray, candidates: np.ndarray) -> Codec:
    return Codec(queries, candidates)


def train_config(**overrides) -> ml_collections.ConfigDict:
    """The `train` block of configuration.base_config with the toy's settings."""
    cfg = configuration.base_config().train
    cfg.update(
        dict(
            steps=8,
            lr=3e-2,
            warmup_steps=2,
            weight_decay=0.0,
            grad_clip=1.0,
            global_batch=8,
            cluster_size=2,
            backprop="auto",
            query_chunk=0,
            candidate_chunk=0,
            temperature=0.05,
            checkpoint_every=2,
            keep_checkpoints=3,
            log_every=1,
        )
    )
    cfg.update(overrides)
    return cfg
