"""TFDS array_record builders: round trip on a mini-MMEB, bad input; the image tables on a
synthetic MMEB (each image stored and decoded once, rows read lazily)."""

import hashlib
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from g2e.data import images, mmeb, synthetic_mmeb, tfds_builders, tfds_rows
from g2e.data import rows as rows_lib
from g2e.data.errors import BadInput, BadInputReport
from g2e.demo import mini_mmeb

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


def _same_image(got, want, images, source):
    """`got` (an ImageRef) names the file `want` names, relative to `source`, and reads back
    its exact bytes."""
    if want is None:
        return got is None
    return got.key == os.path.relpath(want, source) and got.read() == images[want]


def _same(got, want, images, source):
    """`got` (TFDS rows, image references) equals `want` (parquet rows, absolute paths)."""
    for field in got.__dataclass_fields__:
        a, b = getattr(got, field), getattr(want, field)
        if field in ("qry_image", "pos_image", "neg_image"):
            assert _same_image(a, b, images, source), field
        elif field == "tgt_images":
            assert len(a) == len(b)
            assert all(_same_image(x, y, images, source) for x, y in zip(a, b)), field
        else:
            assert a == b, field


def test_round_trip_every_row_with_byte_identical_images(prepared):
    data_dir, expected, images, source_dir = prepared
    assert len(expected) == 6 * 2 + 10
    for (kind, subset, split), rows in expected.items():
        source = tfds_rows.RowSource(kind, data_dir, subset, split)
        assert len(source) == len(rows) > 0
        for got, want in zip(source, rows):
            _same(got, want, images, source_dir)


def test_records_keep_the_parquet_image_paths(prepared):
    data_dir, expected, _, source = prepared
    records = tfds_rows.RowSource("eval", data_dir, "ShapeEdit", "test").records
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
        tfds_rows.RowSource("train", str(tmp_path), "ShapeCls", "original")
    with pytest.raises(KeyError, match="splits"):
        tfds_rows.RowSource("eval", data_dir, "ShapeCls", "original")


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
    got = tfds_rows.RowSource("train", str(tmp_path / "b"), "ShapeCls", "original")
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
    rows = tfds_rows.RowSource("train", data_dir, "ShapeVQA", "diverse_instruction")
    assert len(rows) == 3 and rows[0].qry_image.read().startswith(b"\xff\xd8")  # JPEG bytes
    assert sorted(os.listdir(os.path.join(data_dir, "mmeb_train"))) == ["ShapeCls", "ShapeVQA"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A small synthetic MMEB whose eval candidate lists share images heavily (12 rows x 12
    candidates from a pool of 12), its TFDS copy, and the load_image calls preparing it made."""
    root = tmp_path_factory.mktemp("synthetic")
    source, data_dir = str(root / "source"), str(root / "tfds")
    synthetic_mmeb.build(
        source,
        rows=16,
        eval_queries=12,
        candidates=12,
        image_scale=0.1,
        pool=6,
        page_fraction=0.25,
        seed=7,
    )
    decoded = []
    load_image = images.load_image

    def counting_load_image(source, **kwargs):
        decoded.append(hashlib.sha1(bytes(source)).hexdigest())
        return load_image(source, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(images, "load_image", counting_load_image)
        for kind in ("train", "eval"):
            folder = os.path.join(source, kind)
            tfds_builders.prepare(kind, folder, source, mmeb.list_subsets(folder), data_dir)
    return source, data_dir, decoded


def _parquet_rows(source, kind, subset, split):
    folder = os.path.join(source, kind)
    if kind == "eval":
        return mmeb.read_eval_subset(folder, subset, source)
    return mmeb.read_train_subset(folder, subset, split, source)


def _unique_images(source, kind, subset):
    splits = mmeb.TRAIN_SPLITS if kind == "train" else (mmeb.EVAL_SPLIT,)
    return {
        path: None
        for split in splits
        for row in _parquet_rows(source, kind, subset, split)
        for path in _image_paths(row)
    }


def test_every_unique_image_is_read_and_decoded_once_while_preparing(synthetic):
    source, _, decoded = synthetic
    unique = [
        path
        for kind in ("train", "eval")
        for subset in mmeb.list_subsets(os.path.join(source, kind))
        for path in _unique_images(source, kind, subset)
    ]
    assert len(decoded) == len(unique)
    # Each decode was of a distinct file (synthetic files have distinct bytes).
    assert sorted(decoded) == sorted(hashlib.sha1(_read(p)).hexdigest() for p in unique)


def test_the_eval_copy_stores_each_image_once(synthetic):
    source, data_dir, _ = synthetic
    for subset in mmeb.list_subsets(os.path.join(source, "eval")):
        rows = _parquet_rows(source, "eval", subset, mmeb.EVAL_SPLIT)
        unique = list(_unique_images(source, "eval", subset))
        named = [p for row in rows for p in _image_paths(row)]
        table = tfds_rows.RowSource("eval", data_dir, subset, "test").table
        records = tfds_builders.builder("eval", data_dir, subset).as_data_source(split="images")
        # The table: each image once, in order of first use, with the path the parquet named.
        assert [r["image_path"].decode() for r in records] == [
            os.path.relpath(p, source) for p in unique
        ]
        assert [table.read_image(i) for i in range(len(unique))] == [_read(p) for p in unique]
        # Its size is the unique images' bytes (plus small records), not rows x candidates.
        info = tfds_builders.builder("eval", data_dir, subset).info
        unique_bytes = sum(os.path.getsize(p) for p in unique)
        images_bytes = info.splits["images"].num_bytes
        rows_bytes = info.splits["test"].num_bytes
        assert unique_bytes < images_bytes < unique_bytes + 300 * len(unique)
        entries = sum(1 + len(row.tgt_texts) for row in rows)
        assert rows_bytes < 200 * entries  # texts, paths and ids only
        folder = os.path.join(data_dir, "mmeb_eval", subset, tfds_builders.VERSION)
        files = [f for f in os.listdir(folder) if ".array_record" in f]
        on_disk = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
        assert on_disk <= images_bytes + rows_bytes + len(files) * 128 * 1024  # block padding
        if subset.startswith("SynthRet"):  # 12 candidate images per row, 12 in all
            assert (len(named), len(unique)) == (12 * 12, 12)
            named_bytes = sum(os.path.getsize(p) for p in named)
            assert images_bytes + rows_bytes < named_bytes / 4


def _count_table_reads(monkeypatch) -> list:
    reads = []
    read_image = tfds_rows.ImageTable.read_image

    def counting(self, image_id):
        reads.append(image_id)
        return read_image(self, image_id)

    monkeypatch.setattr(tfds_rows.ImageTable, "read_image", counting)
    return reads


def test_eval_rows_are_lazy_and_equal_the_parquet_rows(synthetic, monkeypatch):
    source, data_dir, _ = synthetic
    reads = _count_table_reads(monkeypatch)
    for subset in mmeb.list_subsets(os.path.join(source, "eval")):
        reads.clear()
        want = _parquet_rows(source, "eval", subset, mmeb.EVAL_SPLIT)
        got = list(tfds_rows.RowSource("eval", data_dir, subset, "test"))
        keys = [images.image_key(i) for row in got for i in (row.qry_image, *row.tgt_images)]
        assert reads == []  # rows and their keys read no image bytes
        assert keys == [
            os.path.relpath(i, source) if i else ""
            for row in want
            for i in (row.qry_image, *row.tgt_images)
        ]
        # Rows naming one image share one reference.
        refs = {id(i) for row in got for i in row.tgt_images if i is not None}
        assert len(refs) == len({i for row in want for i in row.tgt_images if i})
        files = {p: _read(p) for row in want for p in _image_paths(row)}
        for g, w in zip(got, want, strict=True):
            _same(g, w, files, source)  # reads every image through its reference


def test_train_rows_carry_path_keys_and_read_no_image_bytes(synthetic, monkeypatch):
    source, data_dir, _ = synthetic
    reads = _count_table_reads(monkeypatch)
    for subset in mmeb.list_subsets(os.path.join(source, "train")):
        for split in mmeb.TRAIN_SPLITS:
            got = tfds_rows.RowSource("train", data_dir, subset, split)
            queries, positives = rows_lib.train_row_keys(got)
            want = _parquet_rows(source, "train", subset, split)
            relative = lambda p: os.path.relpath(p, source) if p else ""  # noqa: E731
            assert queries == [(r.qry_text, relative(r.qry_image)) for r in want]
            assert positives == [(r.pos_text, relative(r.pos_image)) for r in want]
    assert reads == []
    row = tfds_rows.RowSource("train", data_dir, "SynthCls_0", "original")[3]
    assert images.load_image(row.qry_image).size == (64, 48) and len(reads) == 1
    # Both splits name the same images: the train table holds them once.
    table = tfds_builders.builder("train", data_dir, "SynthCls_0").info.splits["images"]
    assert table.num_examples == len(_unique_images(source, "train", "SynthCls_0")) == 4


def test_image_references_pickle_small_and_reopen_the_table(synthetic):
    _, data_dir, _ = synthetic
    row = tfds_rows.RowSource("eval", data_dir, "SynthRet_2", "test")[0]
    row.tgt_images[0].read()  # the table is open now; the pickle must not carry it
    data = pickle.dumps(row)
    assert len(data) < 4000
    copy = pickle.loads(data)
    assert copy == row and copy.tgt_images[1].read() == row.tgt_images[1].read()


def test_a_copy_of_an_older_layout_must_be_prepared_again(synthetic, tmp_path):
    from g2e import configuration
    from g2e.data import rows

    _, data_dir, _ = synthetic
    old = tmp_path / "tfds"
    shutil.copytree(data_dir, old)
    folder = old / "mmeb_eval" / "SynthVQA_1"
    (folder / tfds_builders.VERSION).rename(folder / "1.0.0")
    with pytest.raises(tfds_rows.OutdatedCopyError, match=r"1\.0\.0.*prepare it again"):
        tfds_rows.RowSource("eval", str(old), "SynthVQA_1", "test")
    data = configuration.base_config().data
    data.format, data.tfds_dir, data.on_bad_input = "tfds", str(old), "skip"
    with pytest.raises(tfds_rows.OutdatedCopyError, match="SynthVQA_1"):
        rows.list_eval_subsets(data)
    with pytest.raises(tfds_rows.OutdatedCopyError):  # not skipped as a missing subset
        rows.eval_rows(data, "SynthVQA_1", BadInputReport("skip"))
    assert len(rows.eval_rows(data, "SynthCls_0", BadInputReport("skip"))) == 12
