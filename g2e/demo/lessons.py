"""What the demo's tiny generator learns from: lessons drawn fresh from a seed stream.

A `Lesson` is a chat turn and the answer the generator must produce. `draw(phase, rng)` draws
one, of a kind picked at random (the kinds and their weights are `PHASES`):

  phase 'align' (A): short, balanced answers grounded in the image: the colour of an object,
    the shape of a large centred one, how many objects there are, whether a given object is
    there (the absent ones are half the time a sibling: one attribute changed), the name of a
    cropped object, and a dense caption of a scene;
  phase 'instruct' (B): the mini-MMEB's kinds of rows (fresh rows of its IND subsets, drawn by
    `mini_mmeb.draw_examples` with seeds of this stream, never the demo's rows), answered or
    captioned; one-word summaries under the hierarchical prompt's system turn (docs/method.md
    §1) of the IND subsets' labels, colours and captions, as queries (with the query suffix)
    and as candidates; matching questions in the judge's exact words (g2e.data.prompts) with
    true Yes/No answers, the Yes half including paraphrased labels and reordered captions, the
    No half including siblings; and text-only lessons.
  phase 'judge': mostly matching questions, with the yes/no checks of a word against the image
    (an object's colour or shape, a named object's presence) they build on.

Later phases keep a share of the earlier kinds, so what the generator saw first is not
forgotten.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from g2e.data import prompts
from g2e.demo import mini_mmeb, scenes, wording

GENERATOR_QUESTION = "What does the image show?"
ONE_WORD_TEXT = "Describe the text in one word."
YES_NO = "Is there a {} in the image? Answer Yes or No."
COLOR_QUESTION = "What color is the object?"
SHAPE_QUESTION = "What shape is the object?"
COUNT_QUESTION = "How many objects are there?"
CROP_QUESTION = "What is this object?"
CAPTION_QUESTION = "Describe the image."
IND_SUBSETS = tuple(n for n, (_, group, _) in mini_mmeb.SUBSETS.items() if group == "IND")
# Subsets whose positive is a text (a label, an answer or a caption).
TEXT_POSITIVE_SUBSETS = ("ShapeCls", "ColorCls", "ShapeVQA", "ShapeCaption_i2t")


@dataclasses.dataclass(frozen=True)
class Lesson:
    """One example the generator learns from: a chat turn and the answer it must produce.

    `user` may hold `<|image_1|>` placeholders for `images` (paths or PIL images, in order);
    `suffix` follows it inside the user turn; `system` is the system turn (None: none)."""

    user: str
    images: tuple
    answer: str
    system: str | None = None
    suffix: str = ""


def encode(processor: Any, lesson: Lesson, *, answer: bool = True) -> Any:
    """The lesson as an Encoded chat turn (with its answer and target mask when `answer`)."""
    return processor.encode_chat(
        lesson.system,
        lesson.user,
        list(lesson.images),
        user_suffix=lesson.suffix,
        answer=lesson.answer if answer else None,
    )


# ---- phase A: alignment ------------------------------------------------------------------


def colour_lesson(rng: np.random.Generator) -> Lesson:
    """The colour of one object (centred, or anywhere), or of 2-3 objects sharing it."""
    color = scenes.pick(rng, scenes.COLORS)
    n = int(rng.integers(1, 4))
    if n == 1 and rng.random() < 0.5:
        objects = [scenes.centred(rng, color=color)]
    else:
        objects = scenes.objects(rng, n, colors=[color] * n)
    image, _ = scenes.draw(rng, objects)
    question = COLOR_QUESTION if n == 1 else "What color are the objects?"
    return Lesson(question, (image,), color)


def shape_lesson(rng: np.random.Generator) -> Lesson:
    """The shape of a large centred object."""
    obj = scenes.centred(rng)
    image, _ = scenes.draw(rng, [obj])
    return Lesson(SHAPE_QUESTION, (image,), obj.shape)


# Objects of the first lessons: half to two thirds of the image's shorter side.
BIG = (0.45, 0.65)


def big_colour_lesson(rng: np.random.Generator) -> Lesson:
    """The colour of one centred object of size BIG."""
    obj = scenes.centred(rng, size_range=BIG)
    image, _ = scenes.draw(rng, [obj])
    return Lesson(COLOR_QUESTION, (image,), obj.color)


def big_shape_lesson(rng: np.random.Generator) -> Lesson:
    """The shape of one centred object of size BIG."""
    obj = scenes.centred(rng, size_range=BIG)
    image, _ = scenes.draw(rng, [obj])
    return Lesson(SHAPE_QUESTION, (image,), obj.shape)


def count_lesson(rng: np.random.Generator) -> Lesson:
    """How many objects (1-6, equally often) a scene holds."""
    n = int(rng.integers(1, len(scenes.NUMBERS) + 1))
    image, _ = scenes.draw(rng, scenes.objects(rng, n))
    return Lesson(COUNT_QUESTION, (image,), scenes.NUMBERS[n - 1])


def sibling(obj: scenes.Obj, rng: np.random.Generator) -> scenes.Obj:
    """`obj` with exactly one attribute (its colour or its shape) changed."""
    if rng.random() < 0.5:
        color = scenes.pick(rng, [c for c in scenes.COLORS if c != obj.color])
        return dataclasses.replace(obj, color=color)
    shape = scenes.pick(rng, [s for s in scenes.SHAPES if s != obj.shape])
    return dataclasses.replace(obj, shape=shape)


def presence_lesson(rng: np.random.Generator) -> Lesson:
    """Is a given coloured shape in the scene? Yes half the time; a No is half the time a
    sibling of an object that is there."""
    objects = scenes.objects(rng, int(rng.integers(1, 5)))
    image, _ = scenes.draw(rng, objects)
    named = {(o.color, o.shape) for o in objects}
    if rng.random() < 0.5:
        asked, answer = scenes.pick(rng, objects), "Yes"
    else:
        asked = sibling(scenes.pick(rng, objects), rng)
        if rng.random() < 0.5:
            asked = scenes.Obj(
                scenes.pick(rng, scenes.SHAPES), scenes.pick(rng, scenes.COLORS), 0, 0
            )
        answer = "Yes" if (asked.color, asked.shape) in named else "No"
    return Lesson(YES_NO.format(f"{asked.color} {asked.shape}"), (image,), answer)


ATTRIBUTE_QUESTION = "Is the object {}? Answer Yes or No."


def attribute_lesson(rng: np.random.Generator) -> Lesson:
    """Is the one centred object of a given colour or shape? Yes half the time, else the word
    of another colour or shape: the simplest check of a word against the image, which the
    judge's matching questions build on."""
    obj = scenes.centred(rng)
    image, _ = scenes.draw(rng, [obj])
    truth = obj.color if rng.random() < 0.5 else obj.shape
    pool = tuple(scenes.COLORS) if truth in scenes.COLORS else scenes.SHAPES
    if rng.random() < 0.5:
        return Lesson(ATTRIBUTE_QUESTION.format(truth), (image,), "Yes")
    other = scenes.pick(rng, [w for w in pool if w != truth])
    return Lesson(ATTRIBUTE_QUESTION.format(other), (image,), "No")


def crop_lesson(rng: np.random.Generator) -> Lesson:
    """The name ('red circle') of one object cropped from a scene of 2-4."""
    objects = scenes.objects(rng, int(rng.integers(2, 5)))
    image, boxes = scenes.draw(rng, objects)
    i = int(rng.integers(len(objects)))
    return Lesson(
        CROP_QUESTION, (scenes.crop(image, boxes[i]),), f"{objects[i].color} {objects[i].shape}"
    )


def caption_lesson(rng: np.random.Generator) -> Lesson:
    """A dense caption of a scene of 1-4 objects ('two red circles and a blue star')."""
    objects = scenes.objects(rng, int(rng.integers(1, 5)))
    image, _ = scenes.draw(rng, objects)
    return Lesson(CAPTION_QUESTION, (image,), scenes.caption(objects))


# ---- phase B: instructions, one-word summaries, matching, text ----------------------------


def _fresh_row(subset: str, rng: np.random.Generator) -> Any:
    """One freshly drawn row of `subset` (images in memory), from a seed of this stream."""
    return _Drawn(*mini_mmeb.draw_examples(subset, int(rng.integers(2**31)), 1)[0])


def one_word(row: Any) -> str:
    """A text-positive row's one-word summary: its label or answer (a paraphrased label's
    canonical word), or a caption's first shape."""
    meaning = wording.canonical(row.pos_text.lower())
    if isinstance(meaning, str) and len(meaning.split()) == 1:
        return meaning.strip(".,")
    words = [w.strip(".,") for w in row.pos_text.lower().split()]
    singular = {scenes.plural(s, n): s for s in scenes.SHAPES for n in (1, 2)}
    return next(singular[w] for w in words if w in singular)


def row_lesson(rng: np.random.Generator) -> Lesson:
    """A fresh IND row answered as an instruction-tuned MLLM would: a text positive is the
    answer to the query; an image positive (a caption's image, a crop) is captioned/named."""
    subset = scenes.pick(rng, IND_SUBSETS)
    row = _fresh_row(subset, rng)
    if row.pos_image is None:
        return Lesson(row.qry_text, _images(row.qry_image), row.pos_text)
    if subset == "ShapeGround":
        return Lesson(CROP_QUESTION, (row.pos_image,), row.qry_text.rsplit(": ", 1)[-1])
    return Lesson(GENERATOR_QUESTION, (row.pos_image,), row.qry_text.rsplit(": ", 1)[-1])


def summary_lesson(rng: np.random.Generator) -> Lesson:
    """A one-word summary under the hierarchical prompt's system turn, of a fresh text-positive
    IND row: its query (with the query suffix), its positive text, or its image alone."""
    row = _fresh_row(scenes.pick(rng, TEXT_POSITIVE_SUBSETS), rng)
    word = one_word(row)
    form = int(rng.integers(3))
    if form == 0:
        return Lesson(
            row.qry_text,
            _images(row.qry_image),
            word,
            system=prompts.SYSTEM_PROMPT,
            suffix=prompts.query_suffix(row.qry_image is not None),
        )
    if form == 1:
        return Lesson(row.pos_text, (), word, system=prompts.SYSTEM_PROMPT)
    if row.qry_image is None:
        return Lesson(row.pos_text, (), word, system=prompts.SYSTEM_PROMPT)
    return Lesson(prompts.IMAGE_PAD, (row.qry_image,), word, system=prompts.SYSTEM_PROMPT)


def text_lesson(rng: np.random.Generator) -> Lesson:
    """Text only: a caption's one-word summary, or a colour or shape read from a phrase."""
    objects = scenes.objects(rng, int(rng.integers(1, 4)))
    caption = scenes.caption(objects)
    kind = int(rng.integers(3))
    if kind == 0:
        return Lesson(f"{caption}\n{ONE_WORD_TEXT}", (), one_word(_Drawn("", None, caption, None)))
    obj = objects[0]
    if kind == 1:
        return Lesson(f"What color is a {obj.color} {obj.shape}?", (), obj.color)
    return Lesson(f"What shape is a {obj.color} {obj.shape}?", (), obj.shape)


PARAPHRASES = ("{} colour", "a {} one", "the colour {}")


def paraphrase(text: str, rng: np.random.Generator) -> str:
    """Another wording of the same label: 'red' -> 'a red one', 'two' -> '2', captions
    reordered; a text with no other wording is returned as it is."""
    if text in scenes.COLORS:
        return scenes.pick(rng, PARAPHRASES).format(text)
    if text in scenes.NUMBERS:
        return str(scenes.NUMBERS.index(text) + 1)
    if text in scenes.SHAPES:
        return f"a {text}"
    return reorder(text)


def text_sibling(text: str, rng: np.random.Generator) -> str | None:
    """`text` with one colour, shape or number word replaced by another (None if it has none)."""
    words = text.split(" ")
    pools = (tuple(scenes.COLORS), scenes.SHAPES, scenes.NUMBERS)
    spots = [(i, pool) for i, w in enumerate(words) for pool in pools if w in pool]
    if not spots:
        return None
    i, pool = spots[int(rng.integers(len(spots)))]
    words[i] = scenes.pick(rng, [w for w in pool if w != words[i]])
    return " ".join(words)


CLASSIFICATION_SUBSETS = ("ShapeCls", "ColorCls")


def classification_matching_lesson(rng: np.random.Generator) -> Lesson:
    """`matching_lesson` on the classification subsets only (an image and one word): the
    judge's format at its simplest, learnt before the other subsets join."""
    return matching_lesson(rng, CLASSIFICATION_SUBSETS)


def matching_lesson(rng: np.random.Generator, subsets: tuple[str, ...] = IND_SUBSETS) -> Lesson:
    """A judge-format question on fresh rows of one IND subset, Yes or No equally often.

    Yes: the anchor's own positive, another row's that answers it too (`mini_mmeb.answers`),
    or its text paraphrased / reordered. No: a random other row's positive, the other row's
    sharing the most words with it (the hard negatives mining meets), or a sibling text."""
    subset = scenes.pick(rng, subsets)
    rows = [_Drawn(*pair) for pair in mini_mmeb.draw_examples(subset, int(rng.integers(2**31)), 8)]
    anchor, others = rows[0], rows[1:]
    if rng.random() < 0.5:
        query_row, owner, answer = anchor, _yes_owner(anchor, others, rng), "Yes"
    else:
        query_row, owner, answer = anchor, _no_owner(anchor, others, rng), "No"
    images = tuple(image for image in (query_row.qry_image, owner.pos_image) if image)
    query = prompts.place_images(query_row.qry_text, int(query_row.qry_image is not None))
    candidate = prompts.place_images(owner.pos_text, int(owner.pos_image is not None))
    return Lesson(
        f"{prompts.JUDGE_QUERY_LABEL}{query}{prompts.JUDGE_CANDIDATE_LABEL}{candidate}",
        images,
        answer,
        system=prompts.JUDGE_SYSTEM_PROMPT,
        suffix=prompts.JUDGE_QUESTION,
    )


def _yes_owner(anchor: _Drawn, others: list[_Drawn], rng: np.random.Generator) -> _Drawn:
    choices = [anchor] + [o for o in others if mini_mmeb.answers(anchor, o)]
    if anchor.pos_image is None:
        said = paraphrase(anchor.pos_text, rng)
        choices.append(dataclasses.replace(anchor, pos_text=said))
    return choices[int(rng.integers(len(choices)))]


def _no_owner(anchor: _Drawn, others: list[_Drawn], rng: np.random.Generator) -> _Drawn:
    others = [o for o in others if not mini_mmeb.answers(anchor, o)]
    draw = rng.random()
    if anchor.pos_image is None and (draw < 0.4 or not others):
        changed = text_sibling(anchor.pos_text, rng)
        if changed is not None:
            return dataclasses.replace(anchor, pos_text=changed)
    if not others:  # every other row answers too, and no word can change: a row of its own
        return _fresh_row(scenes.pick(rng, [s for s in IND_SUBSETS if s != "ShapeCls"]), rng)
    if draw < 0.7:
        words = lambda row: set(f"{row.qry_text.rpartition(': ')[2]} {row.pos_text}".split())  # noqa: E731
        overlap = np.array([len(words(anchor) & words(o)) for o in others])
        best = np.flatnonzero(overlap == overlap.max())
        return others[int(rng.choice(best))]
    return others[int(rng.integers(len(others)))]


def _parts(caption: str) -> list[str]:
    return caption.strip().replace(" and ", ", ").split(", ")


def reorder(caption: str) -> str:
    """The same caption's parts in another order (a caption of one part stays as it is)."""
    parts = _parts(caption)
    parts = parts[1:] + parts[:1]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


@dataclasses.dataclass(frozen=True, eq=False)
class _Drawn:
    """A freshly drawn row (images in memory), as `mini_mmeb.answers` reads rows."""

    qry_text: str
    qry_image: Any
    pos_text: str
    pos_image: Any


def _images(image) -> tuple:
    return (image,) if image is not None else ()


# ---- the phases ----------------------------------------------------------------------------

# The first lessons: the colour and shape of one centred object, large or of a classification
# image's size (the words for what the pre-trained tower already tells apart).
SEE = {big_colour_lesson: 1, colour_lesson: 1, big_shape_lesson: 1, shape_lesson: 1}
ALIGN = {
    colour_lesson: 3,
    shape_lesson: 3,
    count_lesson: 3,
    attribute_lesson: 3,
    presence_lesson: 3,
    crop_lesson: 2,
    caption_lesson: 2,
}
INSTRUCT = {
    colour_lesson: 1,
    shape_lesson: 1,
    count_lesson: 1,
    presence_lesson: 1,
    caption_lesson: 1,
    row_lesson: 3,
    summary_lesson: 4,
    matching_lesson: 6,
    text_lesson: 1,
}
# Then the judge, in steps: a word checked against an image, the judge's format on
# classification rows, then every IND subset. The checks are learnt in a phase transition
# (their loss sits at ln 2 per answer, then falls): measured, a state after `CHECKS` under the
# run's first schedule learns them from checks alone within 100 steps (50% -> 72-81%, two batch
# seeds) and the classification rows' format within 100 more; states whose earlier phases each
# had a schedule of their own stayed at one answer for 1,000 steps. So `CHECKS` ends the first
# schedule, and `ATTRIBUTE` and the judge phases each get their own (g2e.demo.pretrain.PRESETS).
CHECKS = {
    attribute_lesson: 4,
    presence_lesson: 2,
    colour_lesson: 1,
    shape_lesson: 1,
    count_lesson: 1,
}
ATTRIBUTE = {attribute_lesson: 1}
JUDGE_CLASSIFICATION = {classification_matching_lesson: 6, attribute_lesson: 1}
JUDGE = {
    matching_lesson: 14,
    classification_matching_lesson: 1,
    attribute_lesson: 1,
    colour_lesson: 1,
    shape_lesson: 1,
    count_lesson: 1,
    summary_lesson: 2,
    row_lesson: 1,
    text_lesson: 1,
}
PHASES = {
    "see": SEE,
    "align": ALIGN,
    "instruct": INSTRUCT,
    "checks": CHECKS,
    "attribute": ATTRIBUTE,
    "judge_classification": JUDGE_CLASSIFICATION,
    "judge": JUDGE,
}


def draw(phase: str, rng: np.random.Generator) -> Lesson:
    """One lesson of `phase` (a key of PHASES), its kind drawn by the phase's weights."""
    kinds = PHASES[phase]
    weights = np.array(list(kinds.values()), np.float64)
    kind = list(kinds)[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    return kind(rng)
