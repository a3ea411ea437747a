"""The demo's generator: the committed asset copied (widths checked), or, for CI's toy runs,
lessons from the mini-MMEB's rows: matching questions in the judge's exact words, true answers."""

import json
import types

import ml_collections
import numpy as np
import pytest

from g2e import configuration
from g2e.data import mmeb, prompts
from g2e.data.preprocess import EmbedItem, Processor
from g2e.demo import lessons, mini_mmeb, prepare, pretrain, tiny, wording


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    mini_mmeb.build(str(root / "data"), seed=0, train_rows=6, eval_queries=2, candidates=2)
    tiny.write_assets(root / "model")
    return root


def test_matching_lessons_are_the_judge_prompt_with_true_answers(mini):
    taught = prepare.generator_lessons(
        mini / "data" / "train", mini / "data", matching_per_subset=12, seed=0
    )
    matching = [lesson for lesson in taught if lesson.suffix == prompts.JUDGE_QUESTION]
    assert len(matching) == 6 * 12 and {lesson.answer for lesson in matching} == {"Yes", "No"}
    processor = Processor.from_dir(mini / "model", max_length=512)
    for lesson in matching[::9]:
        # The judge's prompt of the same query and candidate is token for token the lesson's.
        query_text, candidate_text = lesson.user.removeprefix("Query: ").split("\nCandidate: ")
        images = list(lesson.images)
        query_image = images.pop(0) if "<|image_pad|>" in query_text else None
        candidate_image = images.pop(0) if "<|image_pad|>" in candidate_text else None
        judge = processor.encode_judge(
            EmbedItem(query_text, query_image, "query"),
            EmbedItem(candidate_text, candidate_image, "candidate"),
        )
        asked = processor.encode_chat(
            lesson.system, lesson.user, list(lesson.images), user_suffix=lesson.suffix
        )
        np.testing.assert_array_equal(asked.input_ids, judge.input_ids)
    # About as many Yes as No, so the judge learns to tell them apart.
    yes = sum(lesson.answer == "Yes" for lesson in matching)
    assert 0.35 < yes / len(matching) < 0.65


def test_answers_follows_the_construction(mini):
    rows = mmeb.read_train_subset(
        str(mini / "data" / "train"), "ShapeCls", "original", str(mini / "data")
    )
    meaning = lambda row: wording.canonical(row.pos_text)  # noqa: E731 ('circle' is 'a circle')
    same = [(a, b) for a in rows for b in rows if a is not b and meaning(a) == meaning(b)]
    different = [(a, b) for a in rows for b in rows if meaning(a) != meaning(b)]
    assert all(mini_mmeb.answers(a, b) for a, b in same)
    assert not any(mini_mmeb.answers(a, b) for a, b in different)
    ground = mmeb.read_train_subset(
        str(mini / "data" / "train"), "ShapeGround", "original", str(mini / "data")
    )
    assert not mini_mmeb.answers(ground[0], ground[1])  # a crop of another scene


def test_a_caption_in_another_order_answers():
    row = lambda caption: types.SimpleNamespace(  # noqa: E731
        qry_text="<|image_1|>\nFind a caption.", qry_image=None, pos_text=caption, pos_image=None
    )
    a, b = row("a red circle and two blue stars"), row("two blue stars and a red circle")
    assert mini_mmeb.answers(a, b)
    assert not mini_mmeb.answers(a, row("a red circle and two blue crosses"))
    assert lessons.reorder(a.pos_text) == b.pos_text


def test_the_system_prompt_asks_for_one_word(mini):
    taught = prepare.generator_lessons(
        mini / "data" / "train", mini / "data", matching_per_subset=0, seed=0
    )
    summaries = [lesson for lesson in taught if lesson.system == prompts.SYSTEM_PROMPT]
    assert summaries and all(len(lesson.answer.split()) == 1 for lesson in summaries)
    assert {bool(lesson.images) for lesson in summaries} == {True, False}


def _demo_config(**demo) -> ml_collections.ConfigDict:
    config = configuration.base_config()
    config.demo.update(demo)
    return config


def test_the_asset_is_copied_and_its_widths_checked(tmp_path, monkeypatch):
    asset = tmp_path / "asset"
    tiny.write_assets(asset, hidden_size=64, layers=2, vision_width=32)
    (asset / "MANIFEST.json").write_text(json.dumps({"weights_sha256": "abc"}))
    monkeypatch.setattr(pretrain, "ASSET_DIR", asset)
    config = _demo_config(generator="asset", hidden_size=64, num_layers=2, vision_width=32)
    info = prepare.copy_generator(config, None, tmp_path / "model")
    assert info["weights_sha256"] == "abc"
    assert (tmp_path / "model" / "tokenizer.json").read_bytes() == (
        asset / "tokenizer.json"
    ).read_bytes()
    with pytest.raises(ValueError, match="demo.hidden_size=128.*demo.generator=train"):
        prepare.copy_generator(_demo_config(hidden_size=128), None, tmp_path / "other")


def test_an_unknown_generator_source_is_named(tmp_path):
    with pytest.raises(ValueError, match="demo.generator must be .asset. or .train."):
        prepare.prepare(_demo_config(generator="download", train_rows=16, scale=0.0), tmp_path)
