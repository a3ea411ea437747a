"""MMEB-V2 evaluation: hit@1 (image, video) and NDCG@5 (visual documents) per task, with
meta-task, modality and overall means (docs/method.md §7).

Per task (g2e.data.mmeb_v2 reads it) every unique query and every candidate of the pool is
embedded once through an injected `embed_fn(items) -> [N, D]`, L2-normalised, and each query
ranks candidates by cosine: its own list (`local` tasks) or the whole pool (`global` tasks,
with a streaming top-k over pool blocks, so a corpus of any size needs [Q, k] memory). Ties go
to the candidate listed first (its own list's order, or the pool's).

Metrics of a query with gains g (its relevant names; 1 unless the qrels grade them):
hit@1 = 1 if the top candidate is relevant; NDCG@5 (linear gain) = sum_{i<5} g(rank i) /
log2(i + 2) over the same sum of its gains sorted in descending order. A task's score is
the mean over its queries in percent; a meta-task's or modality's the unweighted mean of its
tasks'; overall the unweighted mean of every task evaluated (not of the modality means).

results.json: {"model", "tasks": {name: {"modality", "meta_task", "scope", "metric", "score",
"hit@1", "ndcg_linear@5", "num_queries", "num_candidates"}}, "meta_tasks": {name: mean},
"modalities": {name: mean}, "overall": mean}, plus "host" when the embedder reports it;
results.md shows the same as tables.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from g2e import atomic
from g2e.data import mmeb_v2
from g2e.data.images import image_key
from g2e.data.preprocess import EmbedItem
from g2e.embedding import unit_rows
from g2e.embedding_cache import EmbeddingCache
from g2e.evaluation.mmeb import embed_sides

EmbedFn = Callable[[Sequence[EmbedItem]], np.ndarray]
TOP_K = 5  # enough for hit@1 and NDCG@5
POOL_BLOCK = 4096  # pool rows scored per matmul in the streaming top-k


def top_k(queries: np.ndarray, pool: np.ndarray, k: int, block: int = POOL_BLOCK) -> np.ndarray:
    """int64 [Q, min(k, C)]: each query's best pool rows by dot product, best first, ties to the
    lower row; the pool is scored `block` rows at a time and only k per query are kept."""
    k = min(k, pool.shape[0])
    best_scores = np.full((queries.shape[0], 0), -np.inf, np.float32)
    best_rows = np.zeros((queries.shape[0], 0), np.int64)
    for start in range(0, pool.shape[0], block):
        scores = queries @ pool[start : start + block].T
        rows = np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)
        scores = np.concatenate([best_scores, scores], axis=1)
        rows = np.concatenate([best_rows, rows], axis=1)
        # Sort by (score descending, row ascending): lexsort's last key is the primary one.
        order = np.lexsort((rows, -scores), axis=1)[:, :k]
        best_scores = np.take_along_axis(scores, order, axis=1)
        best_rows = np.take_along_axis(rows, order, axis=1)
    return best_rows


def rank_own(query: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Indices of a query's own candidates, best first, ties to the one listed first."""
    scores = candidates @ query
    return np.lexsort((np.arange(len(scores)), -scores))[:k]


def query_metrics(ranked: Sequence[str], gains: dict[str, float]) -> tuple[float, float]:
    """(hit@1, NDCG@5 with linear gain) of one query's ranked names."""
    hit = 1.0 if ranked and gains.get(ranked[0], 0.0) > 0 else 0.0
    discounts = 1.0 / np.log2(np.arange(TOP_K) + 2)
    dcg = sum(gains.get(name, 0.0) * discounts[i] for i, name in enumerate(ranked[:TOP_K]))
    ideal = sorted(gains.values(), reverse=True)[:TOP_K]
    idcg = float(np.dot(ideal, discounts[: len(ideal)]))
    return hit, (dcg / idcg if idcg > 0 else 0.0)


def score_task(data: mmeb_v2.TaskData, queries: np.ndarray, pool: np.ndarray) -> dict[str, Any]:
    """A task's entry of results.json from its query and pool embeddings (pool order =
    `data.pool`'s)."""
    queries, pool = unit_rows(queries), unit_rows(pool)
    names = list(data.pool)
    if data.candidates is None:
        ranked = [[names[r] for r in rows] for rows in top_k(queries, pool, TOP_K)]
        sizes = [len(names)] * len(queries)
    else:
        row_of = {name: row for row, name in enumerate(names)}
        ranked, sizes = [], []
        for query, own in zip(queries, data.candidates):
            rows = np.array([row_of[name] for name in own])
            ranked.append([own[i] for i in rank_own(query, pool[rows], TOP_K)])
            sizes.append(len(own))
    hits, ndcgs = zip(*(query_metrics(r, g) for r, g in zip(ranked, data.relevance)))
    task = data.task
    result = {
        "modality": task.modality,
        "meta_task": task.meta_task,
        "scope": task.scope,
        "metric": mmeb_v2.METRIC[task.modality],
        "hit@1": 100.0 * float(np.mean(hits)),
        "ndcg_linear@5": 100.0 * float(np.mean(ndcgs)),
        "num_queries": len(data.queries),
        "num_candidates": len(names),
        "mean_candidates_per_query": float(np.mean(sizes)),
    }
    result["score"] = result[result["metric"]]
    return result


def aggregate(tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Meta-task and modality means of the task scores and the overall mean over tasks."""

    def mean(keep: Callable[[dict[str, Any]], bool]) -> float | None:
        scores = [r["score"] for r in tasks.values() if keep(r)]
        return float(np.mean(scores)) if scores else None

    meta = {m: mean(lambda r, m=m: r["meta_task"] == m) for m in mmeb_v2.META_TASKS}
    modalities = {m: mean(lambda r, m=m: r["modality"] == m) for m in mmeb_v2.MODALITIES}
    return {
        "tasks": tasks,
        "meta_tasks": {k: v for k, v in meta.items() if v is not None},
        "modalities": {k: v for k, v in modalities.items() if v is not None},
        "overall": mean(lambda r: True),
    }


def _key(item: mmeb_v2.Input) -> list[str]:
    return [item.text, image_key(item.image), item.video or ""]


def _embed_item(item: mmeb_v2.Input, role: str, task: str, row: int) -> EmbedItem:
    extra = {"video": item.video} if item.video else {}
    return EmbedItem(item.text, item.image, role, task, row=row, **extra)


def evaluate_task(
    embed_fn: EmbedFn,
    data: mmeb_v2.TaskData,
    *,
    batch_size: int,
    cache: EmbeddingCache | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Embeds a task's unique queries and its pool (or reads them from `cache`) and scores it."""
    name = data.task.name
    unique = list(dict.fromkeys(data.queries))
    sides = {
        "queries": [_embed_item(q, "query", name, i) for i, q in enumerate(unique)],
        "candidates": [
            _embed_item(c, "candidate", name, i) for i, c in enumerate(data.pool.values())
        ],
    }
    keys = {
        "queries": [_key(q) for q in unique],
        "candidates": [_key(c) for c in data.pool.values()],
    }
    embedded = embed_sides(
        embed_fn, sides, keys, cache, batch_size=batch_size, desc=name, progress=progress
    )
    where = {q: i for i, q in enumerate(unique)}
    queries = embedded["queries"][[where[q] for q in data.queries]]
    return score_task(data, queries, embedded["candidates"])


def evaluate_mmeb_v2(
    embed_fn: EmbedFn,
    *,
    data_dir: str,
    out_dir: str,
    tasks: str | Sequence[str] = "",
    batch_size: int = 16,
    fingerprint: str = "",
    model_name: str = "g2e",
    write_outputs: bool = True,
    cache_options: dict[str, Any] | None = None,
    host: Any = None,
    reader: mmeb_v2.Reader | None = None,
) -> dict[str, Any]:
    """MMEB-V2 evaluation of `embed_fn` over `tasks` (names or modalities; by default all, or
    those the folder's manifest lists)
    read from `data_dir` (g2e.data.mmeb_v2's layout). Writes results.json and results.md and
    caches embeddings per task under `out_dir` (on process 0: `write_outputs`). Returns
    results.json's content (module docstring)."""
    reader = reader or mmeb_v2.Reader(data_dir)
    out = pathlib.Path(out_dir)
    results, host_reports = {}, {}
    chosen = mmeb_v2.select_tasks(tasks, data_dir)
    for number, task in enumerate(chosen, 1):
        logging.info("MMEB-V2 task %d/%d: %s", number, len(chosen), task.name)
        before = host.host_snapshot() if host is not None else None
        cache = EmbeddingCache(
            out / "cache" / task.name, fingerprint, writable=write_outputs, **(cache_options or {})
        )
        results[task.name] = evaluate_task(
            embed_fn, reader.read(task), batch_size=batch_size, cache=cache
        )
        if host is not None:
            host_reports[task.name] = host.host_report(before)
        logging.info(
            "%s: %s %.2f", task.name, results[task.name]["metric"], results[task.name]["score"]
        )
    summary = {"model": model_name, **aggregate(results)}
    summary |= {"host": host_reports} if host is not None else {}
    if write_outputs:
        atomic.write_text(out / "results.json", json.dumps(summary, indent=2))
        atomic.write_text(out / "results.md", results_markdown(summary, model_name))
    return summary


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def results_markdown(summary: dict[str, Any], model_name: str = "g2e") -> str:
    """results.json as Markdown: modalities and overall, meta-tasks, then one row per task."""
    modalities = summary["modalities"]
    lines = [
        f"# MMEB-V2: {model_name}",
        "",
        "| Model | Image | Video | VisDoc | Overall | # tasks |",
        "|---|---|---|---|---|---|",
        f"| {model_name} | "
        + " | ".join(_cell(modalities.get(m)) for m in mmeb_v2.MODALITIES)
        + f" | {_cell(summary['overall'])} | {len(summary['tasks'])} |",
        "",
        "| Meta-task | Score |",
        "|---|---|",
        *(f"| {name} | {_cell(score)} |" for name, score in summary["meta_tasks"].items()),
        "",
        "| Task | Modality | Meta-task | Scope | Metric | Score | Queries | Candidates |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["tasks"].items():
        lines.append(
            f"| {name} | {r['modality']} | {r['meta_task']} | {r['scope']} | {r['metric']} | "
            f"{_cell(r['score'])} | {r['num_queries']} | {r['num_candidates']} |"
        )
    return "\n".join(lines) + "\n"
