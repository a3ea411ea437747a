"""MMEB rows for the stages, from the hub's parquet layout or from the prepared TFDS copy.

`config.data.format` picks the source:
  'parquet' (default): `data.train_dir` / `data.eval_dir` hold the hub's parquet files and the
      image paths they name are read under `data.train_image_root` / `data.eval_image_root`
      (default: the data directory itself); rows carry absolute image paths (g2e.data.mmeb).
  'tfds': `data.tfds_dir` is the data_dir `python -m g2e.data.tfds_builders` wrote the
      array_record copy to (local or gs://); rows carry lazy references into the copy's
      image tables (images.ImageRef, key = the relative path the parquet named; see
      g2e.data.tfds_rows.RowSource), so no image folder is needed.
Both give the same TrainRow / EvalRow values up to the image (an absolute path vs. a reference
to that file's bytes), in the same order with the same `index`; images.image_key and
images.load_image take either. `data.train_split` picks the train split either way.

Subset meta-tasks (g2e.data.subsets.subset_info) are looked up next to the data the rows come
from (`manifest_dir`): train_dir / eval_dir, or tfds_dir, where `tfds_builders.prepare` copies
the source's `subsets.json` (a mini-MMEB's or a user's own data set; real MMEB needs none).

Training rows are capped per subset in one place, `train_rows` (`data.max_rows_per_subset`,
50k by default, VLM2Vec's convention; `data.row_sample_seed` picks the first rows or a seeded sample), so the mine
and train stages see the same rows and cluster indices refer to them.

Rows from TFDS are read lazily (a Sequence over the array_record files): every pass over the
rows reads their records again, but those hold no image bytes; an image's bytes are read
when it is loaded. Parquet training rows, given a `cache_dir`, are converted once into an Arrow
IPC file there (keyed by the source files' names, sizes and times, the split and the image
root) and read by index from its memory map (`ArrowRows`): a worker process that encodes rows
receives the file's path and row indices, never the rows, and a restart reads no parquet.
"""

import bisect
import hashlib
import json
import os
import pathlib
import zlib
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from g2e.data import images, mmeb
from g2e.data import subsets as subsets_lib
from g2e.data.errors import BadInput, BadInputReport

FORMATS = ("parquet", "tfds")


def _format(data: Any) -> str:
    fmt = data.get("format", "parquet") if hasattr(data, "get") else data.format
    if fmt not in FORMATS:
        raise ValueError(f"--config.data.format is {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "tfds" and not data.tfds_dir:
        raise ValueError(
            "--config.data.tfds_dir is empty; with data.format=tfds point it at the "
            "data_dir `python -m g2e.data.tfds_builders` wrote to"
        )
    return fmt


def manifest_dir(data: Any, kind: str) -> str:
    """The directory whose (or whose parent's) subsets.json declares the `kind` ('train' or
    'eval') subsets: tfds_dir for the TFDS copy, else train_dir / eval_dir."""
    if _format(data) == "tfds":
        return data.tfds_dir
    return data.train_dir if kind == "train" else data.eval_dir


def _tfds_rows(kind: str, data: Any, subset: str, split: str, report: BadInputReport) -> Sequence:
    """The prepared copy of `subset`/`split`, or [] after reporting why it cannot be read."""
    from g2e.data import tfds_rows  # TensorFlow Datasets only when this format is used.

    try:
        subsets_lib.subset_info(subset, data.tfds_dir)
    except subsets_lib.UnknownSubsetError as err:
        report.handle(BadInput("unknown subset", subset=subset, detail=str(err)))
        return []
    try:
        return tfds_rows.RowSource(kind, data.tfds_dir, subset, split)
    except (FileNotFoundError, KeyError) as err:
        report.handle(
            BadInput(
                "not in the TFDS copy",
                subset=subset,
                file=data.tfds_dir,
                detail=str(err).strip("'\""),
                hint="prepare it with `python -m g2e.data.tfds_builders` or drop "
                "it from the subset list",
            )
        )
        return []


def train_rows(
    data: Any,
    subset: str,
    report: BadInputReport,
    *,
    heldout: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Sequence[mmeb.TrainRow]:
    """The rows of one MMEB-train subset (split `data.train_split`) in the configured format.

    Args:
      data: the config's `data` section (format, tfds_dir, train_dir, train_image_root,
        train_split).
      subset: the subset's name, e.g. 'ImageNet_1K'.
      report: applies `data.on_bad_input` to an unknown, missing or unreadable subset or row
        (raising BadInput under 'error', counting under 'skip').
      heldout: the subset's held-out slice instead: its last `data.heldout_rows` rows, which
        mining and training never see (the train stage evaluates on them as it goes).
      cache_dir: parquet rows are read through an Arrow copy kept here (`arrow_train_rows`);
        None reads them into a list.

    Returns:
      The rows in source order ([] for a skipped subset): of at most `data.max_rows_per_subset`
      rows (`sample_rows`), all but the held-out slice, or that slice; images are absolute
      paths (parquet) or images.ImageRefs (tfds).

    Raises:
      tfds_rows.OutdatedCopyError: the TFDS copy of `subset` has an older layout
        (whatever on_bad_input says: it must be prepared again).
      ValueError: the held-out slice would leave the subset no training row.
    """
    if _format(data) == "tfds":
        rows = _tfds_rows("train", data, subset, data.train_split, report)
    elif cache_dir is not None:
        rows = arrow_train_rows(data, subset, report, cache_dir)
    else:
        rows = mmeb.read_train_subset(
            data.train_dir,
            subset,
            data.train_split,
            data.train_image_root or data.train_dir,
            report,
        )
    rows = sample_rows(
        rows, subset, _get(data, "max_rows_per_subset", 0), _get(data, "row_sample_seed", -1)
    )
    held = int(_get(data, "heldout_rows", 0))
    if not held or not len(rows):
        return [] if heldout else rows
    if held >= len(rows):
        raise ValueError(
            f"--config.data.heldout_rows={held} leaves no training row of subset "
            f"{subset} ({len(rows)} rows); lower it"
        )
    split = len(rows) - held
    return SampledRows(rows, range(split, len(rows)) if heldout else range(split))


def _get(data: Any, key: str, default: Any) -> Any:
    return data.get(key, default) if hasattr(data, "get") else getattr(data, key, default)


def sample_rows(rows: Sequence, subset: str, cap: int, seed: int = -1) -> Sequence:
    """At most `cap` of a subset's rows, in source order (all of them when cap is 0).

    seed -1 keeps the first `cap` rows (`split[:cap]`, VLM2Vec's way); a seed >= 0 keeps a
    uniform sample drawn with numpy's default_rng([seed, crc32(subset)]). Either is a pure
    function of (rows, subset, cap, seed).
    """
    if not cap or len(rows) <= cap:
        return rows
    if seed < 0:
        keep = range(cap)
    else:
        rng = np.random.default_rng([seed, zlib.crc32(subset.encode())])
        keep = np.sort(rng.choice(len(rows), size=cap, replace=False))
    return SampledRows(rows, keep)


class SampledRows(Sequence):
    """The rows of `rows` at positions `keep` (sorted; a range stays a range, so that it
    pickles small), read on access."""

    def __init__(self, rows: Sequence, keep: np.ndarray | range):
        self.rows = rows
        self.keep = keep if isinstance(keep, range) else np.asarray(keep, np.int64)

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.rows[int(self.keep[i])]


# The TrainRow fields, in order, as the Arrow copy's columns.
_TRAIN_FIELDS = (
    "subset",
    "index",
    "qry_text",
    "qry_image",
    "pos_text",
    "pos_image",
    "neg_text",
    "neg_image",
)


class ArrowRows(Sequence):
    """TrainRows read by index from an Arrow IPC file, memory-mapped on first access in each
    process; it pickles as its path (see `arrow_train_rows`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._table: pa.Table | None = None

    def __getstate__(self) -> dict[str, str]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["path"])

    def _columns(self) -> pa.Table:
        if self._table is None:
            self._table = pa.ipc.open_file(pa.memory_map(self.path)).read_all()
        return self._table

    def __len__(self) -> int:
        return self._columns().num_rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        table = self._columns()
        if not -table.num_rows <= i < table.num_rows:
            raise IndexError(f"row {i} of {table.num_rows} rows in {self.path}")
        return mmeb.TrainRow(**{name: table.column(name)[i].as_py() for name in _TRAIN_FIELDS})


def arrow_cache_dir(workdir: str | os.PathLike) -> pathlib.Path:
    """Where the stages of a run keep the Arrow copies of parquet training rows."""
    return pathlib.Path(workdir, "rows")


def arrow_train_rows(
    data: Any, subset: str, report: BadInputReport, cache_dir: str | os.PathLike
) -> ArrowRows:
    """The parquet rows of `subset` (split data.train_split) as ArrowRows over a copy in
    `cache_dir`, written on first use (atomically) and found again while the source is the same.

    The key covers each parquet file's name, size and modification time, the split and the
    image root; a changed source gets a new copy. Bad rows follow `report` while converting.
    """
    image_root = data.train_image_root or data.train_dir
    files = mmeb.parquet_files(data.train_dir, subset, data.train_split)
    source = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]
    key = json.dumps([subset, data.train_split, str(image_root), source])
    path = pathlib.Path(cache_dir, f"{subset}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.arrow")
    if not path.is_file():
        converted = BadInputReport(report.policy)
        rows = mmeb.read_train_subset(
            data.train_dir, subset, data.train_split, image_root, converted
        )
        columns = {name: [getattr(row, name) for row in rows] for name in _TRAIN_FIELDS}
        table = pa.table(
            {
                name: pa.array(values, pa.int64() if name == "index" else pa.string())
                for name, values in columns.items()
            }
        )
        # The rows skipped while converting travel with the copy, so every later reader
        # (the train stage after mine, a restart) reports them too.
        table = table.replace_schema_metadata({_SKIPPED_KEY: json.dumps(converted.as_dict())})
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, table.schema) as out:
            out.write_table(table)
        os.replace(partial, path)  # processes sharing the folder write the same bytes
    report.merge(_skipped_in_copy(path, report.policy))
    return ArrowRows(path)


_SKIPPED_KEY = b"g2e_skipped_rows"


def _skipped_in_copy(path: pathlib.Path, policy: str) -> BadInputReport:
    """The rows skipped when the Arrow copy at `path` was written, as a report to merge."""
    with pa.OSFile(str(path), "rb") as source:
        metadata = pa.ipc.open_file(source).schema.metadata or {}
    skipped = BadInputReport(policy)
    recorded = json.loads(metadata.get(_SKIPPED_KEY, b"{}"))
    for entry in recorded.get("by_subset_reason", []):
        skipped.counts[(entry["subset"], entry["reason"])] += entry["count"]
    skipped.examples.extend(recorded.get("examples", []))
    return skipped


def eval_rows(data: Any, subset: str, report: BadInputReport) -> Sequence[mmeb.EvalRow]:
    """The rows of one MMEB-eval subset in the configured format (see `train_rows`; the keys
    read are format, tfds_dir, eval_dir and eval_image_root)."""
    if _format(data) == "tfds":
        return _tfds_rows("eval", data, subset, mmeb.EVAL_SPLIT, report)
    return mmeb.read_eval_subset(
        data.eval_dir, subset, data.eval_image_root or data.eval_dir, report
    )


def _prepared_subsets(kind: str, tfds_dir: str) -> list[str]:
    """The subsets with a prepared copy under `tfds_dir` (<builder>/<subset>/<version>/)."""
    from g2e.data import tfds_rows

    return tfds_rows.prepared_subsets(kind, tfds_dir)


def list_train_subsets(data: Any) -> list[str]:
    """The MMEB-train subsets present in the configured source, in name order."""
    if _format(data) == "tfds":
        return _prepared_subsets("train", data.tfds_dir)
    return mmeb.list_subsets(data.train_dir)


def train_subsets(data: Any) -> list[str]:
    """data.train_subsets (comma-separated), or every subset of the configured source."""
    named = [s.strip() for s in str(data.train_subsets).split(",") if s.strip()]
    return named or list_train_subsets(data)


def list_eval_subsets(data: Any) -> list[str]:
    """The MMEB-eval subsets present in the configured source, in name order."""
    if _format(data) == "tfds":
        return _prepared_subsets("eval", data.tfds_dir)
    return mmeb.list_subsets(data.eval_dir)


class ConcatRows(Sequence):
    """Several row sequences read as one (indices run through them in order), without copying:
    the train stage concatenates every subset's rows, which over TFDS are read on access."""

    def __init__(self, parts: Sequence[Sequence]):
        self.parts = [p for p in parts if len(p)]
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + len(part))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of {len(self)} rows")
        i %= len(self)
        part = bisect.bisect_right(self.starts, i) - 1
        return self.parts[part][i - self.starts[part]]

    def __iter__(self) -> Iterator:
        for part in self.parts:
            yield from part


def index_keys(keys: Iterable[Hashable]) -> tuple[list, np.ndarray]:
    """Numbers keys in order of first appearance.

    Returns (the distinct keys in that order, int64 [N]: each input key's number). Items that
    share a key are embedded once (evaluation, mining) and mined as one key.
    """
    numbers: dict = {}
    ids = np.fromiter((numbers.setdefault(key, len(numbers)) for key in keys), np.int64)
    return list(numbers), ids


def first_of_each(ids: np.ndarray) -> np.ndarray:
    """int64 [K]: the position of the first input with each number of `index_keys`."""
    return np.unique(ids, return_index=True)[1].astype(np.int64)


def train_row_keys(rows: Iterable[mmeb.TrainRow]) -> tuple[list[tuple], list[tuple]]:
    """(query key, positive key) of each training row: its text and `images.image_key` of its
    image (a path, or a short hash of the bytes a TFDS copy carries); one pass over the rows."""
    query_keys, positive_keys = [], []
    for row in rows:
        query_keys.append((row.qry_text, images.image_key(row.qry_image)))
        positive_keys.append((row.pos_text, images.image_key(row.pos_image)))
    return query_keys, positive_keys
