"""A generated mini-MMEB-V2 in the hub's layout (g2e.data.mmeb_v2): seven tasks, one or two
per modality family, made of the demo's coloured shapes.

- image: ImageNet-1K (I-CLS: a centred shape, ranked against shape names) and MSCOCO_t2i
  (I-RET: a caption against the images of its list);
- video (frames of a shape moving across a pale square, saved as the release saves them):
  Kinetics-700 (V-CLS, global: the direction it moves), MSR-VTT (V-RET, global: caption to
  video), NExTQA (V-QA: which way does it move, five options) and QVHighlight (V-MRET: a video
  of three shapes one after another, the described one's clip against the other two);
- visual documents: ViDoRe_docvqa (VDR-V1, BEIR form: rendered text pages, a query naming a
  page's topic word, graded qrels).

Annotations are written as the Hub repositories hold them: parquet (jsonl for NExTQA) under
each repository's folder, with the README's `configs:` block that `datasets.load_dataset`
reads. Deterministic for a seed. The demo's prepare_demo stage writes one; by hand:

  python -m g2e.demo.mini_mmeb_v2 --out DIR [--seed 0] [--queries_per_task 24]
"""

from __future__ import annotations

import io
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pyarrow as pa
import pyarrow.parquet as pq

from g2e.data import mmeb_v2
from g2e.demo import scenes

FRAME_SIDE = 56
FRAMES_SAVED = 8
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TOPICS = ("harbour", "orchard", "glacier", "bakery", "volcano", "library", "canyon", "meadow")
SUMMARY = mmeb_v2.MANIFEST  # written last: the folder is complete
TASK_NAMES = (
    "ImageNet-1K",
    "MSCOCO_t2i",
    "Kinetics-700",
    "NExTQA",
    "MSR-VTT",
    "QVHighlight",
    "ViDoRe_docvqa",
)


def _write_repo(root: pathlib.Path, repo: str, configs: dict[str | None, dict[str, list]]):
    """One Hub dataset repository: {config (None: default): {split: rows}} as parquet files,
    and the README whose `configs:` block names them."""
    folder = root / repo
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        name = config or "default"
        lines.append(f"- config_name: {name}")
        lines.append("  data_files:")
        for split, rows in splits.items():
            path = pathlib.Path(name if config else "data") / f"{split}-00000-of-00001.parquet"
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), folder / path)
            lines += [f"  - split: {split}", f"    path: {path}"]
    (folder / "README.md").write_text("\n".join([*lines, "---", f"# {repo} (generated)", ""]))


def _moving_frames(rng: np.random.Generator, shape: str, color: str, direction: str):
    """FRAMES_SAVED frames of one shape crossing a pale square in `direction`."""
    dx, dy = DIRECTIONS[direction]
    grey = int(rng.integers(215, 246))
    r = FRAME_SIDE * 0.16
    frames = []
    for i in range(FRAMES_SAVED):
        t = -0.3 + 0.6 * i / (FRAMES_SAVED - 1)
        cx, cy = FRAME_SIDE * (0.5 + dx * t), FRAME_SIDE * (0.5 + dy * t)
        image = PIL.Image.new("RGB", (FRAME_SIDE, FRAME_SIDE), (grey, grey, grey))
        canvas = PIL.ImageDraw.Draw(image)
        if shape == "circle":
            canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=scenes.COLORS[color])
        else:
            sides = {"triangle": 3, "square": 4}[shape]
            canvas.regular_polygon((cx, cy, r), sides, fill=scenes.COLORS[color])
        frames.append(image)
    return frames


def _save_frames(folder: pathlib.Path, frames: Sequence[PIL.Image.Image]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        frame.save(folder / f"frame_{i:04d}.jpg", quality=95)


def _clip(rng: np.random.Generator) -> tuple[str, str, str]:
    return (
        scenes.pick(rng, ("circle", "triangle", "square")),
        scenes.pick(rng, ("red", "green", "blue", "yellow")),
        scenes.pick(rng, tuple(DIRECTIONS)),
    )


def _frames_root(root: pathlib.Path, family: str, task: str) -> pathlib.Path:
    return root / mmeb_v2.ASSETS_REPO / "video-tasks" / "frames" / family / task


def _image_tasks(root: pathlib.Path, rng: np.random.Generator, count: int) -> None:
    images = root / mmeb_v2.ASSETS_REPO / "image-tasks"
    cls_rows, t2i_rows = [], []
    for i in range(count):
        obj = scenes.centred(rng)
        image, _ = scenes.draw(rng, [obj])
        path = f"ImageNet-1K/{i:04d}.png"
        (images / path).parent.mkdir(parents=True, exist_ok=True)
        image.save(images / path)
        others = scenes.pick(rng, [s for s in scenes.SHAPES if s != obj.shape], 3)
        cls_rows.append(
            dict(
                qry_inst="<|image_1|> Represent the given image for classification",
                qry_text="",
                qry_img_path=path,
                tgt_inst="",
                tgt_text=[obj.shape, *others],
                tgt_img_path=["", "", "", ""],
            )
        )
    for i in range(count):
        listed = []
        for j in range(4):
            objs = scenes.objects(rng, int(rng.integers(1, 3)))
            image, _ = scenes.draw(rng, objs)
            path = f"MSCOCO_t2i/{i:04d}_{j}.png"
            (images / path).parent.mkdir(parents=True, exist_ok=True)
            image.save(images / path)
            listed.append((path, scenes.caption(objs)))
        t2i_rows.append(
            dict(
                qry_inst="Find me an everyday image that matches the given caption:",
                qry_text=listed[0][1],
                qry_img_path="",
                tgt_inst="<|image_1|> Represent the given image.",
                tgt_text=["" for _ in listed],
                tgt_img_path=[p for p, _ in listed],
            )
        )
    _write_repo(  # both tasks are configs of one repository
        root,
        mmeb_v2.IMAGE_REPO,
        {"ImageNet-1K": {"test": cls_rows}, "MSCOCO_t2i": {"test": t2i_rows}},
    )


def _video_tasks(root: pathlib.Path, rng: np.random.Generator, count: int) -> None:
    cls_rows, ret_rows, qa_rows = [], [], []
    for i in range(count):
        shape, color, direction = _clip(rng)
        video = f"cls{i:04d}"
        _save_frames(
            _frames_root(root, "video_cls", "Kinetics-700") / video,
            _moving_frames(rng, shape, color, direction),
        )
        cls_rows.append(dict(video_id=video, pos_text=f"moving {direction}"))
        shape, color, direction = _clip(rng)
        video = f"video{i:04d}"
        _save_frames(
            _frames_root(root, "video_ret", "MSR-VTT") / video,
            _moving_frames(rng, shape, color, direction),
        )
        caption = f"a {color} {shape} moves {direction}"
        ret_rows.append(dict(video_id=video, video=f"{video}.mp4", caption=caption))
        shape, color, direction = _clip(rng)
        video = f"qa{i:04d}"
        _save_frames(
            _frames_root(root, "video_qa", "NExTQA") / video,
            _moving_frames(rng, shape, color, direction),
        )
        options = [*DIRECTIONS, "it does not move"]
        qa_rows.append(
            dict(
                video=video,
                question=f"Which way does the {color} {shape} move?",
                answer=options.index(direction),
                qid=i,
                type="TC",
                **{f"a{k}": option for k, option in enumerate(options)},
            )
        )
    _write_repo(root, "VLM2Vec/Kinetics-700", {None: {"test": cls_rows}})
    _write_repo(root, "VLM2Vec/MSR-VTT", {"test_1k": {"test": ret_rows}})
    _write_repo(root, "VLM2Vec/NExTQA", {"MC": {"test": qa_rows}})
    _moment_task(root, rng, count)


def _moment_task(root: pathlib.Path, rng: np.random.Generator, count: int) -> None:
    """QVHighlight: three clips in a row; the query describes one of them."""
    rows = []
    for i in range(count):
        video = f"moment{i:04d}"
        folder = _frames_root(root, "video_mret", "QVHighlight") / video
        clips = []
        while len({c[:2] for c in clips}) < 3:
            clips = [_clip(rng) for _ in range(3)]
        frames = [_moving_frames(rng, *clip) for clip in clips]
        target = int(rng.integers(0, 3))
        whole = [frame for clip_frames in frames for frame in clip_frames[::3]]
        _save_frames(folder / "query", whole)
        for k, clip_frames in enumerate(frames):
            name = "positive" if k == target else f"negative_{k}"
            _save_frames(folder / name, clip_frames)
        shape, color, direction = clips[target]
        rows.append(dict(query=f"the {color} {shape} moves {direction}", video_path=f"{video}.mp4"))
    _write_repo(root, "VLM2Vec/QVHighlight", {None: {"test": rows}})


def _page(rng: np.random.Generator, topic: str) -> bytes:
    """A rendered text page about `topic` (PNG bytes)."""
    page = PIL.Image.new("RGB", (112, 112), (250, 250, 245))
    canvas = PIL.ImageDraw.Draw(page)
    words = [topic.upper(), *scenes.pick(rng, [t for t in TOPICS if t not in topic], 3)]
    for line, word in enumerate(words):
        canvas.text((6, 6 + 26 * line), word, fill=(20, 20, 20))
    out = io.BytesIO()
    page.save(out, format="PNG")
    return out.getvalue()


def _visdoc_task(root: pathlib.Path, rng: np.random.Generator, count: int) -> None:
    """ViDoRe_docvqa in BEIR form: two pages per topic (the titled one graded 2, the other 1)."""
    corpus, queries, qrels = [], [], []
    for i in range(count):
        topic = f"{TOPICS[i % len(TOPICS)]} {i // len(TOPICS) + 1}"  # one per query
        for k, gain in ((0, 2), (1, 1)):
            page_id = f"page{i:03d}_{k}"
            corpus.append(
                {"corpus-id": page_id, "image": {"bytes": _page(rng, topic), "path": None}}
            )
            qrels.append({"query-id": f"q{i:03d}", "corpus-id": page_id, "score": gain})
        queries.append({"query-id": f"q{i:03d}", "query": f"Which page is about the {topic}?"})
    queries.append({"query-id": "unjudged", "query": "A query without qrels is not scored."})
    _write_repo(
        root,
        "vidore/docvqa_test_subsampled_beir",
        {"corpus": {"test": corpus}, "queries": {"test": queries}, "qrels": {"test": qrels}},
    )


def write(out: str | pathlib.Path, *, seed: int = 0, queries_per_task: int = 12) -> dict[str, Any]:
    """Writes the mini-MMEB-V2 under `out` (a fresh folder); returns a summary of it."""
    root = pathlib.Path(out)
    rng = np.random.default_rng(seed)
    _image_tasks(root, rng, queries_per_task)
    _video_tasks(root, rng, queries_per_task)
    _visdoc_task(root, rng, queries_per_task)
    summary = {"tasks": list(TASK_NAMES), "queries_per_task": queries_per_task, "seed": seed}
    (root / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(description="Writes a generated mini-MMEB-V2.")
    parser.add_argument("--out", required=True, help="a folder that does not exist yet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries_per_task", type=int, default=24)
    args = parser.parse_args(argv)
    if pathlib.Path(args.out).exists():
        parser.error(f"--out {args.out} exists; give a new folder")
    print(json.dumps(write(args.out, seed=args.seed, queries_per_task=args.queries_per_task)))


if __name__ == "__main__":
    main()
