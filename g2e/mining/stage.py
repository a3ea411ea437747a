"""The `mine` stage: SaHa clusters for every training subset, with the model's own judgement.

For each subset of MMEB-train: embed the unique queries (query prompt) and the unique positives
(candidate prompt) with the current model, then `g2e.mining.mine_clusters` with the speculative,
batched generative judge (when `mine.judge`). Writes `<workdir>/mine/<subset>.clusters.json`
(the versioned format of `g2e.mining.write_clusters`; row indices are positions in the subset's
rows as `g2e.data.rows.train_rows` returns them, the same for the parquet files and the TFDS
copy) and `<subset>.report.json`, plus `report.json` over all subsets.

The report (a contract): per subset, in each phase ("phase1", "phase2"), `judge_calls` (device
calls of the judge program) and `judge_pairs` (pairs the model judged in this run, speculative
ones included), with `judge_cached` (answers read back from the judge cache instead),
`judge_consulted` (pairs the walk's decisions rest on), `judge_dropped`, `judge_downscaled` and
`judge_unjudged` (over-length pairs, g2e.mining.judge); "judge" sums them over the phases;
"timing" splits the seconds into search, judge and walk bookkeeping.

Resuming: a killed stage loses at most the work in flight. The embeddings are kept in shards
as they are embedded (`<workdir>/mine/cache/<subset>/`, g2e.embedding_cache.EmbeddingCache), the
judge's answers as they are judged (`.../<subset>/judge/`, g2e.mining.judge_cache), and a
subset's cluster and report files are written atomically once it is mined; a subset with
both is kept. The walk is deterministic, so the rerun writes byte-identical cluster files
without judging a stored pair again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from g2e import atomic, distributed, embedding_cache, layout, mining
from g2e.data import mmeb
from g2e.data import rows as rows_lib
from g2e.data.errors import BadInputReport
from g2e.data.preprocess import positive_item, query_item
from g2e.embedding import Embedder
from g2e.embedding_cache import EmbeddingCache
from g2e.mining.judge import Judge
from g2e.mining.judge_cache import JudgeCache, RowPairJudge, judge_fingerprint
from g2e.pipeline import Pipeline


def run(pipeline: Pipeline) -> dict[str, Any]:
    """Runs the stage (see the module docstring); returns the summary for DONE.json."""
    config = pipeline.config
    embedder, judge, fingerprint = _embedder_and_judge(pipeline)
    reports = {}
    try:
        for subset in rows_lib.train_subsets(config.data):
            report = _kept_report(pipeline, subset)
            if report is None:
                report = _mine_and_write(pipeline, subset, embedder, judge, fingerprint)
            if report is not None:
                reports[subset] = report
    finally:
        embedder.close()
    if distributed.is_primary():
        atomic.write_json(
            layout.mining_report_file(pipeline.workdir), reports, indent=2, sort_keys=True
        )
    return {
        "subsets": len(reports),
        "clusters": sum(r["clusters"] for r in reports.values()),
        **{
            f"judge_{key}": sum(r["judge"].get(key, 0) for r in reports.values())
            for key in ("pairs", "calls", "dropped", "unjudged")
        },
        "padding": embedder.processor.padding_share(),
    }


def _embedder_and_judge(pipeline: Pipeline) -> tuple[Embedder, Judge | None, str]:
    """The base model's embedder, its judge (when mine.judge, else None), and the fingerprint
    of the model and prompt that names the embeddings cached."""
    config = pipeline.config
    model = pipeline.model(trained=False)
    processor = pipeline.processor()
    embedder = Embedder.for_stage(
        pipeline, model, processor, per_device=config.mine.batch_size, progress=True
    )
    judge = None
    if config.mine.judge:
        judge = Judge(
            model,
            pipeline.processor(),
            mesh=pipeline.mesh,
            rules=pipeline.rules,
            batch_size=config.mine.judge_batch_size,
            progress=False,
            pool=embedder.pool,  # one pool of workers for the stage
        )
    return embedder, judge, pipeline.fingerprint(pipeline.model_key, processor.prompt)


def _subset_files(pipeline: Pipeline, subset: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(clusters file, report file) of a mined subset."""
    clusters_file = layout.clusters_file(pipeline.workdir, subset)
    return clusters_file, clusters_file.parent / f"{subset}.report.json"


def _kept_report(pipeline: Pipeline, subset: str) -> dict[str, Any] | None:
    """The report of a subset an earlier run mined completely, else None."""
    clusters_file, report_file = _subset_files(pipeline, subset)
    if not (clusters_file.is_file() and report_file.is_file()):
        return None
    logging.info("mine %s: clusters exist, kept", subset)
    return json.loads(report_file.read_text())


def _mine_and_write(
    pipeline: Pipeline, subset: str, embedder: Embedder, judge: Judge | None, fingerprint: str
) -> dict[str, Any] | None:
    """Mines one subset and writes its clusters and report; None when it has no usable row."""
    config = pipeline.config
    bad = BadInputReport(config.data.on_bad_input)
    rows = rows_lib.train_rows(
        config.data, subset, bad, cache_dir=rows_lib.arrow_cache_dir(pipeline.workdir)
    )
    if not rows:
        logging.warning("mine %s: no usable rows (%s); skipped", subset, bad.summary())
        return None
    cache = EmbeddingCache(
        layout.mine_cache_dir(pipeline.workdir, subset),
        fingerprint,
        writable=distributed.is_primary(),
        **pipeline.embedding_cache_options(),
    )
    judge_cache = None
    if judge is not None:
        judge_cache = JudgeCache(
            layout.judge_cache_dir(pipeline.workdir, subset),
            judge_fingerprint(pipeline),
            writable=distributed.is_primary(),
        )
    before = embedder.host_snapshot()
    result = mine_subset(pipeline, subset, rows, embedder, cache, judge, judge_cache)
    report = {**result.report, "timing": result.timing, "skipped_rows": bad.total}
    # The subset's host work, embeddings and judge together (they share the stage's pool).
    report["host"] = embedder.host_report(before)
    if distributed.is_primary():
        params = dict(
            top_k=config.mine.top_k,
            pool_mult=config.mine.pool_mult,
            judge=bool(config.mine.judge),
            judge_threshold=config.mine.judge_threshold,
            split=config.data.train_split,
            model=fingerprint,
        )
        clusters_file, report_file = _subset_files(pipeline, subset)
        mining.write_clusters(
            str(clusters_file),
            result.clusters,
            result.phases,
            subset=subset,
            num_rows=len(rows),
            params=params,
        )
        atomic.write_json(report_file, report, indent=2, sort_keys=True)
    logging.info(
        "mine %s: %d rows -> %d clusters; %s",
        subset,
        len(rows),
        len(result.clusters),
        _headline(report),
    )
    return report


def mine_subset(
    pipeline: Pipeline,
    subset: str,
    rows: Sequence[mmeb.TrainRow],
    embedder: Embedder,
    cache: EmbeddingCache,
    judge: Judge | None,
    judge_cache: JudgeCache | None,
    *,
    sequential: bool = False,
) -> mining.MiningResult:
    """Embeds a subset's unique queries and positives (or reads them back), then mines it; with
    a judge, batched and speculative over `judge_cache` (`sequential`: one anchor round at a
    time, the tests' reference, no cache)."""
    config = pipeline.config
    query_keys, positive_keys = rows_lib.train_row_keys(rows)
    unique_queries, query_of_row = rows_lib.index_keys(query_keys)
    unique_positives, positive_of_row = rows_lib.index_keys(positive_keys)

    queries = [query_item(rows[int(r)]) for r in rows_lib.first_of_each(query_of_row)]
    positives = [positive_item(rows[int(r)]) for r in rows_lib.first_of_each(positive_of_row)]
    embedded = embedding_cache.embed_sides(
        lambda items, label: embedder(items, desc=label),
        {"queries": queries, "positives": positives},
        {"queries": unique_queries, "positives": unique_positives},
        cache,
        desc=subset,
    )
    row_embeddings = (embedded["queries"][query_of_row], embedded["positives"][positive_of_row])
    kept = _usable_rows(subset, *row_embeddings, skipped=embedder.processor.report.total)
    row_queries, row_positives = (embeddings[kept] for embeddings in row_embeddings)
    if kept.size < len(rows):  # only then: ArrowRows stay a memory map, read by index
        rows, query_keys, positive_keys = (
            [s[int(r)] for r in kept] for s in (rows, query_keys, positive_keys)
        )
    judges: dict[str, Any] = {}
    if judge is not None and sequential:
        judges["judge"] = sequential_judge(judge, rows)
    elif judge is not None:
        judges["pair_judge"] = RowPairJudge(
            judge, rows, query_keys, positive_keys, judge_cache, desc=f"{subset} judge"
        )
    result = mining.mine_clusters(
        query_keys,
        positive_keys,
        row_queries,
        row_positives,
        top_k=config.mine.top_k,
        pool_mult=config.mine.pool_mult,
        keep_retrieval_order=mining.keeps_retrieval_order(
            subset, rows_lib.manifest_dir(config.data, "train")
        ),
        judge_threshold=config.mine.judge_threshold,
        block_size=config.mine.block_size,
        mesh=pipeline.mesh,
        subset=subset,
        **judges,
    )
    if kept.size == query_of_row.size:
        return result
    clusters = [[int(kept[r]) for r in cluster] for cluster in result.clusters]
    return dataclasses.replace(result, clusters=clusters)


def _usable_rows(
    subset: str, row_queries: np.ndarray, row_positives: np.ndarray, *, skipped: int
) -> np.ndarray:
    """The row numbers to mine. Under on_bad_input=skip an
    item that failed (an image that does not decode) embeds as NaN: its rows are left out of
    mining (the processor's report counts them); clusters keep the subset's row numbers."""
    kept = np.flatnonzero(
        ~(np.isnan(row_queries).any(axis=1) | np.isnan(row_positives).any(axis=1))
    )
    if kept.size < len(row_queries) and not skipped:
        raise ValueError(
            f"mine {subset}: {len(row_queries) - kept.size} rows embed as NaN, but no input was "
            "skipped; the model's output is broken (check model_dir and model.dtype)"
        )
    if kept.size < len(row_queries):
        logging.warning(
            "mine %s: %d rows left out (unusable inputs)", subset, len(row_queries) - kept.size
        )
    return kept


def sequential_judge(judge: Judge, rows: Sequence[mmeb.TrainRow]) -> mining.JudgeFn:
    """The sequential judge: one call per round of one anchor (the tests' reference)."""

    def judge_fn(anchor_row: int, owner_rows: np.ndarray) -> np.ndarray:
        anchor = query_item(rows[anchor_row])
        return judge([(anchor, positive_item(rows[int(r)])) for r in owner_rows])

    return judge_fn


def _headline(report: dict) -> str:
    retrieval, judged = report.get("retrieval", {}), report["judge"]
    calls = max(judged.get("calls", 0), 1)
    return (
        f"phase 1/2 clusters {report['phase1']['clusters']}/{report['phase2']['clusters']}, "
        f"rows uncovered {report['rows_uncovered']}, judge dropped "
        f"{judged['dropped']} of {judged.get('consulted', 0)} consulted ({judged['pairs']} "
        f"judged in {judged.get('calls', 0)} device calls, "
        f"{judged['pairs'] / calls:.1f} per call; {judged.get('cached', 0)} cached, "
        f"{judged.get('unjudged', 0)} unjudged), zero-shot hit@1/5/10 "
        f"{retrieval.get('hit@1')}/{retrieval.get('hit@5')}/{retrieval.get('hit@10')}"
    )
