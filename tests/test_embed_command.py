"""The embed command end to end, as a user runs it:

  python -m g2e.main --config=configs/embed.py --config.model_dir=DIR \
      --config.input=IN.jsonl --config.output=OUT.npy

It must match transformers' PyTorch model with the docs/method.md §1 prompt, one example at a time
(within 1e-4), keep input order, and handle bad lines: a clear error naming the file and line
under the default on_bad_input=error; NaN rows and a count under on_bad_input=skip.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from g2e.data.preprocess import EmbedItem
from tests import assets

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "embed.py"

# (text, image path relative to the run directory or None, role)
GOOD_LINES = [
    ("a red circle and a blue square", None, "query"),
    # Image and text without a placeholder: the image goes first.
    (
        "Represent the given image with the following question: What shape is in the image?",
        "images/wide.png",
        "query",
    ),
    ("a red circle", None, "candidate"),
    ("<|image_1|>\nFind me an everyday image that matches the caption", "tall.jpg", "query"),
    ("a photo of a dog", "images/wide.png", "candidate"),
    ("", "tall.jpg", "candidate"),  # Image only.
    ("Find me an everyday image that matches the caption: a man holding a cup", None, "query"),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return assets.tiny_checkpoint(tmp_path_factory.mktemp("embed_command_ckpt"), seed=7)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The working directory of the command runs, holding the images (paths relative to it)."""
    directory = tmp_path_factory.mktemp("embed_command_run")
    (directory / "images").mkdir()
    assets.noise_image(84, 168, seed=1).save(directory / "images" / "wide.png")
    assets.noise_image(140, 84, seed=2).save(directory / "tall.jpg", quality=95)
    return directory


def write_jsonl(path: pathlib.Path, lines: list) -> pathlib.Path:
    """Writes JSONL; a str entry is written verbatim (a malformed line), a tuple as an object."""
    with open(path, "w") as handle:
        for line in lines:
            if isinstance(line, str):
                handle.write(line + "\n")
            else:
                text, image, role = line
                handle.write(json.dumps({"text": text, "image": image, "role": role}) + "\n")
    return path


def run_embed(
    run_dir: pathlib.Path, model_dir: pathlib.Path, name: str, *extra: str, devices: int = 1
) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )
    command = [
        sys.executable,
        "-m",
        "g2e.main",
        f"--config={CONFIG}",
        f"--config.model_dir={model_dir}",
        f"--config.input={name}.jsonl",
        f"--config.output=out/{name}.npy",
        f"--config.workdir=work_{name}",
        *extra,
    ]
    return subprocess.run(
        command, cwd=run_dir, env=env, capture_output=True, text=True, timeout=300
    )


def reference(checkpoint, run_dir, line) -> np.ndarray:
    torch_model, directory = checkpoint
    text, image, role = line
    item = EmbedItem(text, None if image is None else str(run_dir / image), role)
    return assets.reference_embedding(torch_model, directory, item)


@pytest.mark.parametrize(
    "packing",
    [(), ("--config.data.pack_length=2048", "--config.eval.batch_size=1")],
    ids=["one-per-row", "packed"],
)
def test_embed_command_matches_transformers(checkpoint, run_dir, packing):
    name = "packed" if packing else "good"
    write_jsonl(run_dir / f"{name}.jsonl", GOOD_LINES)
    # 8 devices: the command shards its batches over a data=8 mesh.
    result = run_embed(run_dir, checkpoint[1], name, *packing, devices=8)
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(run_dir / "out" / f"{name}.npy")
    assert out.dtype == np.float32 and out.shape == (len(GOOD_LINES), 64)
    for index, line in enumerate(GOOD_LINES):
        np.testing.assert_allclose(
            out[index],
            reference(checkpoint, run_dir, line),
            atol=1e-4,
            rtol=0,
            err_msg=f"line {index + 1}: {line}",
        )


BAD_LINES = {
    "malformed": (
        '{"text": "a red circle", "image": null, "role": "query"',
        ["malformed.jsonl, line 2"],
    ),
    "role": (
        json.dumps({"text": "a red circle", "image": None, "role": "answer"}),
        ["role.jsonl, line 2", "'answer'", "query", "candidate"],
    ),
    "missing": (
        json.dumps({"text": "a cat", "image": "images/missing.png", "role": "query"}),
        [
            "missing image",
            "images/missing.png",
            "line 2 of missing.jsonl",
            "relative path is taken from the working directory",
        ],
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_line_stops_with_named_error(checkpoint, run_dir, kind):
    bad, expected = BAD_LINES[kind]
    write_jsonl(run_dir / f"{kind}.jsonl", [GOOD_LINES[0], bad, GOOD_LINES[1]])
    result = run_embed(run_dir, checkpoint[1], kind)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    for fragment in expected:
        assert fragment in last_line, (fragment, result.stderr[-3000:])
    assert not (run_dir / "out" / f"{kind}.npy").exists()


def test_skip_bad_lines_gives_nan_rows_and_count(checkpoint, run_dir):
    lines = [
        GOOD_LINES[1],
        BAD_LINES["malformed"][0],
        GOOD_LINES[0],
        BAD_LINES["role"][0],
        BAD_LINES["missing"][0],
        GOOD_LINES[3],
    ]
    write_jsonl(run_dir / "skip.jsonl", lines)
    result = run_embed(run_dir, checkpoint[1], "skip", "--config.data.on_bad_input=skip")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 bad line(s) skipped as NaN rows" in result.stdout + result.stderr
    out = np.load(run_dir / "out" / "skip.npy")
    assert out.shape == (len(lines), 64)
    bad_rows = [1, 3, 4]
    assert np.isnan(out[bad_rows]).all()
    for row in sorted(set(range(len(lines))) - set(bad_rows)):
        np.testing.assert_allclose(
            out[row],
            reference(checkpoint, run_dir, lines[row]),
            atol=1e-4,
            rtol=0,
            err_msg=f"line {row + 1}",
        )


def test_a_long_text_and_a_small_image_share_a_batch(checkpoint, run_dir):
    """One batch holds a text-only item of a long length bucket and an image item of a short
    one: its shape is the largest of each dimension (it used to fail with "collate: (length=128,
    num_patches=1024) cannot hold an encoding of 273 tokens")."""
    words = (
        "a red circle next to a blue square under a green star near the yellow cross "
        "and beside the orange pentagon"
    ).split()
    long_text = " ".join(words[i % len(words)] for i in range(100))
    lines = [(long_text, None, "query"), GOOD_LINES[1]]
    write_jsonl(run_dir / "mixed.jsonl", lines)
    result = run_embed(run_dir, checkpoint[1], "mixed")
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(run_dir / "out" / "mixed.npy")
    for index, line in enumerate(lines):
        np.testing.assert_allclose(
            out[index],
            reference(checkpoint, run_dir, line),
            atol=1e-4,
            rtol=0,
            err_msg=f"line {index + 1}",
        )


def test_python_api_equals_the_command_line_by_line(checkpoint, run_dir, monkeypatch):
    """`g2e.Embedder.from_pretrained(DIR).embed(...)`: the embed command's vectors, in
    order; an image may be given as a path (from the working directory) or a PIL image."""
    from PIL import Image

    from g2e import Embedder

    write_jsonl(run_dir / "api.jsonl", GOOD_LINES)
    result = run_embed(run_dir, checkpoint[1], "api", devices=8)
    assert result.returncode == 0, result.stderr[-3000:]
    command = np.load(run_dir / "out" / "api.npy")
    monkeypatch.chdir(run_dir)
    embedder = Embedder.from_pretrained(checkpoint[1])
    for role in ("query", "candidate"):
        lines = [i for i, line in enumerate(GOOD_LINES) if line[2] == role]
        texts = [GOOD_LINES[i][0] for i in lines]
        images = [GOOD_LINES[i][1] for i in lines]
        vectors = embedder.embed(texts, images, role=role)
        assert vectors.dtype == np.float32 and vectors.shape == (len(lines), 64)
        np.testing.assert_allclose(vectors, command[lines], atol=1e-6, rtol=0)
        pil = [None if path is None else Image.open(run_dir / path) for path in images]
        np.testing.assert_allclose(
            embedder.embed(texts, pil, role=role), vectors, atol=1e-6, rtol=0
        )


@pytest.fixture(scope="module")
def qwen25_checkpoint(tmp_path_factory):
    return assets.tiny_checkpoint(
        tmp_path_factory.mktemp("qwen25_ckpt"), seed=5, model_type="qwen2_5_vl"
    )


@pytest.mark.slow
def test_embed_command_on_a_qwen2_5_vl_checkpoint(qwen25_checkpoint, run_dir):
    """The model type comes from config.json: a Qwen2.5-VL directory (windowed vision
    attention) embeds like transformers' Qwen2_5_VLForConditionalGeneration."""
    checkpoint = qwen25_checkpoint
    lines = GOOD_LINES[:4]
    write_jsonl(run_dir / "qwen25.jsonl", lines)
    # Packed: the windows of images of several inputs in one row stay their own.
    result = run_embed(
        run_dir,
        checkpoint[1],
        "qwen25",
        "--config.data.pack_length=2048",
        "--config.eval.batch_size=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(run_dir / "out" / "qwen25.npy")
    for index, line in enumerate(lines):
        np.testing.assert_allclose(
            out[index],
            reference(checkpoint, run_dir, line),
            atol=1e-4,
            rtol=0,
            err_msg=f"line {index + 1}: {line}",
        )


@pytest.mark.slow
def test_mmeb_evaluation_of_a_qwen2_5_vl_checkpoint(qwen25_checkpoint, tmp_path):
    """A short MMEB evaluation (two mini-MMEB subsets) on the 2.5 checkpoint scores every row
    as transformers' embeddings do, each query and candidate embedded on its own."""
    from g2e import Embedder
    from g2e.data import mmeb
    from g2e.demo import mini_mmeb
    from g2e.evaluation import mmeb as evaluation

    data = tmp_path / "mini"
    mini_mmeb.build(str(data), seed=1, train_rows=1, eval_queries=4, candidates=3)
    embedder = Embedder.from_pretrained(qwen25_checkpoint[1])
    results = evaluation.evaluate_mmeb(
        embedder,
        eval_dir=str(data / "eval"),
        image_root=str(data),
        out_dir=str(tmp_path / "out"),
        subsets="ShapeCls,ShapeCaption_t2i",
        progress=False,
    )
    assert sorted(results["subsets"]) == ["ShapeCaption_t2i", "ShapeCls"]
    torch_model, directory = qwen25_checkpoint

    @functools.cache  # candidates repeat across rows; each is still embedded on its own
    def reference_of(text, image, role, subset):
        item = EmbedItem(text, image, role, subset)
        return assets.reference_embedding(torch_model, directory, item)

    for name, result in results["subsets"].items():
        correct = []
        for row in mmeb.read_eval_subset(str(data / "eval"), name, str(data)):
            query = reference_of(row.qry_text, row.qry_image, "query", name)
            scores = [
                float(query @ reference_of(text, image, "candidate", name))
                for text, image in zip(row.tgt_texts, row.tgt_images)
            ]
            # The evaluator's rule: right when no other candidate scores above the positive
            # (the first); a margin far above rounding, so g2e cannot decide it otherwise.
            others = max(scores[1:])
            assert abs(scores[0] - others) > 1e-4, ("a near tie", name, scores)
            correct.append(scores[0] >= others)
        assert result["num_queries"] == len(correct) == 4
        assert result["correct"] == "".join("1" if c else "0" for c in correct), name
        assert result["precision_at_1"] == pytest.approx(100.0 * np.mean(correct))
    assert results["overall"] == pytest.approx(
        np.mean([r["precision_at_1"] for r in results["subsets"].values()])
    )


def test_video_lines_equal_embed_items(checkpoint, run_dir, monkeypatch):
    """Lines with "video" (frame paths, a folder, a video file; with and without text or an
    image) give `Embedder.embed_items`' vectors for the same items, in order."""
    from g2e import Embedder
    from tests.data.test_videos import write_video

    frames = run_dir / "clip"
    frames.mkdir()
    for i in range(5):
        assets.noise_image(56, 84, seed=10 + i).save(frames / f"frame{i}.png")
    write_video(run_dir / "clip.mp4", [20 * i for i in range(9)])
    listed = [f"clip/frame{i}.png" for i in (4, 0, 2)]
    lines = [
        {"text": "a cat jumps", "video": listed, "role": "query"},
        {"text": "", "video": "clip", "role": "candidate"},
        {"text": "a red circle", "image": None, "role": "candidate"},
        {"text": "<|video_1|> what moves?", "image": "tall.jpg", "video": "clip", "role": "query"},
        {"text": "a fading clip", "video": "clip.mp4", "role": "candidate"},
    ]
    with open(run_dir / "video.jsonl", "w") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in lines)
    result = run_embed(run_dir, checkpoint[1], "video")
    assert result.returncode == 0, result.stderr[-3000:]
    command = np.load(run_dir / "out" / "video.npy")
    monkeypatch.chdir(run_dir)
    embedder = Embedder.from_pretrained(checkpoint[1])
    items = [
        EmbedItem(line["text"], line.get("image"), line["role"], video=line.get("video"))
        for line in lines
    ]
    expected = embedder.embed_items(items)
    np.testing.assert_allclose(command, expected, atol=1e-6, rtol=0)
    # The video really counts: other frames give another vector.
    other = embedder.embed_items([EmbedItem("a cat jumps", None, "query", video=listed[::-1])])
    assert np.abs(other[0] - expected[0]).max() > 1e-3
