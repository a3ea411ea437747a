"""TFDS builders `mmeb_train` and `mmeb_eval`: MMEB as array_record files with the images in.

A TPU VM then reads the prepared data from a bucket without the original image folders:

  python -m g2e.data.tfds_builders --kind train --source /data/MMEB-train \
      --image_root /data/MMEB-train --data_dir gs://bucket/tfds [--subsets ImageNet_1K,...]
  python -m g2e.data.tfds_builders --kind eval --source /data/MMEB-eval \
      --image_root /data/MMEB-eval --data_dir gs://bucket/tfds

Reading (the same row dataclasses as g2e.data.mmeb, images as bytes), e.g. for training:

  rows = RowSource("train", "gs://bucket/tfds", "ImageNet_1K", "original")
  for row in loader.Loader(rows, seed=0, drop_remainder=True): ...

One BuilderConfig per subset, named after it: a subset is the unit of mining and
evaluation, and subsets can then be (re)built one at a time. `mmeb_train/<Subset>` has the
splits `original` and `diverse_instruction` (those present in the source), `mmeb_eval/<Subset>`
has `test`. Images are stored as the encoded file bytes (a string tensor, not
tfds.features.Image, which would decode and re-encode them), so they come back byte-identical,
next to the path the parquet named. An empty byte string means "no image". Records keep
the parquet's row order (TFDS's shuffling on write is disabled), and `index` is the row's
number in the source split.

Rows are validated by g2e.data.mmeb while building, and every image is decoded once with
g2e.data.images.load_image (verify_images=True) so that a corrupt file is found here, not on
the TPU VM. Under on_bad_input='skip' the bad rows are absent from the files and
`builder.report` (an errors.BadInputReport) counts them.
"""

import argparse
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from g2e.data import images
from g2e.data import mmeb
from g2e.data import subsets as subsets_lib
from g2e.data.errors import BadInput, BadInputReport

VERSION = "1.0.0"
_BYTES = tfds.features.Tensor(shape=(), dtype=np.object_)
_BYTES_LIST = tfds.features.Tensor(shape=(None,), dtype=np.object_)
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


def _read_bytes(path: str | None, verify: bool) -> bytes:
    """The file's bytes (b'' for no image); with `verify`, decoded once to find corrupt files."""
    if path is None:
        return b""
    with open(path, "rb") as f:
        data = f.read()
    if verify:
        try:
            images.load_image(data)
        except BadInput as err:
            raise BadInput(err.reason, detail=err.detail, file=path, hint=err.hint) from err
    return data


def _relative(path: str | None, image_root: str) -> str:
    return "" if path is None else os.path.relpath(path, os.path.abspath(image_root))


class EmptySplitError(ValueError):
    """Every row of a split (or the whole subset) was skipped as bad input."""


# Run as `python -m`, this file is imported twice (as __main__ and by its name); only the
# named import registers the builders with TFDS (so tfds.builder('mmeb_train/...') works).
_REGISTER = dict(skip_registration=__name__ == "__main__")


class _MmebBuilder(tfds.core.GeneratorBasedBuilder, **_REGISTER):
    """Shared build steps; the subclasses fix the features and splits."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = []  # configs are made per subset: MmebConfig(name=subset, ...)

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        self.report = BadInputReport(self.builder_config.on_bad_input)

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

    def _generate_examples(self, rows: list, to_example):
        """Yields (index, example) for the rows whose images read (and decode) cleanly."""
        for row in rows:
            try:
                example = to_example(row)
            except BadInput as err:
                self.report.handle(err.with_context(subset=row.subset, row=row.index))
                continue
            yield row.index, example


class MmebTrain(_MmebBuilder, **_REGISTER):
    """MMEB-train subsets (splits `original`, `diverse_instruction`) with image bytes inside."""

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"subset": tfds.features.Text(), "index": np.int64}
        for side in ("qry", "pos", "neg"):
            features[f"{side}_text"] = tfds.features.Text()
            features[f"{side}_image_path"] = tfds.features.Text()
            features[f"{side}_image"] = _BYTES
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features), disable_shuffling=True
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the source is a local copy, nothing is downloaded
        self._check_source()
        cfg = self.builder_config
        splits = [s for s in mmeb.TRAIN_SPLITS if mmeb.parquet_files(cfg.source_dir, cfg.name, s)]
        if not splits:
            # Let the reader produce its bad-input error (or skip) naming subset and folder.
            splits = [mmeb.TRAIN_SPLITS[0]]

        def to_example(row: mmeb.TrainRow) -> dict:
            example = {"subset": row.subset, "index": row.index}
            for side, text, image in (
                ("qry", row.qry_text, row.qry_image),
                ("pos", row.pos_text, row.pos_image),
                ("neg", row.neg_text, row.neg_image),
            ):
                example[f"{side}_text"] = text
                example[f"{side}_image_path"] = _relative(image, cfg.image_root)
                example[f"{side}_image"] = _read_bytes(image, cfg.verify_images)
            return example

        generators = {}
        for split in splits:
            rows = mmeb.read_train_subset(
                cfg.source_dir, cfg.name, split, cfg.image_root, self.report
            )
            generators[split] = self._generate_examples(self._checked(rows, split), to_example)
        return generators


class MmebEval(_MmebBuilder, **_REGISTER):
    """MMEB-eval subsets (split `test`) with image bytes inside."""

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "subset": tfds.features.Text(),
                    "index": np.int64,
                    "qry_text": tfds.features.Text(),
                    "qry_image_path": tfds.features.Text(),
                    "qry_image": _BYTES,
                    "tgt_text": _TEXT_LIST,
                    "tgt_image_path": _TEXT_LIST,
                    "tgt_image": _BYTES_LIST,
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        self._check_source()
        cfg = self.builder_config

        def to_example(row: mmeb.EvalRow) -> dict:
            return {
                "subset": row.subset,
                "index": row.index,
                "qry_text": row.qry_text,
                "qry_image_path": _relative(row.qry_image, cfg.image_root),
                "qry_image": _read_bytes(row.qry_image, cfg.verify_images),
                "tgt_text": list(row.tgt_texts),
                "tgt_image_path": [_relative(p, cfg.image_root) for p in row.tgt_images],
                "tgt_image": np.array(
                    [_read_bytes(p, cfg.verify_images) for p in row.tgt_images], dtype=np.object_
                ),
            }

        rows = mmeb.read_eval_subset(cfg.source_dir, cfg.name, cfg.image_root, self.report)
        rows = self._checked(rows, mmeb.EVAL_SPLIT)
        return {mmeb.EVAL_SPLIT: self._generate_examples(rows, to_example)}


_BUILDERS = {"train": MmebTrain, "eval": MmebEval}


def builder(kind: str, data_dir: str, subset: str, **config) -> _MmebBuilder:
    """Returns the `kind` ('train' or 'eval') builder of `subset` under `data_dir`; `config`
    (source_dir, image_root, on_bad_input, verify_images) is needed only to build."""
    if kind not in _BUILDERS:
        raise ValueError(f"kind={kind!r}; use 'train' or 'eval'.")
    return _BUILDERS[kind](data_dir=data_dir, config=MmebConfig(name=subset, **config))


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


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _image(data) -> bytes | None:
    return bytes(data) or None


def _train_row(record: dict) -> mmeb.TrainRow:
    return mmeb.TrainRow(
        _text(record["subset"]),
        int(record["index"]),
        _text(record["qry_text"]),
        _image(record["qry_image"]),
        _text(record["pos_text"]),
        _image(record["pos_image"]),
        _text(record["neg_text"]),
        _image(record["neg_image"]),
    )


def _eval_row(record: dict) -> mmeb.EvalRow:
    return mmeb.EvalRow(
        _text(record["subset"]),
        int(record["index"]),
        _text(record["qry_text"]),
        _image(record["qry_image"]),
        tuple(_text(t) for t in record["tgt_text"]),
        tuple(_image(b) for b in record["tgt_image"]),
    )


class RowSource(Sequence):
    """Random access to a prepared split as mmeb rows (images as encoded bytes).

    The raw TFDS record (with the image paths the parquet named) is `source.records[i]`.
    """

    def __init__(self, kind: str, data_dir: str, subset: str, split: str):
        b = builder(kind, data_dir, subset)
        if not b.is_prepared():
            raise FileNotFoundError(
                f"{b.data_path} holds no prepared {b.name}/{subset}; run `python -m "
                f"g2e.data.tfds_builders --kind {kind} ...` (see its docstring) first."
            )
        if split not in b.info.splits:
            raise KeyError(f"{b.name}/{subset} has splits {list(b.info.splits)}, not {split!r}.")
        self.records = b.as_data_source(split=split)
        self._to_row = _train_row if kind == "train" else _eval_row

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} of a split with {n} rows")
        return self._to_row(self.records[i % n])


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=sorted(_BUILDERS), required=True)
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
