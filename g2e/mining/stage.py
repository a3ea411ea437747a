"""The `mine` stage: SaHa clusters for every training subset, with the model's own judgement.

For each subset of MMEB-train: embed the unique queries (query prompt) and the unique positives
(candidate prompt) with the current model — cached per subset like evaluation embeddings, so an
interrupted stage resumes — then `g2e.mining.mine_clusters` with the generative judge (when
`mine.judge`). Writes `<workdir>/mine/<subset>.clusters.json` (the versioned format of
`g2e.mining.write_clusters`; row indices are positions in the subset's rows as
`g2e.data.rows.train_rows` returns them, the same for the parquet files and the TFDS copy) and
`<subset>.report.json`, plus `report.json` over all subsets.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import numpy as np

from g2e import distributed, mining
from g2e.data import mmeb
from g2e.data import rows as rows_lib
from g2e.data.errors import BadInputReport
from g2e.data.preprocess import EmbedItem
from g2e.embedding import Embedder
from g2e.data.images import image_key
from g2e.judge import Judge


def query_item(row: mmeb.TrainRow) -> EmbedItem:
    return EmbedItem(row.qry_text, row.qry_image, "query", row.subset, row.index)


def positive_item(row: mmeb.TrainRow) -> EmbedItem:
    return EmbedItem(row.pos_text, row.pos_image, "candidate", row.subset, row.index)


def _unique(keys: list) -> tuple[list, np.ndarray]:
    """(unique keys in first-appearance order, index of each key in that list)."""
    position: dict = {}
    inverse = np.array([position.setdefault(k, len(position)) for k in keys], np.int64)
    return list(position), inverse


def _row_keys(rows) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(query key, positive key) of each row: its text and its image's path, or a sha1 of the
    image bytes when the rows come from the TFDS copy (short keys; one pass over the rows)."""
    query_keys, positive_keys = [], []
    for r in rows:
        query_keys.append((r.qry_text, image_key(r.qry_image)))
        positive_keys.append((r.pos_text, image_key(r.pos_image)))
    return query_keys, positive_keys


def _first_rows(rows, keys: list) -> dict:
    """{key: the first of `rows` with that key} (each row read once, when its key is new)."""
    first: dict = {}
    for i, key in enumerate(keys):
        if key not in first:
            first[key] = rows[i]
    return first


def _cached_embeddings(cache: pathlib.Path, fingerprint: str, name: str, items: list,
                       embedder: Embedder) -> np.ndarray:
    """Embeds items once per (fingerprint, item count); later runs read `<name>.npy` back."""
    array_path, index_path = cache / f"{name}.npy", cache / f"{name}.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        if index == {"fingerprint": fingerprint, "count": len(items)}:
            return np.load(array_path)
    embeddings = embedder(items, desc=f"{cache.name} {name}")
    if distributed.is_primary():
        cache.mkdir(parents=True, exist_ok=True)
        np.save(array_path, embeddings)
        # The index is written last: its presence marks the array as complete.
        index_path.write_text(json.dumps({"fingerprint": fingerprint, "count": len(items)}))
    return embeddings


def _judge_fn(judge: Judge, rows: list[mmeb.TrainRow]):
    def judge_fn(anchor_row: int, owner_rows: np.ndarray) -> np.ndarray:
        anchor = query_item(rows[anchor_row])
        return judge([(anchor, positive_item(rows[int(r)])) for r in owner_rows])
    return judge_fn


def mine(pipeline) -> dict[str, Any]:
    """Runs the stage (see the module docstring); returns the summary for DONE.json."""
    from g2e.stages import train_subsets

    config = pipeline.config
    out = pipeline.workdir / "mine"
    model = pipeline.model(trained=False)
    processor = pipeline.processor()
    embedder = Embedder(model, processor, mesh=pipeline.mesh, rules=pipeline.rules,
                        batch_size=config.mine.batch_size)
    judge = None
    if config.mine.judge:
        judge = Judge(model, pipeline.processor(), mesh=pipeline.mesh, rules=pipeline.rules,
                      batch_size=config.mine.judge_batch_size, progress=False)
    fingerprint = pipeline.fingerprint(pipeline.model_key, processor.prompt)
    reports = {}
    for subset in train_subsets(config):
        clusters_file = out / f"{subset}.clusters.json"
        report_file = out / f"{subset}.report.json"
        if clusters_file.is_file() and report_file.is_file():
            reports[subset] = json.loads(report_file.read_text())
            logging.info("mine %s: clusters exist, kept", subset)
            continue
        bad = BadInputReport(config.data.on_bad_input)
        rows = rows_lib.train_rows(config.data, subset, bad)
        if not rows:
            logging.warning("mine %s: no usable rows (%s); skipped", subset, bad.summary())
            continue
        query_keys, positive_keys = _row_keys(rows)
        unique_queries, query_of_row = _unique(query_keys)
        unique_positives, positive_of_row = _unique(positive_keys)
        first_query = _first_rows(rows, query_keys)
        first_positive = _first_rows(rows, positive_keys)
        cache = out / "cache" / subset
        query_embeddings = _cached_embeddings(
            cache, fingerprint, "queries", [query_item(first_query[k]) for k in unique_queries],
            embedder)
        positive_embeddings = _cached_embeddings(
            cache, fingerprint, "positives",
            [positive_item(first_positive[k]) for k in unique_positives], embedder)
        if processor.report.total:
            # Skipped items embed as NaN; mining needs every row, so name the problem.
            raise ValueError(f"mine {subset}: {processor.report.summary()}; rows with unusable "
                             "inputs must be dropped before mining (fix or remove them)")
        result = mining.mine_clusters(
            query_keys, positive_keys, query_embeddings[query_of_row],
            positive_embeddings[positive_of_row], top_k=config.mine.top_k,
            pool_mult=config.mine.pool_mult,
            keep_retrieval_order=mining.keeps_retrieval_order(
                subset, rows_lib.manifest_dir(config.data, "train")),
            judge=_judge_fn(judge, rows) if judge is not None else None,
            judge_threshold=config.mine.judge_threshold, block_size=config.mine.block_size,
            mesh=pipeline.mesh, subset=subset)
        report = {**result.report, "timing": result.timing, "skipped_rows": bad.total}
        if distributed.is_primary():
            params = dict(top_k=config.mine.top_k, pool_mult=config.mine.pool_mult,
                          judge=bool(config.mine.judge),
                          judge_threshold=config.mine.judge_threshold, split=config.data.train_split,
                          model=fingerprint)
            mining.write_clusters(str(clusters_file), result.clusters, result.phases,
                                  subset=subset, num_rows=len(rows), params=params)
            report_file.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        reports[subset] = report
        logging.info("mine %s: %d rows -> %d clusters; %s", subset, len(rows),
                     len(result.clusters), _headline(report))
    if distributed.is_primary():
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(reports, indent=2, sort_keys=True) + "\n")
    return {"subsets": len(reports),
            "clusters": sum(r["clusters"] for r in reports.values()),
            "judge_dropped": sum(r["judge"]["dropped"] for r in reports.values())}


def _headline(report: dict) -> str:
    retrieval = report.get("retrieval", {})
    return (f"phase 1/2 clusters {report['phase1']['clusters']}/{report['phase2']['clusters']}, "
            f"rows uncovered {report['rows_uncovered']}, judge dropped "
            f"{report['judge']['dropped']} of {report['judge']['pairs']}, zero-shot hit@1/5/10 "
            f"{retrieval.get('hit@1')}/{retrieval.get('hit@5')}/{retrieval.get('hit@10')}")
