"""TFDS array_record builders: round trip on a mini-MMEB, bad input."""

import os
import shutil
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from g2e.data import mmeb, tfds_builders
from g2e.demo import mini_mmeb
from g2e.data.errors import BadInput

tfds.disable_progress_bar()


def _read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny mini-MMEB, its TFDS copy, and the rows the parquet readers give."""
    root = tmp_path_factory.mktemp("tfds")
    source = str(root / "mini")
    mini_mmeb.build(source, seed=1, train_rows=6, eval_queries=4, candidates=4)
    train_dir, eval_dir = os.path.join(source, "train"), os.path.join(source, "eval")
    expected = {}
    for subset in mmeb.list_subsets(train_dir):
        for split in mmeb.TRAIN_SPLITS:
            expected["train", subset, split] = mmeb.read_train_subset(
                train_dir, subset, split, source
            )
    for subset in mmeb.list_subsets(eval_dir):
        expected["eval", subset, "test"] = mmeb.read_eval_subset(eval_dir, subset, source)
    data_dir = str(root / "data")
    report = tfds_builders.prepare(
        "train", train_dir, source, mmeb.list_subsets(train_dir), data_dir
    )
    report = tfds_builders.prepare("eval", eval_dir, source, mmeb.list_subsets(eval_dir), data_dir)
    assert report.total == 0
    # Only the prepared copy is read below: the images are inside it.
    images = {
        row_path: _read(row_path)
        for rows in expected.values()
        for row in rows
        for row_path in _image_paths(row)
    }
    shutil.rmtree(source)
    return data_dir, expected, images, source


def _image_paths(row):
    if isinstance(row, mmeb.TrainRow):
        return [p for p in (row.qry_image, row.pos_image, row.neg_image) if p]
    return [p for p in (row.qry_image, *row.tgt_images) if p]


def _same(got, want, images):
    """`got` (bytes images) equals `want` (path images) with the files' exact bytes."""
    for field in got.__dataclass_fields__:
        a, b = getattr(got, field), getattr(want, field)
        if field in ("qry_image", "pos_image", "neg_image"):
            assert a == (images[b] if b else None), field
        elif field == "tgt_images":
            assert a == tuple(images[p] if p else None for p in b)
        else:
            assert a == b, field


def test_round_trip_every_row_with_byte_identical_images(prepared):
    data_dir, expected, images, _ = prepared
    assert len(expected) == 6 * 2 + 10
    for (kind, subset, split), rows in expected.items():
        source = tfds_builders.RowSource(kind, data_dir, subset, split)
        assert len(source) == len(rows) > 0
        for got, want in zip(source, rows):
            _same(got, want, images)


def test_records_keep_the_parquet_image_paths(prepared):
    data_dir, expected, _, source = prepared
    records = tfds_builders.RowSource("eval", data_dir, "ShapeEdit", "test").records
    row = expected["eval", "ShapeEdit", "test"][2]
    text = lambda v: v.decode() if isinstance(v, bytes) else v
    assert text(records[2]["qry_image_path"]) == os.path.relpath(row.qry_image, source)
    assert [text(p) for p in records[2]["tgt_image_path"]] == [
        os.path.relpath(p, source) for p in row.tgt_images
    ]
    assert text(records[2]["qry_image_path"]).startswith("images/ShapeEdit/Test/")


def test_unprepared_subset_and_missing_split_say_what_to_do(prepared, tmp_path):
    data_dir = prepared[0]
    with pytest.raises(FileNotFoundError, match="python -m g2e.data.tfds_builders"):
        tfds_builders.RowSource("train", str(tmp_path), "ShapeCls", "original")
    with pytest.raises(KeyError, match="splits"):
        tfds_builders.RowSource("eval", data_dir, "ShapeCls", "original")


def test_corrupt_image_is_found_while_building(tmp_path):
    source = str(tmp_path / "mini")
    mini_mmeb.build(source, seed=2, train_rows=4, eval_queries=3, candidates=3)
    train_dir = os.path.join(source, "train")
    row = mmeb.read_train_subset(train_dir, "ShapeCls", "original", source)[1]
    with open(row.qry_image, "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(
        BadInput,
        match=rf"subset 'ShapeCls', row 1, file '{row.qry_image}': "
        "cannot decode image",
    ):
        tfds_builders.prepare("train", train_dir, source, ["ShapeCls"], str(tmp_path / "a"))
    report = tfds_builders.prepare(
        "train", train_dir, source, ["ShapeCls", "Nope"], str(tmp_path / "b"), on_bad_input="skip"
    )
    # Row 1 is in both splits (same image); the unknown subset is skipped whole.
    assert report.counts == {("ShapeCls", "cannot decode image"): 2, ("Nope", "unknown subset"): 1}
    got = tfds_builders.RowSource("train", str(tmp_path / "b"), "ShapeCls", "original")
    assert [r.index for r in got] == [0, 2, 3]


def test_command_line_prepares_a_readable_copy(tmp_path):
    source = str(tmp_path / "mini")
    mini_mmeb.build(source, seed=5, train_rows=3, eval_queries=2, candidates=2)
    data_dir = str(tmp_path / "data")
    command = [
        sys.executable,
        "-m",
        "g2e.data.tfds_builders",
        "--kind",
        "train",
        "--source",
        os.path.join(source, "train"),
        "--image_root",
        source,
        "--data_dir",
        data_dir,
        "--subsets",
        "ShapeCls,ShapeVQA",
    ]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=repo)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "prepared 2 train subsets" in done.stdout
    assert "bad input: none skipped" in done.stdout
    rows = tfds_builders.RowSource("train", data_dir, "ShapeVQA", "diverse_instruction")
    assert len(rows) == 3 and rows[0].qry_image.startswith(b"\xff\xd8")  # JPEG bytes
    assert sorted(os.listdir(os.path.join(data_dir, "mmeb_train"))) == ["ShapeCls", "ShapeVQA"]
