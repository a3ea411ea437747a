"""The embed command (`configs/embed.py`): a JSONL file of {text, image, video, role} lines ->
float32 [N, D] embeddings in input order, through the same `Embedder` as the Python API.

`"video"` is optional: a list of frame paths in order, or one path naming a folder of frames
or a video file (g2e.data.videos samples data.video_frames frames from it). Paths, like image
paths, are taken as given: relative ones from the working directory."""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import numpy as np

from g2e import distributed
from g2e.data.errors import Line
from g2e.data.preprocess import EmbedItem
from g2e.embedding import Embedder
from g2e.pipeline import Pipeline

LINE_FORMAT = (
    '{"text": str, "image": path or null, "video": [frame paths] or path or null (optional), '
    '"role": "query" | "candidate"}'
)


def _video(record: dict) -> str | list[str] | None:
    """The line's "video": None, a path, or a non-empty list of frame paths; raises ValueError."""
    video = record.get("video")
    if video is None or isinstance(video, str) and video:
        return video
    if isinstance(video, list) and video and all(isinstance(v, str) and v for v in video):
        return video
    raise ValueError("'video' must be a list of frame paths, a folder or file path, or null")


def read_jsonl_items(path: str, on_bad_input: str = "error") -> tuple[list[EmbedItem], list[int]]:
    """Reads the embed command's input: one {"text", "image", "video", "role"} object per line.

    Returns the items and their line numbers (1-based). A malformed line raises ValueError naming
    the file and line; with on_bad_input='skip' it is logged, counted and left out of the items
    (its output row is NaN).
    """
    items, lines, skipped = [], [], 0
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("the line is not a JSON object")
                unknown = set(record) - {"text", "image", "video", "role"}
                if unknown:
                    raise ValueError(f"unknown keys {sorted(unknown)}")
                text, image, role = record.get("text", ""), record.get("image"), record.get("role")
                if not isinstance(text, str):
                    raise ValueError("'text' must be a string")
                if image is not None and not isinstance(image, str):
                    raise ValueError("'image' must be a path or null")
                if role not in ("query", "candidate"):
                    raise ValueError(f"'role' is {role!r}; use 'query' or 'candidate'")
                video = _video(record)
            except ValueError as error:  # json.JSONDecodeError is a ValueError too.
                message = f"{path}, line {number}: {error}. Each line must be {LINE_FORMAT}"
                if on_bad_input == "error":
                    raise ValueError(message) from None
                logging.warning("skipped: %s", message)
                skipped += 1
                items.append(None)
                lines.append(number)
                continue
            items.append(
                EmbedItem(
                    text=text,
                    image=image,
                    role=role,
                    subset="",
                    row=Line(path, number),
                    video=video,
                )
            )
            lines.append(number)
    if skipped:
        logging.warning(
            "%s: %d malformed line(s) skipped (their output rows are NaN)", path, skipped
        )
    return items, lines


def run_embed(pipeline: Pipeline) -> dict[str, Any]:
    """The embed command: JSONL of {text, image, video, role} -> float32 [N, D] .npy in input
    order."""
    config = pipeline.config
    items, _ = read_jsonl_items(config.input, config.data.on_bad_input)
    # Image paths are taken as given: relative ones from the working directory.
    embedder = Embedder.from_pipeline(pipeline)
    processor = embedder.processor
    present = [i for i, item in enumerate(items) if item is not None]
    out = np.full((len(items), embedder.output_width), np.nan, np.float32)
    before = embedder.host_snapshot()
    try:
        if present:
            out[present] = embedder([items[i] for i in present])
    finally:
        embedder.close()
    host = embedder.host_report(before)
    skipped = int(np.isnan(out).any(axis=1).sum())
    if distributed.is_primary():
        pathlib.Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        np.save(config.output, out)
        logging.info(
            "embed: wrote %s %s%s",
            config.output,
            out.shape,
            f"; {skipped} bad line(s) skipped as NaN rows: {processor.report.summary()}"
            if skipped
            else "",
        )
    logging.info("embed: host %s", host)
    return {"rows": len(items), "skipped": skipped, "host": host}
