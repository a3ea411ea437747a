"""The demo's pre-trained generator: reproducible, loads in transformers, and a stale one is
refused with the command that remakes it."""

import dataclasses
import hashlib

import numpy as np
import optax
import pytest
import torch
import transformers

from g2e.data import prompts
from g2e.demo import lessons, mini_mmeb, pretrain, probes, scenes


def _digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


@pytest.mark.slow
def test_ci_preset_is_byte_reproducible_and_loads_in_transformers(tmp_path, monkeypatch):
    first, second = tmp_path / "a" / "generator", tmp_path / "b" / "generator"
    pretrain.pretrain(first, "ci")
    pretrain.pretrain(second, "ci")
    assert _digests(first) == _digests(second)
    manifest = pretrain.check_asset(first, "ci")
    assert set(manifest["probes"]) == {*probes.GATES, "colour_cosine"}
    assert not (tmp_path / "a" / "generator.state").exists()  # cleaned up once written
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(first).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(first)
    ids = torch.tensor([tokenizer("What color is the object?")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids, mm_token_type_ids=torch.zeros_like(ids)).logits
    assert logits.shape[-1] == model.config.text_config.vocab_size
    # A generator made for other prompts is stale, and the error names the command.
    monkeypatch.setattr(prompts, "SYSTEM_PROMPT", prompts.SYSTEM_PROMPT + " Be brief.")
    with pytest.raises(ValueError, match="python -m g2e.demo.pretrain --out g2e/demo/assets"):
        pretrain.check_asset(first, "ci")


def test_answer_targets_are_the_answer_tokens_and_the_positions_before_them():
    batch = {
        "input_ids": np.array([[5, 6, 7, 8, 0, 0], [5, 9, 10, 11, 12, 0]], np.int32),
        "target_mask": np.array([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]], np.int32),
    }
    out = pretrain.answer_targets(batch, width=3)
    np.testing.assert_array_equal(out["answer_positions"], [[1, 2, 0], [2, 3, 0]])
    np.testing.assert_array_equal(out["answer_targets"][:, :2], [[7, 8], [11, 12]])
    np.testing.assert_array_equal(out["answer_weights"], [[1, 1, 0], [1, 1, 0]])
    assert "target_mask" not in out


@pytest.fixture(scope="module")
def ci_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("ci") / "generator"
    return pretrain.build(out, pretrain.PRESETS["ci"])


def test_image_tokens_start_at_the_scale_of_token_embeddings(ci_model):
    model, processor, info = ci_model
    rng = np.random.default_rng(1)
    items = [lessons.encode(processor, lessons.colour_lesson(rng), answer=False) for _ in range(4)]
    batch = processor.batcher.collate(items)
    tokens = np.asarray(model.vision_tokens(batch))
    embeddings = np.asarray(model.language_model.embed_tokens[...])
    ratio = np.sqrt(np.mean(tokens**2)) / np.sqrt(np.mean(embeddings**2))
    assert 0.5 < ratio < 2.0 and info["merger_scale"] < 0.5


def test_lessons_are_drawn_from_their_seed_and_balanced():
    def draw(seed):
        rng = np.random.default_rng(seed)
        return [lessons.draw("instruct", rng) for _ in range(40)]

    first, again = draw(3), draw(3)
    assert [(x.user, x.answer) for x in first] == [(x.user, x.answer) for x in again]
    rng = np.random.default_rng(0)
    judged = [lessons.matching_lesson(rng) for _ in range(60)]
    yes = np.mean([lesson.answer == "Yes" for lesson in judged])
    assert 0.35 < yes < 0.65
    assert all(lesson.system == prompts.JUDGE_SYSTEM_PROMPT for lesson in judged)
    assert all(lesson.suffix == prompts.JUDGE_QUESTION for lesson in judged)
    colours = [lessons.colour_lesson(rng).answer for _ in range(400)]
    assert set(colours) == set(scenes.COLORS)


def test_paraphrases_answer_and_siblings_do_not():
    rng = np.random.default_rng(0)
    assert lessons.paraphrase("two", rng) == "2"
    assert "red" in lessons.paraphrase("red", rng) and lessons.paraphrase("red", rng) != "red"
    caption = "a red circle and two blue stars"
    assert lessons.paraphrase(caption, rng) == "two blue stars and a red circle"
    for _ in range(20):
        changed = lessons.text_sibling(caption, rng)
        differing = [a != b for a, b in zip(changed.split(), caption.split())]
        assert sum(differing) == 1, changed


def test_a_no_answer_is_found_when_every_other_row_answers_too():
    rng = np.random.default_rng(0)
    rows = [lessons._Drawn(*row) for row in mini_mmeb.draw_examples("ShapeVQA", 1, 4)]
    anchor = dataclasses.replace(rows[0], pos_text="yes")  # no word a sibling can change
    for others in ([], [dataclasses.replace(rows[1], pos_text="yes")]):
        for _ in range(10):
            owner = lessons._no_owner(anchor, others, rng)
            assert not mini_mmeb.answers(anchor, owner)


def test_each_phase_warms_up_to_the_peak_again():
    schedule = pretrain.phase_schedule(1e-3, [40, 100])
    first, second = (
        [float(schedule(i)) for i in range(40)],
        [float(schedule(i)) for i in range(40, 140)],
    )
    assert first[0] == 0.0 and second[0] == 0.0  # a fresh warmup at the boundary
    assert max(first) == pytest.approx(1e-3) and max(second) == pytest.approx(1e-3)
    assert second[-1] == pytest.approx(1e-3 / 20, rel=0.05)


def test_the_first_phases_share_one_schedule_cut_where_they_end():
    schedule = pretrain.phase_schedule(1e-3, [10, 10, 20], shared=(2, 40))
    whole = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 2, 40, 1e-3 / 20)
    assert [float(schedule(i)) for i in range(20)] == [float(whole(i)) for i in range(20)]
    assert float(schedule(20)) == 0.0 and float(schedule(21)) > 0.0  # the third phase's own
