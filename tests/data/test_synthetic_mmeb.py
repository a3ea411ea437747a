"""The synthetic MMEB: the hub layout the readers take, the sizes and mix asked, determinism."""

import hashlib
import json
import os

import PIL.Image
import pytest

from g2e.data import mmeb, subsets, synthetic_mmeb

NAMES = ["SynthCls_0", "SynthGround_3", "SynthRet_2", "SynthVQA_1"]


def _build(root, **overrides):
    options = dict(
        rows=24,
        subsets=4,
        eval_queries=5,
        candidates=7,
        image_scale=0.05,
        pool=8,
        page_fraction=0.25,
        seed=3,
    )
    options.update(overrides)
    synthetic_mmeb.build(str(root), **options)
    return str(root)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("synthetic") / "data")


def _files(root):
    """{relative path: sha1} of every file under root."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
    return out


def _main_image(row: mmeb.TrainRow) -> str:
    return row.qry_image or row.pos_image


def test_the_mmeb_readers_read_both_splits_and_eval(small):
    train_dir, eval_dir = os.path.join(small, "train"), os.path.join(small, "eval")
    assert mmeb.list_subsets(train_dir) == mmeb.list_subsets(eval_dir) == NAMES
    tasks = {
        "SynthCls_0": "classification",
        "SynthVQA_1": "vqa",
        "SynthRet_2": "retrieval",
        "SynthGround_3": "grounding",
    }
    for name in NAMES:
        info = subsets.subset_info(name, train_dir)
        assert (info.meta_task, info.group, info.train) == (tasks[name], "IND", True)
        original, diverse = (
            mmeb.read_train_subset(train_dir, name, s, small) for s in mmeb.TRAIN_SPLITS
        )
        assert len(original) == len(diverse) == 6
        # The same rows with other wordings: same images and positives, other instructions.
        assert [(r.qry_image, r.pos_text, r.pos_image) for r in original] == [
            (r.qry_image, r.pos_text, r.pos_image) for r in diverse
        ]
        assert any(a.qry_text != b.qry_text for a, b in zip(original, diverse))
        for row in original:  # `<|image_1|>` exactly where there is an image
            assert row.qry_text.startswith("<|image_1|>") == (row.qry_image is not None)
            assert row.pos_text.startswith("<|image_1|>") == (row.pos_image is not None)
        rows = mmeb.read_eval_subset(eval_dir, name, small)
        assert len(rows) == 5 and all(len(r.tgt_texts) == 7 for r in rows)
        for row in rows:  # the positive once, first
            positives = [(t, i) for t, i in zip(row.tgt_texts, row.tgt_images)]
            assert positives.count(positives[0]) == 1


def test_eval_candidate_images_come_from_a_shared_pool(small):
    rows = mmeb.read_eval_subset(os.path.join(small, "eval"), "SynthRet_2", small)
    named = [i for r in rows for i in r.tgt_images]
    assert len(named) == 5 * 7 and len(set(named)) == 7  # a pool of max(queries, candidates)
    classification = mmeb.read_eval_subset(os.path.join(small, "eval"), "SynthCls_0", small)
    assert all(sorted(r.tgt_texts) == sorted(classification[0].tgt_texts) for r in classification)


def test_pages_are_the_fraction_asked_and_every_file_is_distinct(small):
    for name in NAMES:
        rows = mmeb.read_train_subset(os.path.join(small, "train"), name, "original", small)
        pages = [_main_image(r).endswith(".png") for r in rows]
        assert sum(pages) == round(6 * 0.25)
    files = _files(os.path.join(small, "images"))
    assert len(set(files.values())) == len(files)  # comment-tagged: no two files alike
    photo = PIL.Image.open(os.path.join(small, "images", "SynthCls_0", "Train", "0000000.jpg"))
    assert photo.format == "JPEG" and photo.size == (32, 24)


def test_full_size_photos_and_pages(tmp_path):
    root = _build(
        tmp_path / "full",
        rows=4,
        eval_queries=2,
        candidates=2,
        image_scale=1.0,
        pool=1,
        page_fraction=0.5,
    )
    sizes = {}
    for folder, _, names in os.walk(os.path.join(root, "images")):
        for name in names:
            image = PIL.Image.open(os.path.join(folder, name))
            image.load()  # the comment segments decode
            if "SynthGround" not in folder:  # grounding positives are crops
                sizes.setdefault((image.format, image.size), 0)
                sizes[image.format, image.size] += 1
    assert set(sizes) == {("JPEG", (640, 480)), ("PNG", (1700, 2200))}


def test_output_is_a_function_of_the_seed(small, tmp_path):
    again = _build(tmp_path / "again")
    assert _files(again) == _files(small)
    other = _build(tmp_path / "other", seed=4)
    assert _files(other) != _files(small)


def test_command_line_and_refusals(tmp_path, capsys):
    out = str(tmp_path / "cli")
    synthetic_mmeb.main(
        [
            "--out",
            out,
            "--rows",
            "8",
            "--subsets",
            "2",
            "--eval_queries",
            "3",
            "--candidates",
            "4",
            "--image_scale",
            "0.05",
            "--pool",
            "2",
        ]
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["train_rows"] == 8 and summary["subsets"] == 2
    assert mmeb.list_subsets(os.path.join(out, "eval")) == ["SynthCls_0", "SynthVQA_1"]
    with pytest.raises(FileExistsError, match="already holds"):
        synthetic_mmeb.build(out, rows=8)
    with pytest.raises(ValueError, match="page_fraction"):
        synthetic_mmeb.build(str(tmp_path / "x"), rows=8, page_fraction=1.5)
