"""MMEB's train/eval subsets in the Hugging Face hub's parquet layout (docs/method.md §5).

Reads them into rows, and writes the same layout (`write_split`, one writer) for the data sets
the project draws (g2e.demo.mini_mmeb, g2e.data.synthetic_mmeb).

Layout of a local copy of TIGER-Lab/MMEB-train (or MMEB-eval):
  <dir>/<Subset>/<split>-*.parquet   or   <dir>/<Subset>/<split>/*.parquet
  train columns: qry, qry_image_path, pos_text, pos_image_path, neg_text, neg_image_path
  eval columns (split `test`): qry_text, qry_img_path, tgt_text (list), tgt_img_path (list),
  the positive candidate first.
Image paths are relative to an image root (train: `images/<Subset>/Train/x.jpg`); an empty
path means "no image".

Bad input (`config.data.on_bad_input`, see g2e/data/errors.py): an unknown subset, a file
missing columns, a malformed candidate list, an image path that leaves the image root or an
image file that does not exist raises errors.BadInput naming the subset, file and row under
'error'; under 'skip' the row (or the whole subset) is dropped and counted in the
errors.BadInputReport the caller passes, which it prints at the end. Images are not decoded
here (that happens once, in images.load_image, when they are used).

Existence is checked once per unique path and with one listing per image folder (an
`ImagePaths` per subset read), not with a stat per row and candidate: an MMEB-eval subset
names up to 1M candidate paths but far fewer unique images, and over a bucket mount
(gcsfuse) every stat is a round trip. Rows that share an image share its path string.
"""

import dataclasses
import glob
import os

import pyarrow as pa
import pyarrow.parquet as pq

from g2e.data import images
from g2e.data import subsets as subsets_lib
from g2e.data.errors import BadInput, BadInputReport

# An image as rows carry it: an absolute file path (read from parquet), a lazy reference into
# a prepared TFDS copy's image table (images.ImageRef), encoded bytes, or None for "no image".
Image = str | images.ImageRef | bytes | None

TRAIN_COLUMNS = (
    "qry",
    "qry_image_path",
    "pos_text",
    "pos_image_path",
    "neg_text",
    "neg_image_path",
)
EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
# The hub's column types: what `write_split` writes (the mini- and synthetic MMEB use it).
TRAIN_SCHEMA = pa.schema([(c, pa.string()) for c in TRAIN_COLUMNS])
EVAL_SCHEMA = pa.schema(
    [
        ("qry_text", pa.string()),
        ("qry_img_path", pa.string()),
        ("tgt_text", pa.list_(pa.string())),
        ("tgt_img_path", pa.list_(pa.string())),
    ]
)
TRAIN_SPLITS = ("original", "diverse_instruction")
EVAL_SPLIT = "test"


@dataclasses.dataclass(frozen=True)
class TrainRow:
    """One MMEB-train pair. `index` is the row's number in its subset's split (over the
    split's parquet files in name order, counting skipped rows), a stable id for mining."""

    subset: str
    index: int
    qry_text: str
    qry_image: Image
    pos_text: str
    pos_image: Image
    neg_text: str
    neg_image: Image


@dataclasses.dataclass(frozen=True)
class EvalRow:
    """One MMEB-eval query with its candidates; candidate 0 is the positive."""

    subset: str
    index: int
    qry_text: str
    qry_image: Image
    tgt_texts: tuple[str, ...]
    tgt_images: tuple[Image, ...]


def as_report(on_bad_input: str | BadInputReport) -> BadInputReport:
    """Returns `on_bad_input` if it is a report, else a new report with that policy."""
    if isinstance(on_bad_input, BadInputReport):
        return on_bad_input
    return BadInputReport(on_bad_input)


def list_subsets(data_dir: str) -> list[str]:
    """Returns the names of the subset folders under `data_dir` that hold parquet files."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"MMEB directory {data_dir} does not exist; point "
            "config.data.train_dir / eval_dir at a local copy of the hub repo."
        )
    return sorted(
        name
        for name in os.listdir(data_dir)
        if glob.glob(os.path.join(data_dir, name, "**", "*.parquet"), recursive=True)
    )


def parquet_files(data_dir: str, subset: str, split: str) -> list[str]:
    """Returns the parquet files of `subset`/`split` in name order (both hub layouts)."""
    folder = os.path.join(data_dir, subset)
    files = glob.glob(os.path.join(folder, f"{split}-*.parquet"))
    files += glob.glob(os.path.join(folder, split, "*.parquet"))
    return sorted(files)


def resolve_image(image_root: str, relative_path: str | None) -> str | None:
    """Returns the absolute path of an image named relative to `image_root`, or None for ''.

    Raises:
      BadInput: when the path leaves the image root (symlinks inside it are fine) or the file
        does not exist.
    """
    if not relative_path:
        return None
    path = str(images.resolve_path(relative_path, image_root))
    if not os.path.isfile(path):
        raise BadInput(
            "missing image",
            file=path,
            hint=f"check the image root {image_root}: it must hold the paths the parquet names",
        )
    return path


class ImagePaths:
    """Resolves and checks the image paths of one subset read, each unique path once.

    Existence comes from one `os.scandir` per folder (cached), not a stat per path. A path's
    outcome (its absolute path, or the BadInput of `resolve_image`, with the same message) is
    remembered, so a candidate named by 1000 rows costs one dictionary look-up per row after
    the first, and all those rows hold the same string object.
    """

    def __init__(self, image_root: str):
        self.image_root = image_root
        self._outcomes: dict[str, str | BadInput] = {}
        self._listings: dict[str, frozenset[str]] = {}

    def __call__(self, relative_path: str | None) -> str | None:
        """Returns the absolute path of `relative_path` (None for '' or None).

        Raises:
          BadInput: as `resolve_image`, for every row that names a bad path.
        """
        if not relative_path:
            return None
        outcome = self._outcomes.get(relative_path)
        if outcome is None:
            try:
                outcome = self._check(relative_path)
            except BadInput as err:
                outcome = err
            self._outcomes[relative_path] = outcome
        if isinstance(outcome, BadInput):
            raise outcome.with_context()  # a fresh copy: the stored one keeps no traceback
        return outcome

    def _check(self, relative_path: str) -> str:
        path = str(images.resolve_path(relative_path, self.image_root))
        folder, name = os.path.split(path)
        if name not in self._files_in(folder):
            raise BadInput(
                "missing image",
                file=path,
                hint=f"check the image root {self.image_root}: it must hold the paths the "
                "parquet names",
            )
        return path

    def _files_in(self, folder: str) -> frozenset[str]:
        """The names of the files (symlinks to files included) in `folder`; none if absent."""
        names = self._listings.get(folder)
        if names is None:
            try:
                with os.scandir(folder) as entries:
                    # is_file() uses the listing's entry type; it stats only symlinks.
                    names = frozenset(entry.name for entry in entries if entry.is_file())
            except OSError:  # absent, not a folder, unreadable: as os.path.isfile, "missing"
                names = frozenset()
            self._listings[folder] = names
        return names


def _open_subset(
    data_dir: str, subset: str, split: str, columns: tuple[str, ...], report: BadInputReport
) -> list[str]:
    """Checks that `subset` is known and its files have `columns`; returns the files, or []
    when the subset is skipped."""
    try:
        subsets_lib.subset_info(subset, data_dir)
        files = parquet_files(data_dir, subset, split)
        if not files:
            available = ", ".join(list_subsets(data_dir)) if os.path.isdir(data_dir) else "none"
            raise BadInput(
                "no parquet files",
                file=os.path.join(data_dir, subset),
                detail=f"split {split!r}; subsets there: {available}",
                hint=f"expected {subset}/{split}-*.parquet or {subset}/{split}/*.parquet",
            )
        for path in files:
            missing = [c for c in columns if c not in pq.read_schema(path).names]
            if missing:
                raise BadInput(
                    "missing columns",
                    file=path,
                    detail=f"lacks {missing}",
                    hint=f"MMEB files have the columns {list(columns)}",
                )
    except subsets_lib.UnknownSubsetError as err:
        report.handle(BadInput("unknown subset", subset=subset, detail=str(err)))
        return []
    except BadInput as err:
        report.handle(err.with_context(subset=subset))
        return []
    return files


def _rows(files: list[str], columns: tuple[str, ...]):
    """Yields (file, row in file, split-wide index, record dict) over `files`."""
    index = 0
    for path in files:
        table = pq.read_table(path, columns=list(columns))
        for row, record in enumerate(table.to_pylist()):
            yield path, row, index, record
            index += 1


def read_train_subset(
    train_dir: str,
    subset: str,
    split: str,
    image_root: str,
    on_bad_input: str | BadInputReport = "error",
) -> list[TrainRow]:
    """Reads one MMEB-train subset split into rows with validated absolute image paths.

    Args:
      train_dir: local copy of MMEB-train (holds <Subset>/<split>-*.parquet).
      subset: subset folder name, e.g. 'ImageNet_1K'.
      split: 'original' or 'diverse_instruction'.
      image_root: the folder that holds the `images/...` paths of the parquet.
      on_bad_input: 'error', 'skip', or a BadInputReport that applies its policy and counts
        what is skipped (pass one to report the skips at the end of a stage).

    Returns:
      The rows in file order; skipped rows are absent but keep their `index` numbering.

    Raises:
      BadInput: under 'error', at the first bad input, naming subset, file and row.
    """
    report = as_report(on_bad_input)
    files = _open_subset(train_dir, subset, split, TRAIN_COLUMNS, report)
    resolve = ImagePaths(image_root)
    rows = []
    for path, row, index, r in _rows(files, TRAIN_COLUMNS):
        try:
            paths = [resolve(r[c]) for c in ("qry_image_path", "pos_image_path", "neg_image_path")]
        except BadInput as err:
            report.handle(err.with_context(subset=subset, row=f"{row} of {path}"))
            continue
        rows.append(
            TrainRow(
                subset,
                index,
                r["qry"] or "",
                paths[0],
                r["pos_text"] or "",
                paths[1],
                r["neg_text"] or "",
                paths[2],
            )
        )
    return rows


def read_eval_subset(
    eval_dir: str, subset: str, image_root: str, on_bad_input: str | BadInputReport = "error"
) -> list[EvalRow]:
    """Reads one MMEB-eval subset (split `test`) into rows with validated image paths.

    Args:
      eval_dir: local copy of MMEB-eval (holds <Subset>/test-*.parquet).
      subset: subset folder name, e.g. 'ImageNet-1K'.
      image_root: the folder the parquet's image paths are relative to.
      on_bad_input: 'error', 'skip', or a BadInputReport (see read_train_subset).

    Returns:
      The rows in file order, each with its candidates (positive first).

    Raises:
      BadInput: under 'error', at the first bad input, naming subset, file and row.
    """
    report = as_report(on_bad_input)
    files = _open_subset(eval_dir, subset, EVAL_SPLIT, EVAL_COLUMNS, report)
    resolve = ImagePaths(image_root)
    rows = []
    for path, row, index, r in _rows(files, EVAL_COLUMNS):
        texts, image_paths = r["tgt_text"], r["tgt_img_path"]
        try:
            if not texts or image_paths is None or len(texts) != len(image_paths):
                raise BadInput(
                    "malformed candidate lists",
                    file=path,
                    detail=f"tgt_text {texts!r}, tgt_img_path {image_paths!r}",
                    hint="tgt_text and tgt_img_path must be non-empty lists of equal length",
                )
            qry_image = resolve(r["qry_img_path"])
            tgt_images = tuple(resolve(p) for p in image_paths)
        except BadInput as err:
            report.handle(err.with_context(subset=subset, row=f"{row} of {path}"))
            continue
        rows.append(
            EvalRow(
                subset,
                index,
                r["qry_text"] or "",
                qry_image,
                tuple(t or "" for t in texts),
                tgt_images,
            )
        )
    return rows


# ---- writing: one writer of the hub's layout, for data sets made here ------------------------


def split_file(data_dir: str, subset: str, split: str) -> str:
    """The path of a split written whole as one file, named as the hub names a single shard:
    <data_dir>/<subset>/<split>-00000-of-00001.parquet."""
    return os.path.join(data_dir, subset, f"{split}-00000-of-00001.parquet")


def image_folder(subset: str, part: str) -> str:
    """Where a subset's images go, relative to the image root: images/<subset>/<part>, part
    'Train' or 'Test' (the hub's convention)."""
    return f"images/{subset}/{part}"


def train_record(query: str, query_image: str, positive: str, positive_image: str) -> dict:
    """One MMEB-train record (image paths relative to the image root, '' for none), without
    a negative, as MMEB-train's rows are."""
    return dict(
        qry=query,
        qry_image_path=query_image,
        pos_text=positive,
        pos_image_path=positive_image,
        neg_text="",
        neg_image_path="",
    )


def eval_record(query: str, query_image: str, candidates: list[tuple[str, str]]) -> dict:
    """One MMEB-eval record: `candidates` are (text, image path) pairs, the positive first."""
    return dict(
        qry_text=query,
        qry_img_path=query_image,
        tgt_text=[text for text, _ in candidates],
        tgt_img_path=[image for _, image in candidates],
    )


def write_split(data_dir: str, subset: str, split: str, records: list[dict]) -> str:
    """Writes one subset split in the hub's layout and column types; returns the file's path.

    Args:
      data_dir: the train or eval folder (the readers' train_dir / eval_dir).
      subset: the subset folder name.
      split: one of TRAIN_SPLITS (records of `train_record`) or EVAL_SPLIT (`eval_record`).
      records: the rows, in order.

    Raises:
      ValueError: an unknown split, or a record whose columns are not the split's.
    """
    if split not in (*TRAIN_SPLITS, EVAL_SPLIT):
        raise ValueError(
            f"write_split: split {split!r} of {subset}; use one of {TRAIN_SPLITS} or {EVAL_SPLIT!r}"
        )
    schema = EVAL_SCHEMA if split == EVAL_SPLIT else TRAIN_SCHEMA
    for row, record in enumerate(records):
        if sorted(record) != sorted(schema.names):
            raise ValueError(
                f"write_split: row {row} of {subset}/{split} has the columns {sorted(record)}; "
                f"the split's are {schema.names} (make it with train_record / eval_record)"
            )
    path = split_file(data_dir, subset, split)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)
    return path
