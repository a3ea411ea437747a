"""Reading MMEB's parquet layout into rows, and the bad-input rules of the readers."""

import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from g2e.data import mmeb
from g2e.data.errors import BadInput, BadInputReport
from g2e.demo import mini_mmeb


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("src") / "mmeb")
    mini_mmeb.build(out, seed=0, train_rows=5, eval_queries=4, candidates=4)
    return out


@pytest.fixture
def mini(source, tmp_path) -> str:
    """A private copy the test may damage."""
    out = str(tmp_path / "mmeb")
    shutil.copytree(source, out)
    return out


def _parquet(root, kind, subset):
    name = "original" if kind == "train" else "test"
    return os.path.join(root, kind, subset, f"{name}-00000-of-00001.parquet")


def _rewrite(path, column, row, value):
    table = pq.read_table(path).to_pylist()
    table[row][column] = value
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(path)), path)


def test_list_subsets(source):
    assert mmeb.list_subsets(os.path.join(source, "train")) == sorted(
        n for n, (_, g, _) in mini_mmeb.SUBSETS.items() if g == "IND"
    )
    assert len(mmeb.list_subsets(os.path.join(source, "eval"))) == len(mini_mmeb.SUBSETS)


def test_train_rows_match_parquet_with_absolute_paths(source):
    rows = mmeb.read_train_subset(
        os.path.join(source, "train"), "ShapeCaption_t2i", "diverse_instruction", source
    )
    records = pq.read_table(
        os.path.join(
            source, "train", "ShapeCaption_t2i", "diverse_instruction-00000-of-00001.parquet"
        )
    ).to_pylist()
    assert [r.index for r in rows] == list(range(len(records)))
    for row, rec in zip(rows, records):
        assert (row.subset, row.qry_text, row.pos_text) == (
            "ShapeCaption_t2i",
            rec["qry"],
            rec["pos_text"],
        )
        assert row.qry_image is None and row.neg_image is None
        assert row.pos_image == os.path.join(source, rec["pos_image_path"])
        assert os.path.isfile(row.pos_image)


def test_eval_rows_keep_candidates_in_order(source):
    rows = mmeb.read_eval_subset(os.path.join(source, "eval"), "ShapeGround", source)
    records = pq.read_table(_parquet(source, "eval", "ShapeGround")).to_pylist()
    for row, rec in zip(rows, records):
        assert row.tgt_texts == tuple(rec["tgt_text"])
        assert row.tgt_images == tuple(os.path.join(source, p) for p in rec["tgt_img_path"])
        assert row.qry_image == os.path.join(source, rec["qry_img_path"])


def test_split_folder_layout_is_read_too(mini):
    # The hub also stores splits as <Subset>/<split>/*.parquet.
    folder = os.path.join(mini, "eval", "ShapeCls")
    os.makedirs(os.path.join(folder, "test"))
    shutil.move(
        os.path.join(folder, "test-00000-of-00001.parquet"),
        os.path.join(folder, "test", "part-0.parquet"),
    )
    rows = mmeb.read_eval_subset(os.path.join(mini, "eval"), "ShapeCls", mini)
    assert len(rows) == 4 and rows[0].tgt_images[0] is None


def test_unknown_subset(source):
    with pytest.raises(BadInput, match="subset 'Nope': unknown subset"):
        mmeb.read_train_subset(os.path.join(source, "train"), "Nope", "original", source)
    report = BadInputReport("skip")
    assert mmeb.read_eval_subset(os.path.join(source, "eval"), "Nope", source, report) == []
    assert report.counts == {("Nope", "unknown subset"): 1}


def test_known_subset_without_files_names_the_folder(source):
    with pytest.raises(BadInput, match=r"CountCls.*no parquet files.*split 'original'"):
        mmeb.read_train_subset(os.path.join(source, "train"), "CountCls", "original", source)


def test_missing_columns_name_file_and_columns(mini):
    path = _parquet(mini, "train", "ShapeCls")
    pq.write_table(pq.read_table(path).drop(["pos_text"]), path)
    with pytest.raises(
        BadInput,
        match=r"ShapeCls.*original-00000-of-00001.parquet.*"
        r"missing columns.*pos_text",
    ):
        mmeb.read_train_subset(os.path.join(mini, "train"), "ShapeCls", "original", mini)
    report = BadInputReport("skip")
    assert (
        mmeb.read_train_subset(os.path.join(mini, "train"), "ShapeCls", "original", mini, report)
        == []
    )
    assert report.counts == {("ShapeCls", "missing columns"): 1}


@pytest.mark.parametrize(
    "bad_path, reason",
    [
        ("../outside.jpg", "image path escapes the image root"),
        ("/etc/passwd", "image path escapes the image root"),
        ("images/ShapeVQA/Train/absent.jpg", "missing image"),
    ],
)
def test_bad_image_path_names_subset_row_and_file(mini, bad_path, reason):
    path = _parquet(mini, "train", "ShapeVQA")
    _rewrite(path, "qry_image_path", 2, bad_path)
    train_dir = os.path.join(mini, "train")
    with pytest.raises(BadInput) as info:
        mmeb.read_train_subset(train_dir, "ShapeVQA", "original", mini)
    message = str(info.value)
    assert "subset 'ShapeVQA'" in message and f"row 2 of {path}" in message
    assert reason in message and os.path.basename(bad_path) in message
    report = BadInputReport("skip")
    rows = mmeb.read_train_subset(train_dir, "ShapeVQA", "original", mini, report)
    assert [r.index for r in rows] == [0, 1, 3, 4]  # the others keep their numbers
    assert report.counts == {("ShapeVQA", reason): 1}


def test_missing_candidate_image_in_eval(mini):
    path = _parquet(mini, "eval", "ShapeCaption_t2i")
    records = pq.read_table(path).to_pylist()
    gone = records[1]["tgt_img_path"][0]
    os.remove(os.path.join(mini, gone))
    first = min(i for i, r in enumerate(records) if gone in r["tgt_img_path"])
    with pytest.raises(BadInput, match=rf"'ShapeCaption_t2i'.*row {first} of .*missing image"):
        mmeb.read_eval_subset(os.path.join(mini, "eval"), "ShapeCaption_t2i", mini)


def test_malformed_candidate_lists(mini):
    path = _parquet(mini, "eval", "ColorCls")
    _rewrite(path, "tgt_img_path", 0, [""])
    with pytest.raises(BadInput, match="row 0 of .*malformed candidate lists"):
        mmeb.read_eval_subset(os.path.join(mini, "eval"), "ColorCls", mini)
    report = BadInputReport("skip")
    rows = mmeb.read_eval_subset(os.path.join(mini, "eval"), "ColorCls", mini, report)
    assert [r.index for r in rows] == [1, 2, 3] and report.total == 1


def test_bad_policy_is_refused(source):
    with pytest.raises(ValueError, match="on_bad_input"):
        mmeb.read_eval_subset(os.path.join(source, "eval"), "ColorCls", source, "ignore")


@pytest.fixture
def repeated(tmp_path):
    """An eval subset whose 6 rows name the same 8 candidate images (two folders) again and
    again, as MMEB-eval's candidate pools do."""
    import PIL.Image

    from g2e.data import subsets

    root = tmp_path / "data"
    paths = []
    for folder in ("A", "B"):
        (root / "images" / folder).mkdir(parents=True)
        for i in range(4):
            path = f"images/{folder}/{i}.png"
            PIL.Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(root / path)
            paths.append(path)
    records = [
        mmeb.eval_record(
            f"query {r}",
            paths[r % 8],
            [(f"candidate {(r + k) % 8}", paths[(r + k) % 8]) for k in range(5)],
        )
        for r in range(6)
    ]
    parquet = mmeb.write_split(str(root / "eval"), "Repeat", mmeb.EVAL_SPLIT, records)
    subsets.write_manifest(str(root), [subsets.SubsetInfo("Repeat", "retrieval", "IND")])
    return str(root), parquet, paths


def test_each_image_folder_is_listed_once_and_no_image_is_stat_ed(repeated, monkeypatch):
    root, _, _ = repeated
    images_dir = os.path.join(root, "images")
    listed, stat_ed = [], []
    scandir, stat, isfile = os.scandir, os.stat, os.path.isfile

    def counting(calls, function):
        def wrapper(path=".", *args, **kwargs):
            if os.fspath(path).startswith(images_dir):
                calls.append(os.fspath(path))
            return function(path, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(os, "scandir", counting(listed, scandir))
    monkeypatch.setattr(os, "stat", counting(stat_ed, stat))
    monkeypatch.setattr(os.path, "isfile", counting(stat_ed, isfile))
    rows = mmeb.read_eval_subset(os.path.join(root, "eval"), "Repeat", root)
    assert len(rows) == 6 and sum(len(r.tgt_images) + 1 for r in rows) == 36
    assert sorted(listed) == [os.path.join(images_dir, "A"), os.path.join(images_dir, "B")]
    assert stat_ed == []
    # Rows that name one image share one path string.
    assert rows[0].tgt_images[1] is rows[1].tgt_images[0] is rows[1].qry_image
    assert rows[0].tgt_images[1] == os.path.join(root, "images", "A", "1.png")


def test_a_missing_shared_image_fails_every_row_that_names_it(repeated):
    root, parquet, paths = repeated
    os.remove(os.path.join(root, paths[6]))  # a candidate of rows 2 to 5
    eval_dir = os.path.join(root, "eval")
    with pytest.raises(BadInput) as info:
        mmeb.read_eval_subset(eval_dir, "Repeat", root)
    assert str(info.value) == (
        f"subset 'Repeat', row 2 of {parquet}, file '{os.path.join(root, paths[6])}': "
        f"missing image. check the image root {root}: it must hold the paths the parquet names"
    )
    report = BadInputReport("skip")
    rows = mmeb.read_eval_subset(eval_dir, "Repeat", root, report)
    assert [r.index for r in rows] == [0, 1]
    assert report.counts == {("Repeat", "missing image"): 4}
    for row, example in zip((2, 3, 4, 5), report.examples, strict=True):
        assert f"row {row} of" in example and paths[6] in example


def test_written_splits_have_the_hub_names_and_types_and_read_back(tmp_path):
    import PIL.Image

    from g2e.data import subsets

    root = str(tmp_path)
    os.makedirs(os.path.join(root, mmeb.image_folder("Pairs", "Train")))
    image = mmeb.image_folder("Pairs", "Train") + "/0.jpg"
    PIL.Image.new("RGB", (4, 4)).save(os.path.join(root, image))
    subsets.write_manifest(root, [subsets.SubsetInfo("Pairs", "retrieval", "IND")])
    train_dir, eval_dir = os.path.join(root, "train"), os.path.join(root, "eval")
    for split in mmeb.TRAIN_SPLITS:
        path = mmeb.write_split(
            train_dir, "Pairs", split, [mmeb.train_record(f"{split} q", "", "p", image)]
        )
        assert path == os.path.join(train_dir, "Pairs", f"{split}-00000-of-00001.parquet")
        assert pq.read_schema(path) == mmeb.TRAIN_SCHEMA
        (row,) = mmeb.read_train_subset(train_dir, "Pairs", split, root)
        assert (row.qry_text, row.qry_image, row.pos_text, row.neg_text, row.neg_image) == (
            f"{split} q",
            None,
            "p",
            "",
            None,
        )
        assert row.pos_image == os.path.join(root, image)
    record = mmeb.eval_record("q", image, [("a", ""), ("b", image)])
    path = mmeb.write_split(eval_dir, "Pairs", mmeb.EVAL_SPLIT, [record])
    assert path == os.path.join(eval_dir, "Pairs", "test-00000-of-00001.parquet")
    assert pq.read_schema(path) == mmeb.EVAL_SCHEMA
    (row,) = mmeb.read_eval_subset(eval_dir, "Pairs", root)
    assert row.tgt_texts == ("a", "b") and row.tgt_images == (None, os.path.join(root, image))


def test_the_writer_refuses_an_unknown_split_or_other_columns(tmp_path):
    record = mmeb.train_record("q", "", "p", "")
    with pytest.raises(ValueError, match="split 'train' of Pairs"):
        mmeb.write_split(str(tmp_path), "Pairs", "train", [record])
    with pytest.raises(ValueError, match="row 0 of Pairs/test has the columns"):
        mmeb.write_split(str(tmp_path), "Pairs", mmeb.EVAL_SPLIT, [record])
    assert not os.path.exists(tmp_path / "Pairs")
