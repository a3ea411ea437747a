"""Atomic writes: a file or a directory is either whole at its final path or absent.

Every output a later run trusts (results, caches, cluster files, exports, the demo's data and
checkpoint) is written to a temporary name next to its target and renamed into place, so a run
killed half-way never leaves a file or folder that looks complete.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

PathLike = str | os.PathLike


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file and a rename (parents created)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: PathLike, text: str) -> None:
    """`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, content: Any, **dumps_options: Any) -> None:
    """`write_text` of `json.dumps(content, **dumps_options)` plus a final newline."""
    write_text(path, json.dumps(content, **dumps_options) + "\n")


def replace_directory(target: PathLike, write: Callable[[pathlib.Path], Any]) -> pathlib.Path:
    """Runs `write(tmp_dir)` on a fresh temporary folder, then renames it to `target`.

    An older `target` is replaced only once the new one is complete; if `write` raises, the
    temporary folder is removed and `target` is left as it was.
    """
    target = pathlib.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        write(temporary)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            temporary.rename(target)
            shutil.rmtree(old)
        else:
            temporary.rename(target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return target
