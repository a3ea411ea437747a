"""MMEB subset table: each subset's meta-task and IND/OOD group (docs/method.md §4).

The real MMEB's 36 evaluation subsets and 20 training subsets are listed here. A data set
of another shape (the mini-MMEB, or a user's own) declares its subsets in a manifest,
`subsets.json`, in its top directory:

  {"subsets": [{"name": "ShapeCls", "meta_task": "classification", "group": "IND",
                "train": true}, ...]}

`subset_info(name, data_dir)` looks for that manifest in `data_dir` and in its parent (so
both `DIR/train` and `DIR/eval` of one data set find `DIR/subsets.json`), then falls back
to the real MMEB table. `python -m g2e.data.tfds_builders` copies the manifest into the TFDS
data_dir it writes (local or gs://), so reading the prepared copy finds it there.
"""

import dataclasses
import json
import os

from etils import epath

META_TASKS = ("classification", "vqa", "retrieval", "grounding")
GROUPS = ("IND", "OOD")
MANIFEST_NAME = "subsets.json"


@dataclasses.dataclass(frozen=True)
class SubsetInfo:
    """One subset: its name, meta-task (one of META_TASKS), group ('IND' or 'OOD'), and
    whether it has training data."""

    name: str
    meta_task: str
    group: str
    train: bool = False

    @property
    def is_classification(self) -> bool:
        """Classification subsets keep retrieval order in SaHa's false-negative filter."""
        return self.meta_task == "classification"


def _table(meta_task: str, group: str, names: str, train: bool) -> list[SubsetInfo]:
    return [SubsetInfo(n, meta_task, group, train) for n in names.split()]


# The eval names. IND subsets are exactly the ones MMEB-train has (ImageNet-1K is spelled
# ImageNet_1K there; `canonical_name` maps one to the other).
MMEB_SUBSETS: tuple[SubsetInfo, ...] = tuple(
    _table("classification", "IND", "ImageNet-1K N24News HatefulMemes VOC2007 SUN397", True)
    + _table("vqa", "IND", "OK-VQA A-OKVQA DocVQA InfographicsVQA ChartQA Visual7W", True)
    + _table(
        "retrieval",
        "IND",
        "VisDial CIRR VisualNews_t2i VisualNews_i2t MSCOCO_t2i MSCOCO_i2t NIGHTS WebQA",
        True,
    )
    + _table("grounding", "IND", "MSCOCO", True)
    + _table("classification", "OOD", "Place365 ImageNet-A ImageNet-R ObjectNet Country211", False)
    + _table("vqa", "OOD", "ScienceQA VizWiz GQA TextVQA", False)
    + _table("retrieval", "OOD", "OVEN FashionIQ EDIS Wiki-SS-NQ", False)
    + _table("grounding", "OOD", "Visual7W-Pointing RefCOCO RefCOCO-Matching", False)
)

# MMEB-train spells a few names differently from MMEB-eval.
_TRAIN_SPELLING = {"ImageNet-1K": "ImageNet_1K"}
_EVAL_SPELLING = {v: k for k, v in _TRAIN_SPELLING.items()}

MMEB_TRAIN_SUBSETS: tuple[str, ...] = tuple(
    _TRAIN_SPELLING.get(s.name, s.name) for s in MMEB_SUBSETS if s.train
)
MMEB_EVAL_SUBSETS: tuple[str, ...] = tuple(s.name for s in MMEB_SUBSETS)


class UnknownSubsetError(ValueError):
    """A subset name that neither the data set's manifest nor the MMEB table knows."""


def canonical_name(name: str) -> str:
    """Returns the MMEB-eval spelling of a subset name (ImageNet_1K -> ImageNet-1K)."""
    return _EVAL_SPELLING.get(name, name)


def train_name(name: str) -> str:
    """Returns the MMEB-train spelling of a subset name (ImageNet-1K -> ImageNet_1K)."""
    return _TRAIN_SPELLING.get(name, name)


def _validate(info: SubsetInfo, where: str) -> SubsetInfo:
    if info.meta_task not in META_TASKS:
        raise ValueError(
            f"{where}: subset {info.name!r} has meta_task {info.meta_task!r}; "
            f"use one of {META_TASKS}."
        )
    if info.group not in GROUPS:
        raise ValueError(
            f"{where}: subset {info.name!r} has group {info.group!r}; use one of {GROUPS}."
        )
    return info


def write_manifest(data_dir: str, infos: list[SubsetInfo]) -> str:
    """Writes `data_dir/subsets.json` declaring `infos`; returns its path."""
    path = epath.Path(data_dir) / MANIFEST_NAME
    entries = [dataclasses.asdict(_validate(i, os.fspath(path))) for i in infos]
    path.write_text(json.dumps({"subsets": entries}, indent=1))
    return os.fspath(path)


def find_manifest(data_dir: str | None) -> str | None:
    """Returns the manifest path in `data_dir` or its parent, or None when there is none."""
    if not data_dir:
        return None
    # epath: a prepared TFDS copy (with its manifest) may be read from a bucket (gs://).
    folder = epath.Path(data_dir if "://" in data_dir else os.path.abspath(data_dir))
    for d in (folder, folder.parent):
        path = d / MANIFEST_NAME
        if path.is_file():
            return os.fspath(path)
    return None


def read_manifest(path: str) -> dict[str, SubsetInfo]:
    """Reads a manifest; raises ValueError naming the file and entry when it is malformed."""
    entries = json.loads(epath.Path(path).read_text()).get("subsets")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected {{'subsets': [...]}}; see g2e/data/subsets.py.")
    infos = {}
    for i, e in enumerate(entries):
        try:
            info = SubsetInfo(
                str(e["name"]), str(e["meta_task"]), str(e["group"]), bool(e.get("train", False))
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: entry {i} needs name, meta_task and group ({err}).") from err
        infos[info.name] = _validate(info, path)
    return infos


def known_subsets(data_dir: str | None = None) -> dict[str, SubsetInfo]:
    """Returns the subsets of the data set at `data_dir` (its manifest), else the MMEB table."""
    manifest = find_manifest(data_dir)
    if manifest:
        return read_manifest(manifest)
    return {s.name: s for s in MMEB_SUBSETS}


def subset_info(name: str, data_dir: str | None = None) -> SubsetInfo:
    """Returns the meta-task and group of subset `name`.

    Args:
      name: a subset name, in either MMEB spelling (ImageNet_1K or ImageNet-1K).
      data_dir: the data set's train or eval directory; its manifest (if any) is searched
        first, then the real MMEB table.

    Raises:
      UnknownSubsetError: when neither knows the name.
    """
    manifest = find_manifest(data_dir)
    tables = [read_manifest(manifest)] if manifest else []
    tables.append({s.name: s for s in MMEB_SUBSETS})
    for table in tables:
        for key in (name, canonical_name(name)):
            if key in table:
                return table[key]
    looked_in = f"the manifest {manifest} and the MMEB table" if manifest else "the MMEB table"
    known = sorted(set().union(*tables))
    raise UnknownSubsetError(
        f"Unknown subset {name!r} (looked in {looked_in}). Known subsets: "
        f"{', '.join(known)}. Fix the subset list in the config, or declare the subset in "
        f"{MANIFEST_NAME} next to the data."
    )
