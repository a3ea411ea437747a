"""MMEB evaluation: precision@1 per subset, meta-task / IND / OOD / overall aggregates.

For each subset every unique query and every unique candidate (deduplicated by text + image:
candidate lists repeat across rows) is embedded once through an injected
`embed_fn(items) -> [N, D] float32`. A row is scored by cosine between its query and each of
its candidates; the first candidate is the positive (docs/method.md §4).

Precision@1 and ties: a row is correct iff `argmax(scores) == 0`, with argmax taking the first
maximum — i.e. the positive wins ties. This is what the release (and VLM2Vec) compute with
`np.argmax`. Candidates of a row that are the positive itself (same text + image) share its
score exactly, so a repeated positive never beats itself.

results.json holds {"subsets": {name: {"precision_at_1", "meta_task", "split", "num_queries",
"num_correct", "num_unique_queries", "num_unique_candidates", "num_skipped_rows", "chance",
"correct" (one '0'/'1' per scored row)}}, "meta_tasks", "IND", "OOD", "overall"} in percent
(means as in `aggregate`), plus "skipped_subsets" and the embedder's per-subset "host" report
when present; nothing else in it depends on timing or on the cache.

Outputs in `out_dir`: results.json, results.md (the leaderboard's layout plus a per-subset
table), results.png (one bar per subset; g2e.evaluation.report formats them). Embeddings are
cached per subset under `out_dir/cache/<subset>/` (g2e.embedding_cache.EmbeddingCache: queries and
candidates, each tied to the caller's model/prompt fingerprint and to the keys), so an
interrupted evaluation resumes where it stopped. Keys hold the images' absolute paths (or, read
from the TFDS copy, a sha1 of their bytes), so moving the image root re-embeds. Multi-host:
every host calls evaluate_mmeb (embed_fn is collective), only process 0 writes
(`write_outputs`), and out_dir must be one directory all hosts see, so that all take the same
cache decisions.
"""

from __future__ import annotations

import logging
import pathlib
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tqdm

from g2e import embedding_cache
from g2e.data import mmeb
from g2e.data import rows as rows_lib
from g2e.data import subsets as subset_registry
from g2e.data.errors import BadInputReport
from g2e.data.images import image_key
from g2e.data.preprocess import EmbedItem
from g2e.embedding_cache import EmbeddingCache
from g2e.evaluation import report as report_lib

_ROW_BLOCK = 64  # rows scored per matmul in precision_at_1

EmbedFn = Callable[[Sequence[EmbedItem]], np.ndarray]
Key = tuple[str, str]  # (text, image key)


def embed_items(
    embed_fn: EmbedFn,
    items: Sequence[EmbedItem],
    *,
    batch_size: int,
    desc: str,
    progress: bool = True,
    allow_skipped: bool = False,
) -> np.ndarray:
    """Embeds `items` in chunks of `batch_size` behind a progress bar (examples/s).

    Items are sent text-only first, then with images, each group by text length, so that a
    chunk pads little (fixed-shape buckets); the result is in the input order.

    Args:
        allow_skipped: accept all-NaN rows, the Embedder's mark of an input it skipped under
            on_bad_input='skip' (callers then leave out what used them).
    Returns:
        float32 [len(items), D].
    Raises:
        ValueError: embed_fn returned the wrong shape or non-finite values (the message names
        `desc` and the items).
    """
    order = sorted(
        range(len(items)), key=lambda i: (items[i].image is not None, len(items[i].text), i)
    )
    chunks = []
    with tqdm.tqdm(
        total=len(items), desc=desc, unit="ex", disable=not progress, dynamic_ncols=True
    ) as bar:
        for start in range(0, len(items), batch_size):
            chunk = [items[i] for i in order[start : start + batch_size]]
            embeddings = np.asarray(embed_fn(chunk), dtype=np.float32)
            where = f"{desc}, items {order[start : start + batch_size]}"
            if embeddings.ndim != 2 or embeddings.shape[0] != len(chunk):
                raise ValueError(
                    f"{where}: embed_fn returned shape {embeddings.shape} for "
                    f"{len(chunk)} items; it must return [N, D]"
                )
            finite = np.isfinite(embeddings)
            skipped = np.all(np.isnan(embeddings), axis=1) if allow_skipped else False
            if not np.all(finite.all(axis=1) | skipped):
                raise ValueError(
                    f"{where}: embed_fn returned non-finite values; check the "
                    f"model's dtype and these inputs"
                )
            chunks.append(embeddings)
            bar.update(len(chunk))
    if not chunks:
        return np.zeros((0, 0), np.float32)
    result = np.empty((len(items), chunks[0].shape[1]), np.float32)
    result[order] = np.concatenate(chunks, axis=0)
    return result


def _normalize(embeddings: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=-1, keepdims=True)
    # A zero vector stays zero (cosine 0 with everything) instead of becoming NaN.
    return embeddings / np.maximum(norms, 1e-12)


def precision_at_1(
    query_embeddings: np.ndarray,
    candidate_embeddings: np.ndarray,
    row_query: Sequence[int],
    row_candidates: Sequence[Sequence[int]],
) -> np.ndarray:
    """Which rows rank their positive (first candidate) first, by cosine.

    Args:
        query_embeddings: [Q, D] unique query embeddings (need not be normalised).
        candidate_embeddings: [C, D] unique candidate embeddings.
        row_query: per row, the index of its query in `query_embeddings`.
        row_candidates: per row, the indices of its candidates in `candidate_embeddings`,
            positive first; rows may have different lengths.
    Returns:
        bool [rows]: True where the first maximum of the row's scores is the positive, so the
        positive wins ties; duplicates of the positive within a row get exactly its score.
    Raises:
        ValueError: a row without candidates.
    """
    queries = _normalize(np.asarray(query_embeddings, np.float32))
    candidates = _normalize(np.asarray(candidate_embeddings, np.float32))
    correct = np.zeros(len(row_query), dtype=bool)
    for block in range(0, len(row_query), _ROW_BLOCK):
        block_rows = [
            np.asarray(c, dtype=np.int64) for c in row_candidates[block : block + _ROW_BLOCK]
        ]
        for offset, ids in enumerate(block_rows):
            if ids.size == 0:
                raise ValueError(
                    f"row {block + offset} has no candidates; MMEB rows list the positive first"
                )
        # One matmul per block of rows against the candidates the block uses: a per-row
        # gather-and-dot is ~10x slower, a full [rows, C] score matrix can be gigabytes.
        used = np.unique(np.concatenate(block_rows))
        block_scores = (
            queries[np.asarray(row_query[block : block + _ROW_BLOCK])] @ candidates[used].T
        )
        for offset, ids in enumerate(block_rows):
            scores = block_scores[offset, np.searchsorted(used, ids)]
            # Copies of the positive in the row must tie with it exactly, whatever BLAS does.
            scores[ids == ids[0]] = scores[0]
            correct[block + offset] = int(np.argmax(scores)) == 0
    return correct


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def aggregate(subset_results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Builds results.json's content from per-subset results.

    Args:
        subset_results: {name: {"precision_at_1": percent, "meta_task": one of META_TASKS,
            "split": "IND" | "OOD", "num_queries": int, ...}}.
    Returns:
        {"subsets": subset_results, "meta_tasks": {task: mean}, "IND": mean, "OOD": mean,
        "overall": mean}: unweighted means over the subsets present (each subset counts once,
        as on the leaderboard). A meta-task with no subset present is left out; IND, OOD or
        overall with none present is None (null in JSON).
    """

    def mean_of(keep: Callable[[dict[str, Any]], bool]) -> float | None:
        return _mean([r["precision_at_1"] for r in subset_results.values() if keep(r)])

    meta_tasks = {}
    for task in report_lib.META_TASKS:
        value = mean_of(lambda r: r["meta_task"] == task)
        if value is not None:
            meta_tasks[task] = value
    return {
        "subsets": subset_results,
        "meta_tasks": meta_tasks,
        "IND": mean_of(lambda r: r["split"] == "IND"),
        "OOD": mean_of(lambda r: r["split"] == "OOD"),
        "overall": mean_of(lambda r: True),
    }


# ---------------------------------------------------------------------------------------------
# One subset: dedupe, embed (or read the cache), score.


class _SubsetItems:
    """A subset's unique queries and candidates (by text + image key), and the rows over them.

    One pass over the rows: from a TFDS copy each pass reads the records again.
    """

    def __init__(self, rows: Sequence[mmeb.EvalRow], subset: str):
        self.subset = subset
        self.sources: dict[Key, tuple[Any, int]] = {}  # key -> (its image, its first row)
        row_keys, flat_keys, lengths = [], [], []
        for row_number, r in enumerate(rows):
            if not r.tgt_texts or len(r.tgt_texts) != len(r.tgt_images):
                raise ValueError(
                    f"subset {subset}, row {row_number}: needs a non-empty "
                    "candidate list with one image entry per text"
                )
            lengths.append(len(r.tgt_texts))
            row_keys.append(self._key(r.qry_text, r.qry_image, r.index))
            flat_keys += [self._key(t, i, r.index) for t, i in zip(r.tgt_texts, r.tgt_images)]
        self.query_keys, self.row_query = rows_lib.index_keys(row_keys)
        self.candidate_keys, flat_candidates = rows_lib.index_keys(flat_keys)
        self.row_candidates = np.split(flat_candidates, np.cumsum(lengths)[:-1])

    def _key(self, text: str, image: Any, row: int) -> Key:
        key = (text, image_key(image))
        self.sources.setdefault(key, (image, row))
        return key

    def items(self, role: str) -> list[EmbedItem]:
        keys = self.query_keys if role == "query" else self.candidate_keys
        return [
            EmbedItem(
                text=text,
                image=self.sources[(text, image)][0],
                role=role,
                subset=self.subset,
                row=self.sources[(text, image)][1],
            )
            for text, image in keys
        ]


def evaluate_subset(
    embed_fn: EmbedFn,
    rows: Sequence[mmeb.EvalRow],
    subset: str,
    *,
    batch_size: int,
    cache: EmbeddingCache | None = None,
    progress: bool = True,
    on_bad_input: str = "error",
) -> dict[str, Any]:
    """Embeds one subset's unique queries and candidates (or reads them from the cache), scores.

    Args:
        embed_fn: items -> float32 [N, D] embeddings, in input order.
        rows: the subset's eval rows.
        subset: the subset's name (goes into EmbedItem.subset: prompts depend on it).
        batch_size: items per embed_fn call.
        cache: this subset's embedding cache (g2e.embedding_cache.EmbeddingCache: a directory, the
            model/prompt fingerprint, whether this host writes); None disables caching.
        on_bad_input: under 'skip', an item embed_fn skipped (an all-NaN row: e.g. an image
            that does not decode) drops every row whose query or candidate it is.
    Returns:
        {"precision_at_1": percent over the rows scored, "num_queries": rows scored,
        "num_correct": int, "num_unique_queries": int, "num_unique_candidates": int,
        "num_skipped_rows": rows dropped for a skipped item, "chance": percent a random
        ranking scores, "correct": one '0'/'1' per scored row}; the same whether the
        embeddings came from the cache or not.
    Raises:
        ValueError: no rows (or none left), a row without candidates, a bad embed_fn output.
    """
    if not rows:
        raise ValueError(
            f"subset {subset}: no eval rows; drop it from data.eval_subsets or fix its files"
        )
    items = _SubsetItems(rows, subset)
    queries, candidates = _subset_embeddings(
        embed_fn,
        items,
        subset,
        batch_size=batch_size,
        cache=cache,
        progress=progress,
        allow_skipped=on_bad_input == "skip",
    )
    if queries.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"subset {subset}: embed_fn gave queries width {queries.shape[1]} "
            f"but candidates width {candidates.shape[1]}"
        )
    return _score(subset, queries, candidates, items)


def _subset_embeddings(
    embed_fn: EmbedFn,
    items: _SubsetItems,
    subset: str,
    *,
    batch_size: int,
    cache: EmbeddingCache | None,
    progress: bool,
    allow_skipped: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(query, candidate) embeddings of the subset's unique items, from the cache where held;
    what is missing of both is embedded in one call (`embed_sides`)."""
    sides = {"queries": items.items("query"), "candidates": items.items("candidate")}
    keys = {"queries": items.query_keys, "candidates": items.candidate_keys}
    embedded = embed_sides(
        embed_fn,
        sides,
        keys,
        cache,
        batch_size=batch_size,
        desc=subset,
        progress=progress,
        allow_skipped=allow_skipped,
    )
    return embedded["queries"], embedded["candidates"]


def embed_sides(
    embed_fn: EmbedFn,
    sides: Mapping[str, Sequence[EmbedItem]],
    keys: Mapping[str, Sequence[Any]],
    cache: EmbeddingCache | None,
    *,
    batch_size: int,
    desc: str,
    progress: bool = True,
    allow_skipped: bool = False,
) -> dict[str, np.ndarray]:
    """{name: float32 [len(items), D]} of several lists of items (e.g. a subset's queries and
    candidates) by `embed_items`, what is missing of all of them in one call
    (g2e.embedding_cache.embed_sides)."""

    def embed(items: list[EmbedItem], label: str) -> np.ndarray:
        return embed_items(
            embed_fn,
            items,
            batch_size=batch_size,
            desc=label,
            progress=progress,
            allow_skipped=allow_skipped,
        )

    return embedding_cache.embed_sides(embed, sides, keys, cache, desc=desc)


def _score(
    subset: str, queries: np.ndarray, candidates: np.ndarray, items: _SubsetItems
) -> dict[str, Any]:
    """Precision@1 over the rows whose query and candidates all embedded (see evaluate_subset)."""
    # NaN rows only get here under 'skip' (cached ones included: they were embedded so).
    good_query = ~np.isnan(queries).any(axis=1)
    good_candidate = ~np.isnan(candidates).any(axis=1)
    keep = [
        good_query[q] and bool(good_candidate[c].all())
        for q, c in zip(items.row_query, items.row_candidates)
    ]
    if not any(keep):
        raise ValueError(f"subset {subset}: every row uses an input embed_fn skipped as bad")
    correct = precision_at_1(
        queries,
        candidates,
        [q for q, k in zip(items.row_query, keep) if k],
        [c for c, k in zip(items.row_candidates, keep) if k],
    )
    if not all(keep):
        logging.warning(
            "subset %s: %d rows left out: they use inputs skipped as bad",
            subset,
            len(keep) - sum(keep),
        )
    kept_candidates = [len(c) for c, k in zip(items.row_candidates, keep) if k]
    return {
        "precision_at_1": 100.0 * float(correct.mean()),
        "num_queries": int(sum(keep)),
        "num_correct": int(correct.sum()),
        "num_unique_queries": len(items.query_keys),
        "num_unique_candidates": len(items.candidate_keys),
        "num_skipped_rows": len(keep) - int(sum(keep)),
        # Expected precision@1 of a random ranking: 1 / candidates, over the rows scored.
        "chance": 100.0 * float(np.mean([1.0 / n for n in kept_candidates])),
        # Each scored row's outcome, '1' correct, in row order (for bootstrap intervals).
        "correct": "".join("1" if c else "0" for c in correct),
    }


# ---------------------------------------------------------------------------------------------
# The whole benchmark and its reports.


def _subset_list(subsets: str | Sequence[str] | None, data: Any) -> list[str]:
    if isinstance(subsets, str):
        subsets = [s.strip() for s in subsets.split(",") if s.strip()]
    if not subsets:
        subsets = rows_lib.list_eval_subsets(data)
        if not subsets:
            raise FileNotFoundError(
                f"{rows_lib.manifest_dir(data, 'eval')}: no MMEB-eval subsets found; point "
                "data.eval_dir at MMEB-eval in the hub's layout (or data.tfds_dir at its "
                "prepared copy, with data.format=tfds)"
            )
    return list(subsets)


def _leaderboard_order(names: Sequence[str], manifest_dir: str) -> list[str]:
    """Meta-task order of the leaderboard, IND before OOD, then the subset table's order."""
    table = list(subset_registry.known_subsets(manifest_dir))

    def rank(name: str):
        info = subset_registry.subset_info(name, manifest_dir)
        canonical = subset_registry.canonical_name(name)
        position = table.index(canonical) if canonical in table else len(table)
        return (
            subset_registry.META_TASKS.index(info.meta_task),
            report_lib.SPLITS.index(info.group),
            position,
            name,
        )

    return sorted(names, key=rank)


def evaluate_mmeb(
    embed_fn: EmbedFn,
    *,
    out_dir: str,
    eval_dir: str = "",
    image_root: str = "",
    data: Any = None,
    subsets: str | Sequence[str] | None = None,
    on_bad_input: str = "error",
    batch_size: int = 16,
    fingerprint: str = "",
    model_name: str = "g2e",
    progress: bool = True,
    write_outputs: bool = True,
    cache_options: dict[str, Any] | None = None,
    host: Any = None,
) -> dict[str, Any]:
    """MMEB evaluation of `embed_fn` (EmbedItems -> float32 [N, D]). The rows come from
    `eval_dir`/`image_root` (the hub's layout) or `data`, the config's data section (parquet
    or the TFDS copy: the same results). Writes results.json, .md, .png and cache/<subset>/
    (embeddings of this `fingerprint` only) under `out_dir`, on process 0 (`write_outputs`).
    `on_bad_input`: 'error', or 'skip' (counted per subset; a subset with no usable row goes
    under "skipped_subsets"). `host`: the runner whose per-subset host report goes under
    "host". Returns results.json's content (the module docstring lists its fields). Raises
    FileNotFoundError (no subsets in eval_dir), UnknownSubsetError (a subset neither the table
    nor the manifest knows), ValueError (empty subsets, bad embeddings)."""
    data = data if data is not None else _parquet_data(eval_dir, image_root)
    manifest_dir = rows_lib.manifest_dir(data, "eval")
    names, skipped_subsets = _known_subsets(_subset_list(subsets, data), manifest_dir, on_bad_input)
    out = pathlib.Path(out_dir)
    results, host_reports = {}, {}
    for number, name in enumerate(names, 1):
        logging.info("MMEB subset %d/%d: %s", number, len(names), name)
        before = host.host_snapshot() if host is not None else None
        result = _evaluate_named_subset(
            embed_fn,
            data,
            name,
            manifest_dir,
            cache=EmbeddingCache(
                out / "cache" / name, fingerprint, writable=write_outputs, **(cache_options or {})
            ),
            batch_size=batch_size,
            progress=progress,
            on_bad_input=on_bad_input,
        )
        if isinstance(result, str):
            skipped_subsets[name] = result
            continue
        results[name] = result
        if host is not None:
            host_reports[name] = host.host_report(before)
    summary = aggregate(results)
    summary.update(
        {"skipped_subsets": skipped_subsets} if skipped_subsets else {},
        **({"host": host_reports} if host is not None else {}),
    )
    if write_outputs:
        report_lib.write_results(out, summary, model_name)
    return summary


def _parquet_data(eval_dir: str, image_root: str) -> types.SimpleNamespace:
    """The data section `evaluate_mmeb` reads when given a hub-layout folder instead."""
    if not eval_dir:
        raise ValueError(
            "evaluate_mmeb needs eval_dir (the hub's layout) or data (the config's data section)"
        )
    return types.SimpleNamespace(
        format="parquet", eval_dir=eval_dir, eval_image_root=image_root, tfds_dir=""
    )


def _evaluate_named_subset(
    embed_fn: EmbedFn,
    data: Any,
    name: str,
    manifest_dir: str,
    *,
    cache: EmbeddingCache,
    batch_size: int,
    progress: bool,
    on_bad_input: str,
) -> dict[str, Any] | str:
    """One subset's entry of results.json, or why it was skipped (no usable row, 'skip')."""
    report = BadInputReport(on_bad_input)
    rows = rows_lib.eval_rows(data, name, report)
    if report.total:
        logging.warning("subset %s: %s", name, report.summary())
    if not rows and report.total:
        # Under 'skip' an unusable subset is reported and left out of every mean.
        logging.warning("subset %s: no usable rows; left out of the results", name)
        return report.examples[0] if report.examples else "no usable rows"
    scores = evaluate_subset(
        embed_fn,
        rows,
        name,
        batch_size=batch_size,
        cache=cache,
        progress=progress,
        on_bad_input=on_bad_input,
    )
    scores["num_skipped_rows"] += report.total
    info = subset_registry.subset_info(name, manifest_dir)
    result = {
        "precision_at_1": scores.pop("precision_at_1"),
        "meta_task": report_lib.META_TASK_NAMES[info.meta_task],
        "split": info.group,
        **scores,
    }
    logging.info(
        "%s: precision@1 %.2f over %d queries",
        name,
        result["precision_at_1"],
        result["num_queries"],
    )
    return result


def _known_subsets(
    names: Sequence[str], manifest_dir: str, on_bad_input: str
) -> tuple[list[str], dict[str, str]]:
    """(the subsets the table or manifest knows, in leaderboard order; {unknown: why}).

    Raises UnknownSubsetError for an unknown subset unless on_bad_input is 'skip'.
    """
    known, skipped = [], {}
    for name in names:
        try:
            subset_registry.subset_info(name, manifest_dir)
        except subset_registry.UnknownSubsetError as error:
            if on_bad_input != "skip":
                raise
            skipped[name] = str(error)
            continue
        known.append(name)
    return _leaderboard_order(known, manifest_dir), skipped
