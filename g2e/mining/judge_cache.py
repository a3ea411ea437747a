"""The judge's answers on disk, and the batched judge of the `mine` stage over a subset's rows.

`JudgeCache` keeps P(yes) and the status of every judged (query, positive) pair of one subset
under a directory: `index.json` (format, fingerprint of the model, judge prompt and image
settings) and `pairs-<n>.npz` shards (query hash, positive hash, p_yes, status), each written
atomically as soon as its pairs are judged. Pairs are named by content (a 64-bit hash of the
query key and of the positive key of g2e.data.rows.train_row_keys), so the answers hold for
any row carrying that query and positive, and survive a restart: a killed `mine` stage judges
none of them again. A cache of another fingerprint is emptied. The stage keeps a subset's
cache in `<subset>/judge`; the kill point `judge_shard_<subset>_<n>` (g2e.killpoints) follows
shard n.

`RowPairJudge` is the g2e.mining.walk.PairJudge of the stage: stored answers first, the other
pairs through the model's `Judge` in calls of a few device batches (so the host memory of a
call stays bounded), each call's answers stored before the next.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pathlib
from collections.abc import Hashable, Sequence

import numpy as np

from g2e import atomic, distributed, killpoints
from g2e.data import mmeb, prompts
from g2e.data import rows as rows_lib
from g2e.data.preprocess import positive_item, query_item
from g2e.mining.judge import DOWNSCALE_STEPS, Judge
from g2e.mining.walk import PairAnswers
from g2e.pipeline import Pipeline

CACHE_FORMAT = 1
# Device batches per Judge call: enough to pack the (length, patches) buckets well, few enough
# to bound the host memory of a call's encoded pairs (float32 patches: ~7 MB per 640x480 photo
# under `random`, so 4 x 128 pairs of two photos hold ~7 GB).
STEPS_PER_CALL = 4


def key_hashes(keys: Sequence[Hashable]) -> np.ndarray:
    """uint64 [N]: a 64-bit content hash of each (JSON-able) key, computed once per distinct key."""
    distinct, ids = rows_lib.index_keys(keys)
    hashes = np.fromiter(
        (
            int.from_bytes(hashlib.sha1(json.dumps(key).encode()).digest()[:8], "little")
            for key in distinct
        ),
        np.uint64,
        len(distinct),
    )
    return hashes[ids]


class JudgeCache:
    """P(yes) and status of judged pairs on disk, by (query hash, positive hash); see the module
    docstring. Every process reads it (a barrier follows); only `writable` ones write."""

    def __init__(self, directory: str | pathlib.Path, fingerprint: str, *, writable: bool = True):
        self.directory = pathlib.Path(directory)
        self.writable = writable
        self.answers: dict[tuple[int, int], tuple[float, int]] = {}
        index = {"format": CACHE_FORMAT, "fingerprint": fingerprint}
        try:
            valid = json.loads((self.directory / "index.json").read_text()) == index
        except (OSError, ValueError):
            valid = False
        shards = sorted(self.directory.glob("pairs-*.npz"))
        if valid:
            for path in shards:
                self._read(path)
        self._next = 1 + max((int(p.stem.split("-")[1]) for p in shards), default=-1)
        distributed.barrier(f"judge-cache-{self.directory}")
        if not valid and writable:
            if shards:
                logging.info(
                    "judge cache %s is for another model or setting; emptied", self.directory
                )
            for path in shards:
                path.unlink()
            atomic.write_json(self.directory / "index.json", index)
        if not valid:
            self._next = 0

    def __len__(self) -> int:
        return len(self.answers)

    def _read(self, path: pathlib.Path) -> None:
        try:
            with np.load(path, allow_pickle=False) as shard:
                columns = [
                    shard[name].tolist() for name in ("query", "positive", "p_yes", "status")
                ]
        except (OSError, ValueError, KeyError) as error:
            logging.warning(
                "judge cache shard %s is unreadable (%s); its pairs are judged again", path, error
            )
            return
        self.answers.update(zip(zip(columns[0], columns[1]), zip(columns[2], columns[3])))

    def lookup(
        self, query: np.ndarray, positive: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found bool [n], p_yes float32 [n], status int8 [n]) of the pairs (query[i],
        positive[i]); p_yes and status are 0 where not found."""
        found = np.zeros(query.size, bool)
        p_yes = np.zeros(query.size, np.float32)
        status = np.zeros(query.size, np.int8)
        for i, pair in enumerate(zip(query.tolist(), positive.tolist())):
            answer = self.answers.get(pair)
            if answer is not None:
                found[i], (p_yes[i], status[i]) = True, answer
        return found, p_yes, status

    def add(
        self, query: np.ndarray, positive: np.ndarray, p_yes: np.ndarray, status: np.ndarray
    ) -> None:
        """Keeps the answers of newly judged pairs, in memory and in a new shard."""
        columns = dict(
            query=np.asarray(query, np.uint64),
            positive=np.asarray(positive, np.uint64),
            p_yes=np.asarray(p_yes, np.float32),
            status=np.asarray(status, np.int8),
        )
        self.answers.update(
            zip(
                zip(columns["query"].tolist(), columns["positive"].tolist()),
                zip(columns["p_yes"].tolist(), columns["status"].tolist()),
            )
        )
        if self.writable:
            buffer = io.BytesIO()
            np.savez(buffer, **columns)
            atomic.write_bytes(self.directory / f"pairs-{self._next:06d}.npz", buffer.getvalue())
            # A test may kill the process here: this shard is whole, the next absent.
            killpoints.reached(f"judge_shard_{self.directory.parent.name}_{self._next}")
        self._next += 1


class RowPairJudge:
    """The stage's PairJudge: (anchor rows, owner rows) -> PairAnswers for the pair (anchor's
    query, owner's positive), from `cache` or judged by `judge` (see the module docstring)."""

    def __init__(
        self,
        judge: Judge,
        rows: Sequence[mmeb.TrainRow],
        query_keys: Sequence,
        positive_keys: Sequence,
        cache: JudgeCache,
        *,
        desc: str = "judge",
    ):
        self.judge, self.rows, self.cache, self.desc = judge, rows, cache, desc
        self.pairs_per_call = judge.pairs_per_call
        self.query_hash = key_hashes(query_keys)
        self.positive_hash = key_hashes(positive_keys)

    def __call__(self, anchor_rows: np.ndarray, owner_rows: np.ndarray) -> PairAnswers:
        query = self.query_hash[anchor_rows]
        positive = self.positive_hash[owner_rows]
        found, p_yes, status = self.cache.lookup(query, positive)
        todo = np.flatnonzero(~found)
        calls, per_call = 0, STEPS_PER_CALL * self.judge.pairs_per_call
        for start in range(0, todo.size, per_call):
            part = todo[start : start + per_call]
            pairs = [
                (query_item(self.rows[int(a)]), positive_item(self.rows[int(o)]))
                for a, o in zip(anchor_rows[part], owner_rows[part])
            ]
            result = self.judge.judge(pairs, desc=self.desc)
            p_yes[part], status[part] = result.p_yes, result.status
            calls += result.device_calls
            self.cache.add(query[part], positive[part], result.p_yes, result.status)
        return PairAnswers(p_yes, status, judged=int(todo.size), device_calls=calls)


def judge_fingerprint(pipeline: Pipeline) -> str:
    """Names what a judge answer depends on: the model (the base the mine stage judges with),
    the judge prompt, image settings. Read before any model is loaded (judge_quality)."""
    data = pipeline.config.data
    return pipeline.fingerprint(
        pipeline.model_paths(trained=False),
        "judge",
        prompts.JUDGE_SYSTEM_PROMPT,
        prompts.JUDGE_QUESTION,
        data.min_pixels,
        data.max_pixels,
        DOWNSCALE_STEPS,
    )
