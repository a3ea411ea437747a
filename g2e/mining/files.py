"""The cluster file: one subset's mined clusters, read by the training stage."""

import dataclasses
import json
import os
from collections.abc import Sequence

FORMAT_VERSION = 1
FORMAT_NAME = "g2e.clusters"


@dataclasses.dataclass
class ClusterFile:
    """The content of a cluster file (see `write_clusters`)."""

    subset: str
    num_rows: int
    clusters: list[list[int]]
    phases: list[int]
    params: dict


def write_clusters(
    path: str,
    clusters: Sequence[Sequence[int]],
    phases: Sequence[int],
    *,
    subset: str,
    num_rows: int,
    params: dict | None = None,
) -> None:
    """Writes one subset's clusters as JSON (atomically: a temporary file, then a rename).

    Format (format_version 1), one JSON object:
      {"format": "g2e.clusters", "format_version": 1, "subset": str,
       "num_rows": int,            # rows of the subset's training split the indices refer to
       "params": {...},            # how the clusters were mined (top_k, pool_mult, judge, ...)
       "clusters": [[anchor_row, owner_row, ...], ...],   # row indices into that split
       "phases": [1 | 2, ...]}     # the phase of each cluster
    Keys are sorted and the layout fixed, so equal clusters give byte-identical files.
    """
    if len(phases) != len(clusters):
        raise ValueError(f"{path}: {len(clusters)} clusters but {len(phases)} phases.")
    content = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "subset": subset,
        "num_rows": int(num_rows),
        "params": dict(params or {}),
        "clusters": [[int(r) for r in c] for c in clusters],
        "phases": [int(p) for p in phases],
    }
    _check_clusters(path, content["clusters"], content["phases"], int(num_rows))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump(content, f, sort_keys=True, separators=(",", ":"))
        f.write("\n")
    os.replace(temporary, path)


def read_clusters(
    path: str, *, subset: str | None = None, num_rows: int | None = None
) -> ClusterFile:
    """Reads a cluster file; checks its format, version and indices.

    Args:
      subset, num_rows: when given, the file must have been mined for this subset and this
        number of rows (so clusters are never applied to other data).

    Raises:
      ValueError: naming the file and what to do (usually: re-run the mine stage).
    """
    with open(path) as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}: not a JSON cluster file ({err}); re-run the mine "
                "stage (with --config.force)."
            ) from err
    if not isinstance(content, dict) or content.get("format") != FORMAT_NAME:
        raise ValueError(f'{path}: not a g2e cluster file (no "format": "{FORMAT_NAME}").')
    version = content.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: cluster format_version {version!r}; this g2e reads "
            f"{FORMAT_VERSION}. Re-run the mine stage to rewrite it."
        )
    if subset is not None and content["subset"] != subset:
        raise ValueError(f"{path}: clusters of subset {content['subset']!r}, expected {subset!r}.")
    if num_rows is not None and content["num_rows"] != num_rows:
        raise ValueError(
            f"{path}: clusters mined for {content['num_rows']} rows but the data "
            f"has {num_rows}; the training data changed, re-run the mine stage."
        )
    _check_clusters(path, content["clusters"], content["phases"], content["num_rows"])
    return ClusterFile(
        content["subset"],
        content["num_rows"],
        content["clusters"],
        content["phases"],
        content["params"],
    )


def _check_clusters(path: str, clusters: list[list[int]], phases: list[int], num_rows: int) -> None:
    if len(phases) != len(clusters):
        raise ValueError(f"{path}: {len(clusters)} clusters but {len(phases)} phases.")
    for i, cluster in enumerate(clusters):
        if not cluster or min(cluster) < 0 or max(cluster) >= num_rows:
            raise ValueError(
                f"{path}: cluster {i} {cluster[:4]}... is empty or has a row "
                f"outside [0, {num_rows}); re-run the mine stage."
            )
        if len(set(cluster)) != len(cluster):
            raise ValueError(f"{path}: cluster {i} repeats a row: {cluster}.")
    if any(p not in (1, 2) for p in phases):
        raise ValueError(f"{path}: phases must be 1 or 2.")
