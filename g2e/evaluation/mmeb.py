"""MMEB evaluation: precision@1 per subset, meta-task / IND / OOD / overall aggregates.

For each subset every unique query and every unique candidate (deduplicated by text + image:
candidate lists repeat across rows) is embedded once through an injected
`embed_fn(items) -> [N, D] float32`. A row is scored by cosine between its query and each of
its candidates; the first candidate is the positive (SPEC §4).

Precision@1 and ties: a row is correct iff `argmax(scores) == 0`, with argmax taking the first
maximum — i.e. the positive wins ties. This is what the release (and VLM2Vec) compute with
`np.argmax`. Candidates of a row that are the positive itself (same text + image) share its
score exactly, so a repeated positive never beats itself.

Outputs in `out_dir`: results.json, results.md (the leaderboard's layout plus a per-subset
table), results.png (one bar per subset). Embeddings are cached per subset under
`out_dir/cache/<subset>/` as queries.npy, candidates.npy and index.json (keys + the caller's
model/prompt fingerprint; no pickle). index.json is written last, so a subset counts as cached
only once it finished; an interrupted evaluation resumes at the first unfinished subset. Keys
hold the images' absolute paths (or, read from the TFDS copy, a sha1 of their bytes), so moving
the image root re-embeds. Multi-host: every host calls evaluate_mmeb (embed_fn is collective),
only process 0 writes (`write_outputs`), and out_dir must be one directory all hosts see (NFS,
gs://), so that all take the same cache decisions.
"""

from __future__ import annotations

import io
import json
import logging
import math
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tqdm
from etils import epath

from g2e.data import mmeb
from g2e.data.images import image_key
from g2e.data import rows as rows_lib
from g2e.data import subsets as subset_registry
from g2e.data.errors import BadInputReport
from g2e.data.preprocess import EmbedItem

META_TASKS = ("Classification", "VQA", "Retrieval", "Grounding")
SPLITS = ("IND", "OOD")
CACHE_FORMAT = 1
_ROW_BLOCK = 64  # rows scored per matmul in precision_at_1

EmbedFn = Callable[[Sequence[EmbedItem]], np.ndarray]
Key = tuple[str, str]  # (text, image key)


def embed_items(embed_fn: EmbedFn, items: Sequence[EmbedItem], *, batch_size: int, desc: str,
                progress: bool = True, allow_skipped: bool = False) -> np.ndarray:
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
    order = sorted(range(len(items)),
                   key=lambda i: (items[i].image is not None, len(items[i].text), i))
    chunks = []
    with tqdm.tqdm(total=len(items), desc=desc, unit="ex", disable=not progress,
                   dynamic_ncols=True) as bar:
        for start in range(0, len(items), batch_size):
            chunk = [items[i] for i in order[start:start + batch_size]]
            embeddings = np.asarray(embed_fn(chunk), dtype=np.float32)
            where = f"{desc}, items {order[start:start + batch_size]}"
            if embeddings.ndim != 2 or embeddings.shape[0] != len(chunk):
                raise ValueError(f"{where}: embed_fn returned shape {embeddings.shape} for "
                                 f"{len(chunk)} items; it must return [N, D]")
            finite = np.isfinite(embeddings)
            skipped = np.all(np.isnan(embeddings), axis=1) if allow_skipped else False
            if not np.all(finite.all(axis=1) | skipped):
                raise ValueError(f"{where}: embed_fn returned non-finite values; check the "
                                 f"model's dtype and these inputs")
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


def precision_at_1(query_embeddings: np.ndarray, candidate_embeddings: np.ndarray,
                   row_query: Sequence[int],
                   row_candidates: Sequence[Sequence[int]]) -> np.ndarray:
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
        block_rows = [np.asarray(c, dtype=np.int64)
                      for c in row_candidates[block:block + _ROW_BLOCK]]
        for offset, ids in enumerate(block_rows):
            if ids.size == 0:
                raise ValueError(f"row {block + offset} has no candidates; MMEB rows list the "
                                 f"positive first")
        # One matmul per block of rows against the candidates the block uses: a per-row
        # gather-and-dot is ~10x slower, a full [rows, C] score matrix can be gigabytes.
        used = np.unique(np.concatenate(block_rows))
        block_scores = (queries[np.asarray(row_query[block:block + _ROW_BLOCK])]
                        @ candidates[used].T)
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
    for task in META_TASKS:
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


def _dedupe(keys: Sequence[Key]) -> tuple[list[Key], list[int]]:
    """Unique keys in first-seen order, and each input's index into them."""
    position: dict[Key, int] = {}
    indices = [position.setdefault(key, len(position)) for key in keys]
    return list(position), indices


def _load_cache(cache_dir: epath.Path, fingerprint: str, query_keys: list[Key],
                candidate_keys: list[Key]) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached (queries, candidates) if they belong to these keys and this fingerprint."""
    index_path = cache_dir / "index.json"
    if not index_path.exists():
        return None
    try:
        index = json.loads(index_path.read_text())
        if (index.get("format") != CACHE_FORMAT or index.get("fingerprint") != fingerprint
                or [tuple(k) for k in index["query_keys"]] != query_keys
                or [tuple(k) for k in index["candidate_keys"]] != candidate_keys):
            logging.info("cache %s is for another model, prompt or data; re-embedding",
                         cache_dir)
            return None
        with (cache_dir / "queries.npy").open("rb") as f:
            queries = np.load(f, allow_pickle=False)
        with (cache_dir / "candidates.npy").open("rb") as f:
            candidates = np.load(f, allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError) as error:
        logging.warning("cache %s is unreadable (%s); re-embedding", cache_dir, error)
        return None
    if (queries.shape[0] != len(query_keys) or candidates.shape[0] != len(candidate_keys)
            or queries.ndim != 2 or candidates.shape[1:] != queries.shape[1:]):
        logging.warning("cache %s holds arrays of the wrong shape; re-embedding", cache_dir)
        return None
    return queries, candidates


def _write_atomic(path: epath.Path, data: bytes) -> None:
    """Writes through a temporary file and a rename, so `path` is either whole or absent."""
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _save_cache(cache_dir: epath.Path, fingerprint: str, subset: str, query_keys: list[Key],
                candidate_keys: list[Key], queries: np.ndarray,
                candidates: np.ndarray) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    index_path = cache_dir / "index.json"
    # index.json is the commit marker: drop a stale one first so it never vouches for arrays
    # written after it, then write it last.
    if index_path.exists():
        index_path.unlink()
    _write_atomic(cache_dir / "queries.npy", _npy_bytes(queries))
    _write_atomic(cache_dir / "candidates.npy", _npy_bytes(candidates))
    index = {"format": CACHE_FORMAT, "subset": subset, "fingerprint": fingerprint,
             "dim": int(queries.shape[1]),
             "query_keys": [list(k) for k in query_keys],
             "candidate_keys": [list(k) for k in candidate_keys]}
    _write_atomic(index_path, json.dumps(index).encode())


def evaluate_subset(embed_fn: EmbedFn, rows: Sequence[mmeb.EvalRow], subset: str, *,
                    batch_size: int, cache_dir: epath.Path | None = None,
                    fingerprint: str = "", progress: bool = True, write_cache: bool = True,
                    on_bad_input: str = "error") -> dict[str, Any]:
    """Embeds one subset's unique queries and candidates (or reads them from the cache), scores.

    Args:
        embed_fn: items -> float32 [N, D] embeddings, in input order.
        rows: the subset's eval rows.
        subset: the subset's name (goes into EmbedItem.subset: prompts depend on it).
        batch_size: items per embed_fn call.
        cache_dir: where this subset's cache lives; None disables caching.
        fingerprint: names the model + prompt; a cache with another fingerprint is not reused.
        write_cache: False on hosts that must not write (multi-host: only process 0 writes).
        on_bad_input: under 'skip', an item embed_fn skipped (an all-NaN row: e.g. an image
            that does not decode) drops every row whose query or candidate it is.
    Returns:
        {"precision_at_1": percent over the rows scored, "num_queries": rows scored,
        "num_correct": int, "num_unique_queries": int, "num_unique_candidates": int,
        "num_skipped_rows": rows dropped for a skipped item}; the same whether the embeddings
        came from the cache or not.
    Raises:
        ValueError: no rows (or none left), a row without candidates, a bad embed_fn output.
    """
    if not rows:
        raise ValueError(f"subset {subset}: no eval rows; drop it from data.eval_subsets or "
                         f"fix its files")
    # One pass over the rows: from a TFDS copy each pass reads (and each key hashes) the
    # images again. Per key its image and first row; per row its number of candidates.
    sources: dict[Key, tuple[Any, int]] = {}
    row_keys = []
    flat_keys = []
    row_lengths = []
    for row_number, r in enumerate(rows):
        if not r.tgt_texts or len(r.tgt_texts) != len(r.tgt_images):
            raise ValueError(f"subset {subset}, row {row_number}: needs a non-empty candidate "
                             f"list with one image entry per text")
        row_lengths.append(len(r.tgt_texts))
        key = (r.qry_text, image_key(r.qry_image))
        sources.setdefault(key, (r.qry_image, r.index))
        row_keys.append(key)
        for text, image in zip(r.tgt_texts, r.tgt_images):
            key = (text, image_key(image))
            sources.setdefault(key, (image, r.index))
            flat_keys.append(key)
    query_keys, row_query = _dedupe(row_keys)
    candidate_keys, flat_candidates = _dedupe(flat_keys)
    row_candidates, start = [], 0
    for length in row_lengths:
        row_candidates.append(flat_candidates[start:start + length])
        start += length

    cached = None
    if cache_dir is not None:
        cached = _load_cache(cache_dir, fingerprint, query_keys, candidate_keys)
    if cached is not None:
        logging.info("subset %s: reusing the embeddings cached in %s", subset, cache_dir)
        queries, candidates = cached
    else:
        query_items = [EmbedItem(text=key[0], image=sources[key][0], role="query",
                                 subset=subset, row=sources[key][1]) for key in query_keys]
        candidate_items = [EmbedItem(text=key[0], image=sources[key][0], role="candidate",
                                     subset=subset, row=sources[key][1])
                           for key in candidate_keys]
        allow_skipped = on_bad_input == "skip"
        queries = embed_items(embed_fn, query_items, batch_size=batch_size,
                              desc=f"{subset} queries", progress=progress,
                              allow_skipped=allow_skipped)
        candidates = embed_items(embed_fn, candidate_items, batch_size=batch_size,
                                 desc=f"{subset} candidates", progress=progress,
                                 allow_skipped=allow_skipped)
        if queries.shape[1] != candidates.shape[1]:
            raise ValueError(f"subset {subset}: embed_fn gave queries width {queries.shape[1]} "
                             f"but candidates width {candidates.shape[1]}")
        if cache_dir is not None and write_cache:
            _save_cache(cache_dir, fingerprint, subset, query_keys, candidate_keys, queries,
                        candidates)

    # NaN rows only get here under 'skip' (cached ones included: they were embedded so).
    good_query = ~np.isnan(queries).any(axis=1)
    good_candidate = ~np.isnan(candidates).any(axis=1)
    keep = [good_query[q] and bool(good_candidate[c].all())
            for q, c in zip(row_query, row_candidates)]
    if not any(keep):
        raise ValueError(f"subset {subset}: every row uses an input embed_fn skipped as bad")
    correct = precision_at_1(queries, candidates,
                             [q for q, k in zip(row_query, keep) if k],
                             [c for c, k in zip(row_candidates, keep) if k])
    if not all(keep):
        logging.warning("subset %s: %d rows left out: they use inputs skipped as bad", subset,
                        len(keep) - sum(keep))
    return {
        "precision_at_1": 100.0 * float(correct.mean()),
        "num_queries": int(sum(keep)),
        "num_correct": int(correct.sum()),
        "num_unique_queries": len(query_keys),
        "num_unique_candidates": len(candidate_keys),
        "num_skipped_rows": len(keep) - int(sum(keep)),
    }


# ---------------------------------------------------------------------------------------------
# The whole benchmark and its reports.

# The subset table spells meta-tasks in lower case; reports use the leaderboard's names.
_META_TASK_NAMES = {"classification": "Classification", "vqa": "VQA", "retrieval": "Retrieval",
                    "grounding": "Grounding"}


def _subset_list(subsets: str | Sequence[str] | None, data: Any) -> list[str]:
    if isinstance(subsets, str):
        subsets = [s.strip() for s in subsets.split(",") if s.strip()]
    if not subsets:
        subsets = rows_lib.list_eval_subsets(data)
        if not subsets:
            raise FileNotFoundError(
                f"{rows_lib.manifest_dir(data, 'eval')}: no MMEB-eval subsets found; point "
                "data.eval_dir at MMEB-eval in the hub's layout (or data.tfds_dir at its "
                "prepared copy, with data.format=tfds)")
    return list(subsets)


def _leaderboard_order(names: Sequence[str], manifest_dir: str) -> list[str]:
    """Meta-task order of the leaderboard, IND before OOD, then the subset table's order."""
    table = list(subset_registry.known_subsets(manifest_dir))

    def rank(name: str):
        info = subset_registry.subset_info(name, manifest_dir)
        canonical = subset_registry.canonical_name(name)
        position = table.index(canonical) if canonical in table else len(table)
        return (subset_registry.META_TASKS.index(info.meta_task), SPLITS.index(info.group),
                position, name)

    return sorted(names, key=rank)


def evaluate_mmeb(embed_fn: EmbedFn, *, out_dir: str, eval_dir: str = "", image_root: str = "",
                  data: Any = None,
                  subsets: str | Sequence[str] | None = None, on_bad_input: str = "error",
                  batch_size: int = 16, fingerprint: str = "", model_name: str = "g2e",
                  progress: bool = True, write_outputs: bool = True) -> dict[str, Any]:
    """Zero-shot / fine-tuned MMEB evaluation of one embedder; writes its reports.

    Args:
        embed_fn: items -> float32 [N, D] embeddings in input order (EmbedItem: text, image,
            role 'query'|'candidate', subset); the prompt is its business.
        out_dir: gets results.json, results.md, results.png and cache/<subset>/.
        eval_dir: MMEB-eval (or a mini-MMEB's eval part) in the hub's layout.
        image_root: the directory the rows' image paths are relative to.
        data: instead of eval_dir / image_root, the config's data section: the rows come
            from the source its `format` names (parquet, or the TFDS copy in `tfds_dir`;
            see g2e.data.rows). The results are the same for both copies of one data set.
        subsets: names or a comma-separated string; None / empty: every subset present.
        on_bad_input: 'error' or 'skip' for rows the reader cannot use (missing image files,
            malformed candidate lists) and rows using an item embed_fn skipped (a NaN row);
            skipped rows are counted per subset, and a subset with no usable row is listed
            under "skipped_subsets" and left out of the means.
        batch_size: items per embed_fn call.
        fingerprint: names the model + prompt (e.g. checkpoint path, adapter, prompt flags);
            cached embeddings with another fingerprint are recomputed, never reused.
        model_name: the Model column of results.md.
        progress: show progress bars.
        write_outputs: False on hosts other than process 0 (they embed but write nothing).
    Returns:
        The content of results.json: {"subsets": {name: {"precision_at_1", "meta_task",
        "split", "num_queries", "num_correct", "num_unique_queries", "num_unique_candidates",
        "num_skipped_rows"}}, "meta_tasks": {task: mean}, "IND", "OOD", "overall"}, plus
        "skipped_subsets": {name: reason} when some were skipped; scores in percent, means
        as in `aggregate`. Nothing in it depends on timing or on the cache.
    Raises:
        FileNotFoundError: no subsets in eval_dir. UnknownSubsetError: a subset the table and
        manifest do not know. ValueError: empty subsets, bad embeddings.
    """
    if data is None:
        if not eval_dir:
            raise ValueError("evaluate_mmeb needs eval_dir (the hub's layout) or data (the "
                             "config's data section)")
        data = types.SimpleNamespace(format="parquet", eval_dir=eval_dir,
                                     eval_image_root=image_root, tfds_dir="")
    manifest_dir = rows_lib.manifest_dir(data, "eval")
    results, skipped_subsets = {}, {}
    names = []
    for name in _subset_list(subsets, data):
        try:
            subset_registry.subset_info(name, manifest_dir)
        except subset_registry.UnknownSubsetError as error:
            if on_bad_input != "skip":
                raise
            skipped_subsets[name] = str(error)
            continue
        names.append(name)
    names = _leaderboard_order(names, manifest_dir)
    out = epath.Path(out_dir)
    if write_outputs:
        out.mkdir(parents=True, exist_ok=True)
    for number, name in enumerate(names, 1):
        info = subset_registry.subset_info(name, manifest_dir)
        logging.info("MMEB subset %d/%d: %s", number, len(names), name)
        report = BadInputReport(on_bad_input)
        rows = rows_lib.eval_rows(data, name, report)
        if report.total:
            logging.warning("subset %s: %s", name, report.summary())
        if not rows and report.total:
            # Under 'skip' an unusable subset is reported and left out of every mean.
            skipped_subsets[name] = report.examples[0] if report.examples else "no usable rows"
            logging.warning("subset %s: no usable rows; left out of the results", name)
            continue
        scores = evaluate_subset(embed_fn, rows, name, batch_size=batch_size,
                                 cache_dir=out / "cache" / name, fingerprint=fingerprint,
                                 progress=progress, write_cache=write_outputs,
                                 on_bad_input=on_bad_input)
        scores["num_skipped_rows"] += report.total
        results[name] = {"precision_at_1": scores.pop("precision_at_1"),
                         "meta_task": _META_TASK_NAMES[info.meta_task], "split": info.group,
                         **scores}
        logging.info("%s: precision@1 %.2f over %d queries", name,
                     results[name]["precision_at_1"], results[name]["num_queries"])
    summary = aggregate(results)
    if skipped_subsets:
        summary["skipped_subsets"] = skipped_subsets
    if write_outputs:
        _write_atomic(out / "results.json", json.dumps(summary, indent=2).encode())
        _write_atomic(out / "results.md", results_markdown(summary, model_name).encode())
        _write_atomic(out / "results.png", results_chart(summary, model_name))
    return summary


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def results_markdown(summary: dict[str, Any], model_name: str = "g2e") -> str:
    """results.json's content as Markdown: the leaderboard row, then one row per subset.

    Leaderboard columns: Model | Classification | VQA | Retrieval | Grounding | IND | OOD |
    Overall; a group with no subset evaluated shows '-'.
    """
    tasks = [_META_TASK_NAMES[t] for t in subset_registry.META_TASKS]
    counts = {t: sum(r["meta_task"] == t for r in summary["subsets"].values()) for t in tasks}
    counts.update({s: sum(r["split"] == s for r in summary["subsets"].values()) for s in SPLITS})
    header = ["Model", *tasks, *SPLITS, "Overall"]
    row = [model_name, *(_percent(summary["meta_tasks"].get(t)) for t in tasks),
           *(_percent(summary[s]) for s in SPLITS), _percent(summary["overall"])]
    number = ["# subsets", *(str(counts[t]) for t in tasks), *(str(counts[s]) for s in SPLITS),
              str(len(summary["subsets"]))]
    lines = [f"# MMEB precision@1 (%): {model_name}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             "| " + " | ".join(number) + " |", "| " + " | ".join(row) + " |", "",
             "| Subset | Meta-task | Split | Queries | Precision@1 |", "|---|---|---|---|---|"]
    for name, r in summary["subsets"].items():
        lines.append(f"| {name} | {r['meta_task']} | {r['split']} | {r['num_queries']} | "
                     f"{_percent(r['precision_at_1'])} |")
    return "\n".join(lines) + "\n"


def results_chart(summary: dict[str, Any], model_name: str = "g2e") -> bytes:
    """A PNG bar chart: one bar per subset, coloured by meta-task, OOD hatched, overall dashed."""
    # The object API (no pyplot) keeps no global figure state and needs no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = list(summary["subsets"])
    results = [summary["subsets"][n] for n in names]
    colours = dict(zip(META_TASKS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    figure = Figure(figsize=(max(7.0, 0.4 * len(names) + 3.5), 4.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    bars = axes.bar(range(len(names)), [r["precision_at_1"] for r in results],
                    color=[colours[r["meta_task"]] for r in results], edgecolor="white")
    for bar, result in zip(bars, results):
        if result["split"] == "OOD":
            bar.set_hatch("//")
    axes.bar_label(bars, fmt="%.1f", fontsize=7)
    axes.set_xticks(range(len(names)), names, rotation=75, ha="right", fontsize=8)
    axes.set_ylim(0, 105)
    axes.set_ylabel("precision@1 (%)")
    handles = [Patch(color=colours[t], label=t) for t in META_TASKS if t in summary["meta_tasks"]]
    handles.append(Patch(facecolor="lightgrey", edgecolor="white", hatch="//", label="OOD"))
    if summary["overall"] is not None:
        handles.append(axes.axhline(summary["overall"], color="black", linestyle="--",
                                    linewidth=1, label=f"overall {summary['overall']:.1f}"))
    axes.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.set_title(f"MMEB precision@1: {model_name}")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()
