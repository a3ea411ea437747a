"""TFDS builders `mmeb_train` and `mmeb_eval`: MMEB as array_record files with the images in.

A TPU VM then reads the prepared data from a bucket without the original image folders:

  python -m g2e.data.tfds_builders --kind train --source /data/MMEB-train \
      --image_root /data/MMEB-train --data_dir gs://bucket/tfds [--subsets ImageNet_1K,...]
  python -m g2e.data.tfds_builders --kind eval --source /data/MMEB-eval \
      --image_root /data/MMEB-eval --data_dir gs://bucket/tfds

g2e.data.tfds_rows reads the copy back as the row dataclasses of g2e.data.mmeb.

One BuilderConfig per subset, named after it: a subset is the unit of mining and
evaluation, and subsets can then be (re)built one at a time. `mmeb_train/<Subset>` has the
row splits `original` and `diverse_instruction` (those present in the source), `mmeb_eval/
<Subset>` has `test`; both also have the split `images`, the subset's image table.

Layout (VERSION 2.0.0):
  split `images`: each unique image the subset's rows name (over all its row splits) once, in
      order of first use: `index` = its id, `image_path` = the path the parquet named (relative
      to the image root), `image` = the encoded file bytes (a string tensor, not
      tfds.features.Image, which would decode and re-encode them: they come back
      byte-identical).
  row splits: one record per row, in the parquet's order (TFDS's shuffling on write is
      disabled), `index` = the row's number in the source split; per image (train: qry, pos,
      neg; eval: qry and each candidate) its relative path (`*_image_path`) and its id in the
      table (`*_image_id`), -1 and '' for "no image".
TFDS gives a builder one feature dict for all its splits, so both kinds of record share it and
leave the other kind's fields empty ('', -1, []). Why a table: an MMEB-eval subset names up to
1000 x 1000 candidate images but far fewer unique ones (stored per row, MSCOCO_t2i alone would
take ~100 GB), and the two train splits name the same images. Rows name images by path as
well as by id so that the key of a row's image (`images.ImageRef.key`) needs no table read;
with the candidate texts that is ~75 bytes a candidate (~75 MB for 1000 x 1000 candidates).

Rows are validated by g2e.data.mmeb while building, and every unique image is read once and
(verify_images=True) decoded once with g2e.data.images.load_image, so that a corrupt file is
found here, not on the TPU VM. Under on_bad_input='skip' the rows that name a bad image are
absent from the row splits and `builder.report` (an errors.BadInputReport) counts them.
"""

import argparse
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from g2e.data import images, mmeb
from g2e.data import subsets as subsets_lib
from g2e.data.errors import BadInput, BadInputReport

VERSION = "2.0.0"
IMAGES_SPLIT = "images"
NO_IMAGE = -1
_BYTES = tfds.features.Tensor(shape=(), dtype=np.object_)
_IDS = tfds.features.Tensor(shape=(None,), dtype=np.int64)
_TEXT_LIST = tfds.features.Sequence(tfds.features.Text())


class MmebConfig(tfds.core.BuilderConfig):
    """One subset. `source_dir`, `image_root`, `on_bad_input` and `verify_images` matter only
    when building; reading needs just the name."""

    def __init__(
        self,
        *,
        name: str,
        source_dir: str = "",
        image_root: str = "",
        on_bad_input: str = "error",
        verify_images: bool = True,
    ):
        super().__init__(
            name=name,
            version=VERSION,
            description=f"MMEB subset {name} (from {source_dir or 'a prepared copy'})",
        )
        self.source_dir = source_dir
        self.image_root = image_root
        self.on_bad_input = on_bad_input
        self.verify_images = verify_images


def _read_bytes(path: str, verify: bool) -> bytes:
    """The file's bytes; with `verify`, decoded once to find corrupt files."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as err:  # removed since the reader listed its folder
        raise BadInput("missing image", file=path, detail=str(err)) from err
    if verify:
        try:
            images.load_image(data)
        except BadInput as err:
            raise BadInput(err.reason, detail=err.detail, file=path, hint=err.hint) from err
    return data


def _relative(path: str, image_root: str) -> str:
    return os.path.relpath(path, os.path.abspath(image_root))


class EmptySplitError(ValueError):
    """Every row of a split (or the whole subset) was skipped as bad input."""


class _TableWriter:
    """The image table of one subset while it is built.

    `uses` maps each absolute image path the rows name to the first row naming it, in order of
    first use. `examples()` yields the table's records, reading each image once (and, with
    `verify`, decoding it once); a bad image raises BadInput naming that first row under
    'error', and is left out under 'skip', where `image_id` then refuses it for every row that
    names it.
    """

    def __init__(
        self,
        subset: str,
        uses: dict[str, int],
        image_root: str,
        verify: bool,
        policy: str,
        empty: dict,
    ):
        self.subset, self.uses, self.verify, self.policy = subset, uses, verify, policy
        self.empty = empty
        self.relative = {path: _relative(path, image_root) for path in uses}
        self.ids: dict[str, int] | None = None
        self.bad: dict[str, BadInput] = {}

    def examples(self):
        """Yields (id, record) per good image, ids counting from 0 in order of first use."""
        ids, bad = {}, {}
        for path, first_row in self.uses.items():
            try:
                data = _read_bytes(path, self.verify)
            except BadInput as err:
                err = err.with_context(subset=self.subset)
                if self.policy == "error":
                    raise err.with_context(row=first_row)
                bad[path] = err
                continue
            image_id = ids[path] = len(ids)
            yield (
                image_id,
                {
                    **self.empty,
                    "subset": self.subset,
                    "index": image_id,
                    "image_path": self.relative[path],
                    "image": data,
                },
            )
        if not ids:
            raise EmptySplitError(f"subset {self.subset}: every image is bad input")
        self.ids, self.bad = ids, bad

    def image_id(self, path: str | None) -> int:
        """The table id of the image at absolute `path` (-1 for None).

        Raises:
          BadInput: the image was left out as bad (under 'skip').
        """
        if path is None:
            return NO_IMAGE
        if self.ids is None:
            # TFDS writes splits in the order given, the table first; were the rows first,
            # every image would be read (and decoded) once more here.
            for _ in self.examples():
                pass
        if path in self.bad:
            raise self.bad[path].with_context()
        return self.ids[path]

    def relative_path(self, path: str | None) -> str:
        return "" if path is None else self.relative[path]


# Run as `python -m`, this file is imported twice (as __main__ and by its name); only the
# named import registers the builders with TFDS (so tfds.builder('mmeb_train/...') works).
_REGISTER = dict(skip_registration=__name__ == "__main__")


class _MmebBuilder(tfds.core.GeneratorBasedBuilder, **_REGISTER):
    """Shared build steps; the subclasses fix the row features and the row splits."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = []  # configs are made per subset: MmebConfig(name=subset, ...)
    # The row records' own features and their values in an image-table record.
    ROW_FEATURES: dict = {}
    EMPTY_ROW: dict = {}

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        self.report = BadInputReport(self.builder_config.on_bad_input)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "subset": tfds.features.Text(),
            "index": np.int64,
            **self.ROW_FEATURES,
            "image_path": tfds.features.Text(),
            "image": _BYTES,
        }
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features), disable_shuffling=True
        )

    def _check_source(self) -> None:
        cfg = self.builder_config
        if not cfg.source_dir or not cfg.image_root:
            raise ValueError(
                f"Building {self.name}/{cfg.name} needs MmebConfig(source_dir=..., "
                "image_root=...); reading a prepared copy does not."
            )

    def _checked(self, rows: list, split: str) -> list:
        """Returns `rows`, refusing a split left without rows (TFDS cannot write an empty one)."""
        if not rows:
            raise EmptySplitError(
                f"{self.name}/{self.builder_config.name} split {split!r} has no "
                f"usable rows:\n{self.report.summary()}"
            )
        return rows

    def _generators(self, rows_by_split: dict[str, list], images_of, to_example) -> dict:
        """The split generators: the image table of every image `images_of(row)` names (None:
        no image), first, then the row splits, whose `to_example(row, table)` names them by
        id. A row naming a bad image is skipped (and counted) or raises, per on_bad_input."""
        cfg = self.builder_config
        uses: dict[str, int] = {}
        for rows in rows_by_split.values():
            for row in rows:
                for path in images_of(row):
                    if path is not None:
                        uses.setdefault(path, row.index)
        table = _TableWriter(
            cfg.name,
            uses,
            cfg.image_root,
            cfg.verify_images,
            self.report.policy,
            {**self.EMPTY_ROW, "index": 0},
        )
        generators = {IMAGES_SPLIT: table.examples()} if uses else {}
        for split, rows in rows_by_split.items():
            generators[split] = self._generate_examples(
                self._checked(rows, split), lambda row: to_example(row, table)
            )
        return generators

    def _generate_examples(self, rows: list, to_example):
        """Yields (index, example) for the rows whose images are in the table."""
        for row in rows:
            try:
                example = to_example(row)
            except BadInput as err:
                self.report.handle(err.with_context(subset=row.subset, row=row.index))
                continue
            yield row.index, example


_TRAIN_SIDES = ("qry", "pos", "neg")


class MmebTrain(_MmebBuilder, **_REGISTER):
    """MMEB-train subsets (splits `original`, `diverse_instruction`) with their image table."""

    ROW_FEATURES = {
        f"{side}_{name}": feature
        for side in _TRAIN_SIDES
        for name, feature in (
            ("text", tfds.features.Text()),
            ("image_path", tfds.features.Text()),
            ("image_id", np.int64),
        )
    }
    EMPTY_ROW = {
        f"{side}_{name}": value
        for side in _TRAIN_SIDES
        for name, value in (("text", ""), ("image_path", ""), ("image_id", NO_IMAGE))
    }

    def _split_generators(self, dl_manager):
        del dl_manager  # the source is a local copy, nothing is downloaded
        self._check_source()
        cfg = self.builder_config
        splits = [s for s in mmeb.TRAIN_SPLITS if mmeb.parquet_files(cfg.source_dir, cfg.name, s)]
        if not splits:
            # Let the reader produce its bad-input error (or skip) naming subset and folder.
            splits = [mmeb.TRAIN_SPLITS[0]]
        rows_by_split = {
            split: mmeb.read_train_subset(
                cfg.source_dir, cfg.name, split, cfg.image_root, self.report
            )
            for split in splits
        }

        def to_example(row: mmeb.TrainRow, table: _TableWriter) -> dict:
            example = {"subset": row.subset, "index": row.index, "image_path": "", "image": b""}
            for side in _TRAIN_SIDES:
                image = getattr(row, f"{side}_image")
                example[f"{side}_text"] = getattr(row, f"{side}_text")
                example[f"{side}_image_path"] = table.relative_path(image)
                example[f"{side}_image_id"] = table.image_id(image)
            return example

        return self._generators(
            rows_by_split, lambda r: (r.qry_image, r.pos_image, r.neg_image), to_example
        )


class MmebEval(_MmebBuilder, **_REGISTER):
    """MMEB-eval subsets (split `test`) with their image table."""

    ROW_FEATURES = {
        "qry_text": tfds.features.Text(),
        "qry_image_path": tfds.features.Text(),
        "qry_image_id": np.int64,
        "tgt_text": _TEXT_LIST,
        "tgt_image_path": _TEXT_LIST,
        "tgt_image_id": _IDS,
    }
    EMPTY_ROW = {
        "qry_text": "",
        "qry_image_path": "",
        "qry_image_id": NO_IMAGE,
        "tgt_text": [],
        "tgt_image_path": [],
        "tgt_image_id": np.zeros(0, np.int64),
    }

    def _split_generators(self, dl_manager):
        del dl_manager
        self._check_source()
        cfg = self.builder_config
        rows = mmeb.read_eval_subset(cfg.source_dir, cfg.name, cfg.image_root, self.report)

        def to_example(row: mmeb.EvalRow, table: _TableWriter) -> dict:
            return {
                "subset": row.subset,
                "index": row.index,
                "qry_text": row.qry_text,
                "qry_image_path": table.relative_path(row.qry_image),
                "qry_image_id": table.image_id(row.qry_image),
                "tgt_text": list(row.tgt_texts),
                "tgt_image_path": [table.relative_path(p) for p in row.tgt_images],
                "tgt_image_id": np.array([table.image_id(p) for p in row.tgt_images], np.int64),
                "image_path": "",
                "image": b"",
            }

        return self._generators(
            {mmeb.EVAL_SPLIT: rows}, lambda r: (r.qry_image, *r.tgt_images), to_example
        )


# The builder of each kind of subset (`--kind`).
BUILDERS = {"train": MmebTrain, "eval": MmebEval}


def builder(kind: str, data_dir: str, subset: str, **config) -> _MmebBuilder:
    """Returns the `kind` ('train' or 'eval') builder of `subset` under `data_dir`; `config`
    (source_dir, image_root, on_bad_input, verify_images) is needed only to build."""
    if kind not in BUILDERS:
        raise ValueError(f"kind={kind!r}; use 'train' or 'eval'.")
    return BUILDERS[kind](data_dir=data_dir, config=MmebConfig(name=subset, **config))


def copy_manifest(source_dir: str, data_dir: str) -> str | None:
    """Writes the subsets.json found at (or above) `source_dir` into `data_dir`, adding its
    entries to those of a manifest already there (train and eval are prepared into one
    data_dir); returns the path written, or None when the source has none (real MMEB).

    Raises:
      ValueError: when both manifests declare a subset differently.
    """
    source = subsets_lib.find_manifest(source_dir)
    if source is None:
        return None
    infos = subsets_lib.read_manifest(source)
    existing = os.fspath(epath.Path(data_dir) / subsets_lib.MANIFEST_NAME)
    if epath.Path(existing).is_file():
        merged = subsets_lib.read_manifest(existing)
        for name, info in infos.items():
            if merged.get(name, info) != info:
                raise ValueError(
                    f"{source} declares {info} but {existing} declares {merged[name]}; "
                    "prepare data sets with different subset tables into different "
                    "data_dirs"
                )
        infos = {**merged, **infos}
    epath.Path(data_dir).mkdir(parents=True, exist_ok=True)
    return subsets_lib.write_manifest(data_dir, list(infos.values()))


def prepare(
    kind: str,
    source_dir: str,
    image_root: str,
    subsets: Sequence[str],
    data_dir: str,
    on_bad_input: str = "error",
    verify_images: bool = True,
) -> BadInputReport:
    """Builds the array_record copy of each subset under `data_dir` (prepared ones are kept).

    The source's subsets.json (a mini-MMEB's or a user's own data set; see
    g2e.data.subsets) is copied into `data_dir`, merged with one already there, so that
    subset meta-tasks are found when reading the copy without the source.

    Returns:
      The report of what was skipped, whole subsets included (under 'error' the first bad
      input raises BadInput instead).
    """
    copy_manifest(source_dir, data_dir)
    report = BadInputReport(on_bad_input)
    for subset in subsets:
        b = builder(
            kind,
            data_dir,
            subset,
            source_dir=source_dir,
            image_root=image_root,
            on_bad_input=on_bad_input,
            verify_images=verify_images,
        )
        try:
            b.download_and_prepare()
        except EmptySplitError:
            if on_bad_input == "error":
                raise
        report.merge(b.report)
    return report


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=sorted(BUILDERS), required=True)
    parser.add_argument("--source", required=True, help="local copy of the hub repo")
    parser.add_argument("--image_root", required=True, help="folder the image paths start in")
    parser.add_argument("--data_dir", required=True, help="TFDS data dir (local or gs://)")
    parser.add_argument("--subsets", default="", help="comma-separated; default: all in --source")
    parser.add_argument("--on_bad_input", choices=("error", "skip"), default="error")
    parser.add_argument(
        "--no_verify_images",
        action="store_true",
        help="do not decode every image while building (faster)",
    )
    args = parser.parse_args(argv)
    names = [s for s in args.subsets.split(",") if s] or mmeb.list_subsets(args.source)
    report = prepare(
        args.kind,
        args.source,
        args.image_root,
        names,
        args.data_dir,
        args.on_bad_input,
        verify_images=not args.no_verify_images,
    )
    print(f"prepared {len(names)} {args.kind} subsets under {args.data_dir}")
    print(report.summary())


if __name__ == "__main__":
    # TFDS locates a builder's code by its module, which must not be __main__: run the
    # imported module's main.
    from g2e.data import tfds_builders

    tfds_builders.main()
