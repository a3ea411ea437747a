"""Mini-MMEB: MMEB's exact formats, four meta-tasks with IND/OOD, deterministic for a seed."""

import hashlib
import importlib.util
import os
import pathlib
import types

import numpy as np
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


# ---- the structure SaHa mining works on ------------------------------------------------------


def _row(qry_text="", qry_image=None, pos_text="", pos_image=None):
    return types.SimpleNamespace(
        qry_text=qry_text, qry_image=qry_image, pos_text=pos_text, pos_image=pos_image
    )


def test_answers_accepts_paraphrases_and_reworded_captions():
    image = object()
    for label in ("red", "circle", "two"):
        forms = wording.label_forms(label)
        assert len(forms) == 3
        for form in forms:
            assert mini_mmeb.answers(_row("q1", image, label), _row("q2", image, form))
    assert mini_mmeb.answers(_row("q", image, "two"), _row("q", image, "2"))
    assert not mini_mmeb.answers(_row("q", image, "two"), _row("q", image, "3"))
    assert not mini_mmeb.answers(_row("q", image, "red"), _row("q", image, "a blue one"))
    caption = "a red circle, two blue stars and an orange cross"
    rng = np.random.default_rng(0)
    for _ in range(20):
        other = wording.reworded(caption, rng)
        assert other != caption
        assert mini_mmeb.answers(_row("q", image, caption), _row("q", image, other))
        # A text-to-image query: another row's image answers when its caption means the same.
        find = mini_mmeb.SUBSETS["ShapeCaption_t2i"][2][0]
        a, b = _row(find + caption, None, "", image), _row(find + other, None, "", object())
        assert mini_mmeb.answers(a, b)


def _one_attribute_apart(a, b) -> bool:
    """Same cells and sizes; exactly one object differs, in exactly one of colour and shape."""
    if len(a) != len(b) or [(o.cell, o.size) for o in a] != [(o.cell, o.size) for o in b]:
        return False
    changes = [(x.color != y.color) + (x.shape != y.shape) for x, y in zip(a, b)]
    return sorted(changes) == [0] * (len(a) - 1) + [1]


def _siblings(examples) -> list[tuple]:
    shows = lambda ex: ex.qry_shows if ex.pos_image is None else ex.pos_shows  # noqa: E731
    return [
        (a, b) for a, b in zip(examples, examples[1:]) if _one_attribute_apart(shows(a), shows(b))
    ]


def _training_rows(name, count=120, seed=0):
    rng = mini_mmeb.subset_rng(seed, name, mini_mmeb.TRAIN_PART)
    examples = mini_mmeb.draw_rows(name, rng, count, train=True)
    instruction = mini_mmeb.SUBSETS[name][2][0]
    rows = [
        _row(mini_mmeb.query_text(instruction, ex), ex.qry_image, ex.pos_text, ex.pos_image)
        for ex in examples
    ]
    return examples, rows


@pytest.mark.parametrize("name", ["ShapeCaption_t2i", "ShapeCaption_i2t", "ShapeGround"])
def test_about_30_percent_of_scenes_get_a_sibling_that_answers_nothing(name):
    examples, rows = _training_rows(name)
    pairs = _siblings(examples)
    # A scene and its sibling are two of the rows: about 0.3 / 1.3 of the rows are siblings.
    assert 0.12 <= len(pairs) / len(examples) <= 0.35, len(pairs)
    row_of = {id(ex): row for ex, row in zip(examples, rows)}
    for a, b in pairs:
        assert a.pos_text != b.pos_text or a.question != b.question  # a row of its own
        assert not mini_mmeb.answers(row_of[id(a)], row_of[id(b)])
        assert not mini_mmeb.answers(row_of[id(b)], row_of[id(a)])


def test_grounding_scenes_hold_objects_that_share_one_attribute():
    examples, _ = _training_rows("ShapeGround")
    sharing = 0
    for ex in examples:
        pairs = [(o.shape, o.color) for o in ex.qry_shows]
        assert len(set(pairs)) == len(pairs), "a label must name one object"
        shapes, colors = [s for s, _ in pairs], [c for _, c in pairs]
        sharing += len(set(shapes)) < len(shapes) or len(set(colors)) < len(colors)
    assert sharing >= len(examples) // 4


def test_training_rows_hold_distinct_positives_that_answer():
    for name in ("ShapeCls", "ColorCls", "ShapeVQA"):
        _, rows = _training_rows(name)
        forms = {}
        for row in rows:
            forms.setdefault(wording.canonical(row.pos_text), set()).add(row.pos_text)
        # Most labels come in several forms: distinct candidates that answer alike.
        assert sum(len(f) > 1 for f in forms.values()) >= len(forms) // 2, (name, forms)
    for name in ("ShapeCaption_t2i", "ShapeCaption_i2t"):
        _, rows = _training_rows(name)
        text = (lambda r: r.qry_text) if name.endswith("t2i") else (lambda r: r.pos_text)
        reused = [
            i
            for i, r in enumerate(rows)
            if any(mini_mmeb.answers(r, o) and text(o) != text(r) for o in rows[:i] if o is not r)
        ]
        assert 0.06 <= len(reused) / len(rows) <= 0.3, (name, len(reused))


def _stand_in_bench():
    path = pathlib.Path(__file__).parents[2] / "bench" / "mini_mmeb_false_negatives.py"
    spec = importlib.util.spec_from_file_location("mini_mmeb_false_negatives", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_walk_meets_true_false_negatives_on_training_rows_only():
    bench = _stand_in_bench()
    for name in ("ShapeCls", "ColorCls", "ShapeVQA"):
        figures = {}
        for train in (True, False):
            rng = mini_mmeb.subset_rng(0, name, mini_mmeb.TRAIN_PART)
            examples = mini_mmeb.draw_rows(name, rng, 96, train=train)
            figures[train] = bench.judged_pairs(
                name, examples, top_k=3, pool_mult=3, pairs_per_call=16
            )
        assert figures[True]["walk_true"] >= 10, (name, figures)
        assert 10 <= figures[True]["walk_share"] <= 50, (name, figures)
        # Canonical rows (as the evaluation's) hold no distinct positive that answers.
        assert figures[False]["asked_pairs"] > 0 and figures[False]["asked_true"] == 0, (
            name,
            figures,
        )


def _is_canonical(text: str) -> bool:
    """A label of a vocabulary, or a caption whose every part starts 'a', 'an' or a number
    word above one (scenes.caption's words)."""
    if text in wording.label_forms(text)[:1] and wording.canonical(text) == text:
        return wording.label_forms(text)[0] == text
    parts = text.replace(" and ", ", ").split(", ")
    return all(p.split()[0] in ("a", "an", *scenes.NUMBERS[1:]) for p in parts)


def test_evaluation_rows_are_canonical_with_one_right_candidate(mini):
    for name in mini_mmeb.SUBSETS:
        path = os.path.join(mini, "eval", name, "test-00000-of-00001.parquet")
        for row in pq.read_table(path).to_pylist():
            if row["tgt_img_path"][0]:
                continue  # image candidates: below
            assert _is_canonical(row["tgt_text"][0]), (name, row["tgt_text"][0])
            meanings = [wording.canonical(t) for t in row["tgt_text"]]
            assert meanings[0] not in meanings[1:], (name, row["tgt_text"])
    # Image candidates: what each shows, from the drawn evaluation rows.
    for name in ("ShapeCaption_t2i", "ShapeEdit", "ShapeGround", "ShapeRef-Matching"):
        rng = mini_mmeb.subset_rng(0, name, mini_mmeb.EVAL_PART)
        examples = mini_mmeb.draw_rows(name, rng, 40, train=False)
        meaning = {}
        for ex in examples:
            meaning[id(ex.pos_image)] = wording.canonical(scenes.caption(list(ex.pos_shows)))
            for _, image, shows in ex.distractors:
                meaning[id(image)] = wording.canonical(scenes.caption(list(shows)))
        for i, ex in enumerate(examples):
            candidates = mini_mmeb._distractors(name, i, examples, rng, 11)
            assert len(candidates) == 11
            meanings = [meaning[id(image)] for _, image in candidates]
            assert meaning[id(ex.pos_image)] not in meanings, (name, i)
