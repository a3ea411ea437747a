"""Reading a TFDS copy prepared by g2e.data.tfds_builders (layout VERSION 2.0.0).

Reading gives the row dataclasses of g2e.data.mmeb, whose images are lazy references:

  rows = RowSource("train", "gs://bucket/tfds", "ImageNet_1K", "original")
  row = rows[17]                        # reads one small record: texts, paths, image ids
  images.image_key(row.qry_image)       # the relative path the parquet named; no bytes read
  images.load_image(row.qry_image)      # now the image's bytes are read from the table

Copies prepared by g2e before layout 2.0.0 (every row carrying its images' bytes) cannot be
read: RowSource and prepared_subsets raise OutdatedCopyError; prepare them again.
"""

from collections.abc import Sequence

from etils import epath

from g2e.data import images, mmeb
from g2e.data.tfds_builders import BUILDERS, IMAGES_SPLIT, VERSION, builder


class OutdatedCopyError(RuntimeError):
    """A subset was prepared in a layout version this g2e does not read."""


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ImageTable:
    """A prepared subset's image table, read lazily (an images.ImageStore).

    `ref(image_id, path)` makes the rows' image references (one object per image, shared by
    the rows that name it); `read_image(image_id)` reads one image's bytes, opening the
    `images` split on first use. It pickles as (kind, data_dir, subset) and reopens there.
    """

    def __init__(self, kind: str, data_dir: str, subset: str):
        self.kind, self.data_dir, self.subset = kind, data_dir, subset
        self._records = None
        self._refs: dict[int, images.ImageRef] = {}

    def read_image(self, image_id: int) -> bytes:
        if self._records is None:
            b = builder(self.kind, self.data_dir, self.subset)
            self._records = b.as_data_source(split=IMAGES_SPLIT)
        return bytes(self._records[image_id]["image"])

    def ref(self, image_id: int, path: str) -> images.ImageRef | None:
        """The reference to image `image_id` (None for -1, "no image"); `path` is its key."""
        if image_id < 0:
            return None
        ref = self._refs.get(image_id)
        if ref is None:
            ref = self._refs[image_id] = images.ImageRef(path, self, image_id)
        return ref

    def __getstate__(self) -> dict:
        return dict(kind=self.kind, data_dir=self.data_dir, subset=self.subset)

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def _train_row(record: dict, table: ImageTable) -> mmeb.TrainRow:
    def image(side):
        return table.ref(int(record[f"{side}_image_id"]), _text(record[f"{side}_image_path"]))

    return mmeb.TrainRow(
        _text(record["subset"]),
        int(record["index"]),
        _text(record["qry_text"]),
        image("qry"),
        _text(record["pos_text"]),
        image("pos"),
        _text(record["neg_text"]),
        image("neg"),
    )


def _eval_row(record: dict, table: ImageTable) -> mmeb.EvalRow:
    return mmeb.EvalRow(
        _text(record["subset"]),
        int(record["index"]),
        _text(record["qry_text"]),
        table.ref(int(record["qry_image_id"]), _text(record["qry_image_path"])),
        tuple(_text(t) for t in record["tgt_text"]),
        tuple(
            table.ref(int(i), _text(p))
            for i, p in zip(record["tgt_image_id"], record["tgt_image_path"], strict=True)
        ),
    )


def _check_version(kind: str, data_dir: str, subset: str) -> None:
    """Raises OutdatedCopyError when `subset` was prepared only in other layout versions."""
    folder = epath.Path(data_dir) / BUILDERS[kind].name / subset
    if not folder.is_dir():
        return
    versions = sorted(p.name for p in folder.iterdir() if (p / "dataset_info.json").exists())
    if versions and VERSION not in versions:
        raise OutdatedCopyError(
            f"{folder} holds layout version(s) {', '.join(versions)} of the TFDS copy, which "
            f"this g2e cannot read (it reads {VERSION}: each image stored once, in a table per "
            f"subset); prepare it again with `python -m g2e.data.tfds_builders --kind {kind} "
            "...` (see its docstring)"
        )


def prepared_subsets(kind: str, data_dir: str) -> list[str]:
    """The subsets with a prepared `kind` copy under `data_dir` (<builder>/<subset>/<version>/).

    Raises:
      FileNotFoundError: no `kind` subset was prepared there.
      OutdatedCopyError: a subset there was prepared in an older layout only.
    """
    folder = epath.Path(data_dir) / BUILDERS[kind].name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} does not exist: no {kind} subsets were prepared under data.tfds_dir="
            f"{data_dir}; run `python -m g2e.data.tfds_builders --kind {kind} ...` first"
        )
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    for name in names:
        _check_version(kind, data_dir, name)
    return [n for n in names if (folder / n / VERSION / "dataset_info.json").exists()]


class RowSource(Sequence):
    """Random access to a prepared row split as mmeb rows whose images are images.ImageRefs
    into the subset's ImageTable (`source.table`): reading rows reads no image bytes.

    The raw TFDS record (image paths and ids) is `source.records[i]`.

    Raises (on construction):
      OutdatedCopyError: the subset was prepared in an older layout.
      FileNotFoundError: the subset was not prepared under `data_dir`.
      KeyError: it has no row split `split`.
    """

    def __init__(self, kind: str, data_dir: str, subset: str, split: str):
        b = builder(kind, data_dir, subset)
        if not b.is_prepared():
            _check_version(kind, data_dir, subset)
            raise FileNotFoundError(
                f"{b.data_path} holds no prepared {b.name}/{subset}; run `python -m "
                f"g2e.data.tfds_builders --kind {kind} ...` (see its docstring) first."
            )
        row_splits = [s for s in b.info.splits if s != IMAGES_SPLIT]
        if split not in row_splits:
            raise KeyError(f"{b.name}/{subset} has splits {row_splits}, not {split!r}.")
        self.records = b.as_data_source(split=split)
        self.table = ImageTable(kind, data_dir, subset)
        self._to_row = _train_row if kind == "train" else _eval_row

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} of a split with {n} rows")
        return self._to_row(self.records[i % n], self.table)
