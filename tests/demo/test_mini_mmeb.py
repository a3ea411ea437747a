"""Mini-MMEB: MMEB's exact formats, four meta-tasks with IND/OOD, deterministic for a seed."""

import hashlib
import os

import PIL.Image
import pyarrow.parquet as pq
import pytest

from g2e.data import subsets
from g2e.demo import mini_mmeb, mini_rows, scenes, wording

SIZES = dict(train_rows=12, eval_queries=6, candidates=5)


def _tree_digest(root: str) -> dict[str, str]:
    digests = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("mini") / "mmeb")
    mini_mmeb.build(out, seed=3, **SIZES)
    return out


def test_same_seed_same_bytes_other_seed_differs(mini, tmp_path):
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    mini_mmeb.build(again, seed=3, **SIZES)
    mini_mmeb.build(other, seed=4, **SIZES)
    assert _tree_digest(again) == _tree_digest(mini)
    assert _tree_digest(other) != _tree_digest(mini)


def test_manifest_covers_four_meta_tasks_with_ind_and_ood(mini):
    infos = subsets.known_subsets(mini)
    assert set(infos) == set(mini_mmeb.SUBSETS)
    for task in subsets.META_TASKS:
        of_task = [i for i in infos.values() if i.meta_task == task]
        assert len(of_task) >= 2, task
    assert {i.group for i in infos.values()} == {"IND", "OOD"}
    assert sorted(os.listdir(os.path.join(mini, "train"))) == sorted(
        n for n, i in infos.items() if i.train
    )
    assert all(i.group == "IND" for i in infos.values() if i.train)
    assert sorted(os.listdir(os.path.join(mini, "eval"))) == sorted(infos)


def _check_text_and_image(text: str, image_path: str, root: str, subset: str, part: str):
    # MMEB's convention: an item has an image exactly when its text carries the placeholder.
    assert text.startswith("<|image_1|>\n") == bool(image_path), (text, image_path)
    if image_path:
        assert image_path.startswith(f"images/{subset}/{part}/"), image_path
        with PIL.Image.open(os.path.join(root, image_path)) as image:
            assert max(image.size) <= scenes.MAX_SIDE


def test_train_files_have_mmeb_train_columns_and_conventions(mini):
    for subset in os.listdir(os.path.join(mini, "train")):
        original = pq.read_table(
            os.path.join(mini, "train", subset, "original-00000-of-00001.parquet")
        ).to_pylist()
        diverse = pq.read_table(
            os.path.join(mini, "train", subset, "diverse_instruction-00000-of-00001.parquet")
        ).to_pylist()
        assert list(original[0]) == [
            "qry",
            "qry_image_path",
            "pos_text",
            "pos_image_path",
            "neg_text",
            "neg_image_path",
        ]
        assert len(original) == len(diverse) == SIZES["train_rows"]
        for row, alt in zip(original, diverse):
            _check_text_and_image(row["qry"], row["qry_image_path"], mini, subset, "Train")
            _check_text_and_image(row["pos_text"], row["pos_image_path"], mini, subset, "Train")
            # Same pairs, other instruction wording.
            assert (alt["qry_image_path"], alt["pos_text"], alt["pos_image_path"]) == (
                row["qry_image_path"],
                row["pos_text"],
                row["pos_image_path"],
            )
        assert any(r["qry"] != a["qry"] for r, a in zip(original, diverse))


def test_eval_files_have_mmeb_eval_columns_and_a_unique_positive(mini):
    for subset in os.listdir(os.path.join(mini, "eval")):
        rows = pq.read_table(
            os.path.join(mini, "eval", subset, "test-00000-of-00001.parquet")
        ).to_pylist()
        assert list(rows[0]) == ["qry_text", "qry_img_path", "tgt_text", "tgt_img_path"]
        assert len(rows) == SIZES["eval_queries"]
        for row in rows:
            _check_text_and_image(row["qry_text"], row["qry_img_path"], mini, subset, "Test")
            targets = list(zip(row["tgt_text"], row["tgt_img_path"]))
            assert 2 <= len(targets) <= SIZES["candidates"]
            assert len(set(targets)) == len(targets), "the positive must be the only right answer"
            for text, image_path in targets:
                _check_text_and_image(text, image_path, mini, subset, "Test")


def test_texts_read_like_mmeb(mini):
    def first(kind, subset, column):
        name = "test" if kind == "eval" else "original"
        path = os.path.join(mini, kind, subset, f"{name}-00000-of-00001.parquet")
        return pq.read_table(path).to_pylist()[0][column]

    assert first("train", "ShapeVQA", "qry").startswith(
        "<|image_1|>\nRepresent the given image with the following question: "
    )
    assert first("train", "ShapeCaption_t2i", "qry").startswith(
        "Find me an everyday image that matches the given caption: "
    )
    assert (
        first("train", "ShapeCaption_t2i", "pos_text") == "<|image_1|>\nRepresent the given image."
    )
    assert first("eval", "ShapeGround", "qry_text").startswith(
        "<|image_1|>\nSelect the portion of the image that isolates the object of the given label: "
    )
    assert wording.canonical(first("train", "ShapeCls", "pos_text")) in scenes.SHAPES


def test_classification_positives_repeat_so_queries_share_owners(mini):
    for subset in ("ShapeCls", "ColorCls"):
        rows = pq.read_table(
            os.path.join(mini, "train", subset, "original-00000-of-00001.parquet")
        ).to_pylist()
        labels = [r["pos_text"] for r in rows]
        assert len(set(labels)) < len(labels)


def test_command_line_scale_and_refusal_to_overwrite(tmp_path, capsys):
    out = str(tmp_path / "m")
    mini_mmeb.main(["--out", out, "--seed", "1", "--scale", "0.05"])
    assert '"train_rows": 10' in capsys.readouterr().out
    rows = pq.read_table(
        os.path.join(out, "eval", "ShapeCls", "test-00000-of-00001.parquet")
    ).num_rows
    assert rows == 3
    with pytest.raises(FileExistsError, match="already holds a mini-MMEB"):
        mini_mmeb.main(["--out", out])


def _core(text: str, instruction: str) -> str:
    """A candidate's own words: its text without the image placeholder and the instruction."""
    return text.replace(mini_rows.IMAGE, "").replace(instruction, "").strip().rstrip(".")


def test_no_subset_is_solved_by_copying_text(mini):
    """A query's text may hold a candidate's words only if every candidate has them too."""
    for name, (_, _, instructions) in mini_mmeb.SUBSETS.items():
        path = os.path.join(mini, "eval", name, "test-00000-of-00001.parquet")
        for number, row in enumerate(pq.read_table(path).to_pylist()):
            query = row["qry_text"]
            cores = [_core(t, instructions[0]) for t in row["tgt_text"]]
            positive = cores[0]
            if positive and positive in query:
                assert all(c == positive for c in cores), (name, number, row["tgt_text"])
