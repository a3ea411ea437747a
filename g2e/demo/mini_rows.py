"""The mini-MMEB's rows as drawn, before writing: one query and its positive per row.

Evaluation rows are canonical: every label and caption in its canonical words (wording.py),
and no query with a second right candidate. Training rows carry the structure SaHa mining
works on, as real training data does:
  * distinct positives that also answer (false negatives): labels and answers in one of
    their forms (`red` / `red colour` / `a red one`, `two` / `2` / `two of them`), and
    REUSED_CAPTIONS of the caption rows name an earlier row's objects, placed anew, in
    another order or with other articles;
  * hard negatives: SIBLING_SHARE of the caption and grounding scenes get a sibling
    (siblings.py: the same canvas, one colour or shape changed) as the next row, a
    grounding scene's objects may share a colour or a shape, and ShapeVQA asks 1-3
    questions of one scene (rows sharing an image, as VQA data does: their answers differ).
SaHa orders a non-classification anchor's owners least anchor-like first, so a false negative
is met early only when its query looks unlike the anchor's: a VQA answer in other words owned
by another scene's question is; a reused caption's query (the same objects) is not, so the
caption subsets hold few of the pairs the judge meets (bench/mini_mmeb_false_negatives.py).
Evaluation queries get siblings as distractors instead: up to MAX_SIBLING_DISTRACTORS per
retrieval query, one crop for SIBLING_SHARE of the grounding queries; ShapeEdit's unedited
source is the edited scene's sibling too.
"""

import dataclasses

import numpy as np
import PIL.Image

from g2e.demo import scenes, siblings, wording

IMAGE = "<|image_1|>\n"
REPRESENT_IMAGE = IMAGE + "Represent the given image."
REPRESENT_CROP = IMAGE + "Represent the given cropped image of the object"
# Training rows only: the share of labels and answers in other words (each of a label's three
# forms alike), and of caption rows that name an earlier row's objects.
PARAPHRASED = 2 / 3
REUSED_CAPTIONS = 0.15
# The share of caption and grounding scenes that get a sibling (siblings.py): in training a
# row of its own; in a grounding evaluation query, one more distractor.
SIBLING_SHARE = 0.3
# An evaluation retrieval query's sibling distractors: 0 to this many.
MAX_SIBLING_DISTRACTORS = 3
# ShapeVQA asks for "the largest object" only when it is this much larger (scenes.Obj.size).
CLEARLY_LARGER = 0.3


@dataclasses.dataclass
class Example:
    """One query and its positive, before writing. `question` follows the instruction in the
    query text; `qry_shows` / `pos_shows` are the objects each image shows (none without an
    image); `distractors` are this query's own eval negatives as (text, image, objects shown),
    taken before the others of the subset's pool."""

    question: str
    qry_image: PIL.Image.Image | None
    pos_text: str
    pos_image: PIL.Image.Image | None
    distractors: list = dataclasses.field(default_factory=list)
    qry_shows: tuple = ()
    pos_shows: tuple = ()


def _label(value: str, rng: np.random.Generator, train: bool) -> str:
    """A label in its canonical words (evaluation), or in one of its forms (training)."""
    return wording.paraphrase(value, rng, PARAPHRASED) if train else value


def _classification(name: str, rng: np.random.Generator, train: bool) -> Example:
    # Shape and colour classes: one centred object, 0.22-0.32 of the shorter side.
    if name == "ShapeCls":
        value = scenes.pick(rng, scenes.SHAPES)
        objects = [scenes.centred(rng, shape=value)]
    elif name == "ColorCls":
        value = scenes.pick(rng, scenes.COLORS)
        objects = [scenes.centred(rng, color=value)]
    else:  # CountCls
        n = int(rng.integers(1, len(scenes.NUMBERS) + 1))
        value, objects = scenes.NUMBERS[n - 1], scenes.objects(rng, n)
    image, _ = scenes.draw(rng, objects)
    return Example("", image, _label(value, rng, train), None, qry_shows=tuple(objects))


def _vqa_scene(rng: np.random.Generator) -> list[scenes.Obj]:
    """1-4 objects of two shapes and two colours at most (so counts repeat), one of them the
    clearly largest half the time."""
    n = int(rng.integers(1, 5))
    shapes, colors = scenes.pick(rng, scenes.SHAPES, 2), scenes.pick(rng, scenes.COLORS, 2)
    objects = scenes.objects(
        rng,
        n,
        shapes=[scenes.pick(rng, shapes) for _ in range(n)],
        colors=[scenes.pick(rng, colors) for _ in range(n)],
    )
    if rng.random() < 0.5:
        largest = int(rng.integers(n))
        # Fractions of the shorter side: the largest clearly larger than the others.
        sizes = [0.32 if j == largest else 0.18 for j in range(n)]
        objects = [dataclasses.replace(o, size=size) for o, size in zip(objects, sizes)]
    return objects


def _vqa_questions(objects: list[scenes.Obj]) -> list[tuple[str, str]]:
    """Every (question, answer) the scene answers without ambiguity."""
    count = lambda attribute, value: sum(getattr(o, attribute) == value for o in objects)  # noqa: E731
    questions = []
    for shape in sorted({o.shape for o in objects}):
        n = count("shape", shape)
        questions.append((f"How many {scenes.plural(shape, 2)} are there?", scenes.NUMBERS[n - 1]))
        if n == 1:
            color = next(o.color for o in objects if o.shape == shape)
            questions.append((f"What color is the {shape}?", color))
    for color in sorted({o.color for o in objects}):
        n = count("color", color)
        questions.append((f"Count the {color} objects.", scenes.NUMBERS[n - 1]))
        if n == 1:
            shape = next(o.shape for o in objects if o.color == color)
            questions.append((f"What shape is the {color} object?", shape))
    sizes = sorted(o.size for o in objects)
    if len(objects) > 1 and sizes[-1] - sizes[-2] >= CLEARLY_LARGER:
        largest = max(objects, key=lambda o: o.size)
        for attribute in ("shape", "color"):
            question = f"Name the {attribute} of the largest object."
            questions.append((question, getattr(largest, attribute)))
    return questions


def _shape_vqa(rng: np.random.Generator, train: bool) -> list[Example]:
    """Questions about one scene's counts, shapes and colours: 1-3 rows sharing the image in
    training (as VQA data asks several questions of an image), one in evaluation."""
    objects = _vqa_scene(rng)
    image, _ = scenes.draw(rng, objects)
    questions = _vqa_questions(objects)
    asked = scenes.pick(
        rng, questions, min(len(questions), int(rng.integers(1, 4)) if train else 1)
    )
    return [
        Example(question, image, _label(answer, rng, train), None, qry_shows=tuple(objects))
        for question, answer in asked
    ]


def _position_vqa(rng: np.random.Generator) -> Example:
    n = int(rng.integers(1, 5))
    objects = scenes.objects(rng, n, shapes=scenes.pick(rng, scenes.SHAPES, n))
    image, _ = scenes.draw(rng, objects)
    target = objects[int(rng.integers(0, n))]
    question = f"Where is the {target.color} {target.shape} in the image?"
    return Example(question, image, scenes.POSITIONS[target.cell], None, qry_shows=tuple(objects))


def _shape_edit(rng: np.random.Generator) -> Example:
    """An edit of one object's colour. The unedited scene and up to two other siblings of
    the edited one (all on one canvas) are its first distractors."""
    objects = scenes.objects(rng, int(rng.integers(1, 4)))
    i = int(rng.integers(0, len(objects)))
    new_color = scenes.pick(rng, [c for c in scenes.COLORS if c != objects[i].color])
    edited = list(objects)
    edited[i] = dataclasses.replace(objects[i], color=new_color)
    count = int(rng.integers(0, MAX_SIBLING_DISTRACTORS))
    others = siblings.distinct_siblings(rng, edited, count, avoid=(objects,))
    variants = [objects, edited, *others]
    (source, _), (target, _), *drawn = siblings.draw_alike(rng, variants)
    change = f"make the {objects[i].color} {objects[i].shape} {new_color}"
    hardest = [(REPRESENT_IMAGE, image, tuple(v)) for v, (image, _) in zip(others, drawn)]
    return Example(
        change,
        source,
        REPRESENT_IMAGE,
        target,
        [(REPRESENT_IMAGE, source, tuple(objects)), *hardest],
        qry_shows=tuple(objects),
        pos_shows=tuple(edited),
    )


def _caption_example(name: str, objects, image, caption: str) -> Example:
    if name.endswith("t2i"):
        return Example(caption, None, REPRESENT_IMAGE, image, pos_shows=tuple(objects))
    return Example("", image, caption, None, qry_shows=tuple(objects))


def _caption_rows(
    name: str, rng: np.random.Generator, train: bool, earlier: list[Example]
) -> list[Example]:
    """A caption scene as a row. In training, REUSED_CAPTIONS of the rows name an earlier
    row's objects, placed anew and worded otherwise, and SIBLING_SHARE of the scenes bring a
    sibling as the next row; in evaluation a query brings up to MAX_SIBLING_DISTRACTORS
    siblings as distractors."""
    if train and earlier and rng.random() < REUSED_CAPTIONS:
        source = earlier[int(rng.integers(len(earlier)))]
        shown = source.qry_shows or source.pos_shows
        shapes, colors = [o.shape for o in shown], [o.color for o in shown]
        objects = scenes.objects(rng, len(shown), shapes=shapes, colors=colors)
        image, _ = scenes.draw(rng, objects)
        caption = source.question if name.endswith("t2i") else source.pos_text
        return [_caption_example(name, objects, image, wording.reworded(caption, rng))]
    objects = scenes.objects(rng, int(rng.integers(1, 4)))
    if train:
        count = int(rng.random() < SIBLING_SHARE)
    else:
        count = int(rng.integers(0, MAX_SIBLING_DISTRACTORS + 1))
    variants = [objects, *siblings.distinct_siblings(rng, objects, count)]
    examples = [
        _caption_example(name, v, image, scenes.caption(v))
        for v, (image, _) in zip(variants, siblings.draw_alike(rng, variants))
    ]
    if train:
        return examples
    examples[0].distractors = [(e.pos_text, e.pos_image, e.pos_shows) for e in examples[1:]]
    return examples[:1]


def _grounding_example(name: str, instruction: str, objects, image, boxes, t: int) -> Example:
    """The query for object t of a drawn scene; the scene's other objects' crops are its
    first distractors. ShapeRef-Matching's candidates repeat the query's `instruction`."""
    if name == "ShapeGround":
        label = lambda o: f"{o.color} {o.shape}"  # noqa: E731
        cand_text = lambda o: REPRESENT_CROP  # noqa: E731
    else:
        label = lambda o: f"the {o.color} {o.shape} at the {scenes.POSITIONS[o.cell]}"  # noqa
        cand_text = lambda o: IMAGE + instruction + label(o)  # noqa: E731
    crops = [(cand_text(o), scenes.crop(image, b), (o,)) for o, b in zip(objects, boxes)]
    return Example(
        label(objects[t]),
        image,
        crops[t][0],
        crops[t][1],
        [c for j, c in enumerate(crops) if j != t],
        qry_shows=tuple(objects),
        pos_shows=(objects[t],),
    )


def _grounding_rows(
    name: str, instruction: str, rng: np.random.Generator, train: bool
) -> list[Example]:
    """A grounding scene (objects may share an attribute) as a row; SIBLING_SHARE of them
    get a sibling whose target differs in one attribute: in training the next row, in
    evaluation one more distractor (its crop, at the target's place)."""
    objects = siblings.sharing_objects(rng, int(rng.integers(2, 5)))
    t = int(rng.integers(len(objects)))
    count = int(rng.random() < SIBLING_SHARE)
    variants = [objects, *siblings.distinct_siblings(rng, objects, count, index=t)]
    examples = [
        _grounding_example(name, instruction, v, image, boxes, t)
        for v, (image, boxes) in zip(variants, siblings.draw_alike(rng, variants))
    ]
    if train:
        return examples
    examples[0].distractors += [(e.pos_text, e.pos_image, e.pos_shows) for e in examples[1:]]
    return examples[:1]


def _draw(name: str, instruction: str, rng, train: bool, earlier: list[Example]):
    """The next row(s) of subset `name`: one, or a scene and its sibling."""
    if name in ("ShapeCls", "ColorCls", "CountCls"):
        return [_classification(name, rng, train)]
    if name == "ShapeVQA":
        return _shape_vqa(rng, train)
    if name == "PositionVQA":
        return [_position_vqa(rng)]
    if name in ("ShapeCaption_t2i", "ShapeCaption_i2t"):
        return _caption_rows(name, rng, train, earlier)
    if name == "ShapeEdit":
        return [_shape_edit(rng)]
    if name in ("ShapeGround", "ShapeRef-Matching"):
        return _grounding_rows(name, instruction, rng, train)
    raise ValueError(f"mini-MMEB draws no subset {name!r}; see g2e.demo.mini_mmeb.SUBSETS.")


def draw_subset(
    name: str, rng: np.random.Generator, count: int, *, train: bool, instruction: str
) -> list[Example]:
    """`count` query/positive pairs of mini-MMEB subset `name` (see the module docstring).

    Args:
      name: a subset of SUBSETS.
      rng: the draws' source; the result is a function of its state.
      count: how many.
      train: training rows (labels paraphrased, captions reused in other words, siblings as
        rows of their own) or evaluation rows (canonical words; siblings as distractors).
      instruction: the subset's query instruction (ShapeRef-Matching's candidates repeat it).
    """
    examples: list[Example] = []
    while len(examples) < count:
        examples += _draw(name, instruction, rng, train, examples)
    return examples[:count]
