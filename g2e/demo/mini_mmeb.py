"""Mini-MMEB: a procedurally drawn MMEB in the hub's exact train and eval formats.

  python -m g2e.demo.mini_mmeb --out DIR [--seed N] [--scale S]
  (or, as before, python -m g2e.data.mini_mmeb ...)
      [--train_rows 200] [--eval_queries 60] [--candidates 12]

Images are small (56-112 px sides; grounding candidates are crops of single objects) scenes
of coloured shapes on a 3x3 grid (g2e.demo.scenes). Ten subsets
cover MMEB's four meta-tasks with an IND/OOD split like MMEB's; IND subsets have training
data, OOD subsets are evaluation only:

  IND  classification ShapeCls, ColorCls   vqa ShapeVQA   retrieval ShapeCaption_t2i,
       ShapeCaption_i2t   grounding ShapeGround
  OOD  classification CountCls   vqa PositionVQA   retrieval ShapeEdit (image+text -> image,
       like CIRR)   grounding ShapeRef-Matching (like RefCOCO-Matching)

Layout written (train image root = eval image root = DIR):
  DIR/subsets.json                                          meta-task and IND/OOD per subset
  DIR/train/<Subset>/original-00000-of-00001.parquet        MMEB-train columns
  DIR/train/<Subset>/diverse_instruction-00000-of-00001.parquet  same rows, varied instructions
  DIR/eval/<Subset>/test-00000-of-00001.parquet             MMEB-eval columns
  DIR/images/<Subset>/{Train,Test}/*.jpg                    paths as the parquet names them
Texts carry `<|image_1|>` placeholders exactly like MMEB (an item has an image exactly when
its text starts with one). No subset can be solved by copying text from the query: where a
candidate's text could be found in its query, every candidate carries that text.
Classification labels repeat across rows, so candidates have several owner queries, as SaHa
mining expects. The output is a function of the seed and the
sizes (byte for byte, with one Pillow version: JPEG encoding may differ between versions).
"""

import argparse
import dataclasses
import json
import os
import time
from typing import Any

import numpy as np
import PIL.Image

from g2e.data import mmeb
from g2e.data import subsets as subsets_lib
from g2e.demo import scenes

IMAGE = "<|image_1|>\n"
REPRESENT_IMAGE = IMAGE + "Represent the given image."
REPRESENT_CROP = IMAGE + "Represent the given cropped image of the object"

# (meta-task, group, query instructions: the first is the `original` split's, the rest are
# the `diverse_instruction` split's alternatives).
SUBSETS = {
    "ShapeCls": (
        "classification",
        "IND",
        (
            "Represent the given image for classification",
            "Identify the category of the shape in the given image",
            "Classify the given image by the shape it shows",
        ),
    ),
    "ColorCls": (
        "classification",
        "IND",
        (
            "Represent the given image for color classification",
            "Identify the color of the objects in the given image",
            "Classify the given image by the color of its objects",
        ),
    ),
    "ShapeVQA": (
        "vqa",
        "IND",
        (
            "Represent the given image with the following question: ",
            "Given the image, answer the following question: ",
            "Look at the image and represent this question about it: ",
        ),
    ),
    "ShapeCaption_t2i": (
        "retrieval",
        "IND",
        (
            "Find me an everyday image that matches the given caption: ",
            "Retrieve the image described by the following caption: ",
            "Find a picture that fits this description: ",
        ),
    ),
    "ShapeCaption_i2t": (
        "retrieval",
        "IND",
        (
            "Find an image caption describing the given everyday image.",
            "Retrieve a caption that describes the given image.",
            "Find the text that best describes this picture.",
        ),
    ),
    "ShapeGround": (
        "grounding",
        "IND",
        (
            "Select the portion of the image that isolates the object of the given label: ",
            "Locate the region of the image that shows the given object: ",
            "Find the part of the image containing this object: ",
        ),
    ),
    "CountCls": ("classification", "OOD", ("Represent the given image for counting the objects",)),
    "PositionVQA": ("vqa", "OOD", ("Represent the given image with the following question: ",)),
    "ShapeEdit": (
        "retrieval",
        "OOD",
        ("Given an image, find a similar everyday image with the described changes: ",),
    ),
    "ShapeRef-Matching": (
        "grounding",
        "OOD",
        ("Select the portion of the image that follows the language expressions: ",),
    ),
}


@dataclasses.dataclass
class Example:
    """One query and its positive, before writing. `question` follows the instruction in the
    query text; `distractors` are this query's eval negatives as (text, image) pairs, drawn
    later from the subset's pool when empty."""

    question: str
    qry_image: PIL.Image.Image | None
    pos_text: str
    pos_image: PIL.Image.Image | None
    distractors: list = dataclasses.field(default_factory=list)


def _distinct_objects(rng: np.random.Generator, n: int) -> list[scenes.Obj]:
    """n objects of distinct shapes and distinct colours."""
    shapes = scenes.pick(rng, scenes.SHAPES, n)
    colors = scenes.pick(rng, scenes.COLORS, n)
    return scenes.objects(rng, n, shapes=shapes, colors=colors)


def _classification(name: str, rng: np.random.Generator) -> Example:
    if name == "ShapeCls":
        shape = scenes.pick(rng, scenes.SHAPES)
        image, _ = scenes.draw(rng, scenes.objects(rng, 1, shapes=[shape]))
        return Example("", image, shape, None)
    if name == "ColorCls":
        color, n = scenes.pick(rng, scenes.COLORS), int(rng.integers(1, 4))
        image, _ = scenes.draw(rng, scenes.objects(rng, n, colors=[color] * n))
        return Example("", image, color, None)
    n = int(rng.integers(1, len(scenes.NUMBERS) + 1))  # CountCls
    image, _ = scenes.draw(rng, scenes.objects(rng, n))
    return Example("", image, scenes.NUMBERS[n - 1], None)


def _shape_vqa(rng: np.random.Generator) -> Example:
    kind = int(rng.integers(0, 3))
    if kind == 2:  # counting: k copies of one shape among other shapes
        shape, k = scenes.pick(rng, scenes.SHAPES), int(rng.integers(1, 5))
        others = [s for s in scenes.pick(rng, scenes.SHAPES, 3) if s != shape]
        others = others[: int(rng.integers(0, 3))]
        objects = scenes.objects(rng, k + len(others), shapes=[shape] * k + others)
        image, _ = scenes.draw(rng, objects)
        question = f"How many {scenes.plural(shape, 2)} are there?"
        return Example(question, image, scenes.NUMBERS[k - 1], None)
    n = int(rng.integers(1, 4))
    objects = _distinct_objects(rng, n)
    image, _ = scenes.draw(rng, objects)
    target = objects[int(rng.integers(0, n))]
    if kind == 0:
        return Example(f"What shape is the {target.color} object?", image, target.shape, None)
    return Example(f"What color is the {target.shape}?", image, target.color, None)


def _position_vqa(rng: np.random.Generator) -> Example:
    n = int(rng.integers(1, 5))
    objects = scenes.objects(rng, n, shapes=scenes.pick(rng, scenes.SHAPES, n))
    image, _ = scenes.draw(rng, objects)
    target = objects[int(rng.integers(0, n))]
    return Example(
        f"Where is the {target.color} {target.shape} in the image?",
        image,
        scenes.POSITIONS[target.cell],
        None,
    )


def _shape_edit(rng: np.random.Generator) -> Example:
    objects = scenes.objects(rng, int(rng.integers(1, 4)))
    state = rng.bit_generator.state
    source, _ = scenes.draw(rng, objects)
    i = int(rng.integers(0, len(objects)))
    new_color = scenes.pick(rng, [c for c in scenes.COLORS if c != objects[i].color])
    edited = list(objects)
    edited[i] = dataclasses.replace(objects[i], color=new_color)
    after = rng.bit_generator.state
    rng.bit_generator.state = state  # same canvas and placement for the edited scene
    target, _ = scenes.draw(rng, edited)
    rng.bit_generator.state = after
    change = f"make the {objects[i].color} {objects[i].shape} {new_color}"
    # The unedited scene is the hardest negative.
    return Example(change, source, REPRESENT_IMAGE, target, [(REPRESENT_IMAGE, source)])


def _grounding(name: str, rng: np.random.Generator) -> Example:
    n = int(rng.integers(2, 5))
    objects = _distinct_objects(rng, n)
    image, boxes = scenes.draw(rng, objects)
    instruction = SUBSETS[name][2][0]
    if name == "ShapeGround":
        label = lambda o: f"{o.color} {o.shape}"  # noqa: E731
        cand_text = lambda o: REPRESENT_CROP  # noqa: E731
    else:
        label = lambda o: f"the {o.color} {o.shape} at the {scenes.POSITIONS[o.cell]}"  # noqa
        cand_text = lambda o: IMAGE + instruction + label(o)  # noqa: E731
    crops = [(cand_text(o), scenes.crop(image, b)) for o, b in zip(objects, boxes)]
    t = int(rng.integers(0, n))
    # The scene's other objects are the hard negatives.
    return Example(
        label(objects[t]),
        image,
        crops[t][0],
        crops[t][1],
        [c for j, c in enumerate(crops) if j != t],
    )


def _example(name: str, rng: np.random.Generator) -> Example:
    """Draws one query/positive pair of subset `name`."""
    if name in ("ShapeCls", "ColorCls", "CountCls"):
        return _classification(name, rng)
    if name == "ShapeVQA":
        return _shape_vqa(rng)
    if name == "PositionVQA":
        return _position_vqa(rng)
    if name in ("ShapeCaption_t2i", "ShapeCaption_i2t"):
        objects = scenes.objects(rng, int(rng.integers(1, 4)))
        image, _ = scenes.draw(rng, objects)
        if name.endswith("t2i"):
            return Example(scenes.caption(objects), None, REPRESENT_IMAGE, image)
        return Example("", image, scenes.caption(objects), None)
    if name == "ShapeEdit":
        return _shape_edit(rng)
    if name in ("ShapeGround", "ShapeRef-Matching"):
        return _grounding(name, rng)
    raise ValueError(f"mini-MMEB has no subset {name!r}; its subsets: {list(SUBSETS)}.")


def draw_examples(name: str, seed: int, count: int) -> list[tuple[str, Any, str, Any]]:
    """`count` fresh (query text, query image, positive text, positive image) pairs of subset
    `name`, images in memory: the same kind of rows the files hold, for a separate purpose (the
    demo generator's matching lessons), from their own seed."""
    rng = np.random.default_rng([seed, list(SUBSETS).index(name), 2])
    instruction = SUBSETS[name][2][0]
    pairs = []
    for _ in range(count):
        example = _example(name, rng)
        pairs.append(
            (
                _query_text(instruction, example),
                example.qry_image,
                example.pos_text,
                example.pos_image,
            )
        )
    return pairs


def answers(anchor: Any, owner: Any) -> bool:
    """Whether `owner`'s positive also answers `anchor`'s query, as the mini-MMEB is drawn.

    Rows (or anything with qry_text, qry_image, pos_text, pos_image): a text positive (a label,
    an answer, a caption) answers every query whose own positive says the same (the same
    words, or a caption naming the same objects in another order: "a red circle and a blue
    star" is "a blue star and a red circle"); an image positive answers a text-only query (a
    caption) naming the same objects as its own query; no other positive answers another row's
    query (a crop belongs to its own scene, an edit to its own source image). This is the truth
    the judge's quality is measured against.
    """
    if owner is anchor:
        return True
    if anchor.pos_image is None and owner.pos_image is None:
        return caption_parts(anchor.pos_text) == caption_parts(owner.pos_text)
    if (
        anchor.pos_image is not None
        and owner.pos_image is not None
        and anchor.qry_image is None
        and owner.qry_image is None
    ):
        return caption_parts(_caption(anchor.qry_text)) == caption_parts(_caption(owner.qry_text))
    return False


def caption_parts(text: str) -> frozenset[str]:
    """What a caption names, in any order: 'two red circles and a blue star' ->
    {'two red circles', 'a blue star'} (a label or an answer is one part)."""
    parts = text.strip().replace(" and ", ", ").split(", ")
    return frozenset(part.strip() for part in parts)


def _caption(query_text: str) -> str:
    """A retrieval query's own words: the text after its instruction's colon."""
    return query_text.rsplit(": ", 1)[-1].strip()


def _query_text(instruction: str, example: Example) -> str:
    text = instruction + example.question
    return IMAGE + text if example.qry_image is not None else text


def _distractors(
    name: str, i: int, examples: list[Example], rng: np.random.Generator, k: int
) -> list[tuple[str, PIL.Image.Image | None]]:
    """Up to k eval negatives for example i, none equal to its positive."""
    ex = examples[i]
    meta_task = SUBSETS[name][0]
    if meta_task in ("classification", "vqa"):
        # Answers of the same kind: the label set of the subset (or of the question).
        vocabularies = (scenes.SHAPES, tuple(scenes.COLORS), scenes.NUMBERS, scenes.POSITIONS)
        vocab = next(v for v in vocabularies if ex.pos_text in v)
        return [
            (t, None)
            for t in scenes.pick(
                rng, [v for v in vocab if v != ex.pos_text], min(k, len(vocab) - 1)
            )
        ]
    # What makes a candidate right: its caption for text positives, else the query's words.
    key = lambda e: e.pos_text if e.pos_image is None else e.question
    picked = list(ex.distractors[:k])
    others = [j for j in range(len(examples)) if j != i]
    seen = {key(ex)}
    for j in scenes.pick(rng, others, len(others)):
        if len(picked) >= k:
            break
        other = examples[j]
        if key(other) in seen:
            continue  # it would be a second correct candidate
        seen.add(key(other))
        picked.append((other.pos_text, other.pos_image))
    if ex.pos_image is not None:
        # Image candidates all carry the positive's text (ShapeRef-Matching's is the query's
        # own expression): only the image tells the positive apart, never copied text.
        picked = [(ex.pos_text, image) for _, image in picked]
    return picked


class _ImageWriter:
    """Saves images under DIR/images/<Subset>/<Train|Test>/ and returns their relative path."""

    def __init__(self, out_dir: str, subset: str, part: str):
        self.out_dir, self.folder = out_dir, mmeb.image_folder(subset, part)
        os.makedirs(os.path.join(out_dir, self.folder), exist_ok=True)
        self.paths: dict[int, str] = {}

    def __call__(self, image: PIL.Image.Image | None) -> str:
        if image is None:
            return ""
        if id(image) not in self.paths:  # an image shared by several candidate lists
            path = f"{self.folder}/{len(self.paths):05d}.jpg"
            image.save(os.path.join(self.out_dir, path), quality=90)
            self.paths[id(image)] = path
        return self.paths[id(image)]


def _write_train(out_dir: str, name: str, examples: list[Example], rng) -> None:
    save = _ImageWriter(out_dir, name, "Train")
    instructions = SUBSETS[name][2]
    for split in mmeb.TRAIN_SPLITS:
        records = []
        for ex in examples:
            instruction = (
                instructions[0] if split == "original" else scenes.pick(rng, instructions[1:])
            )
            records.append(
                mmeb.train_record(
                    _query_text(instruction, ex),
                    save(ex.qry_image),
                    ex.pos_text,
                    save(ex.pos_image),
                )
            )
        mmeb.write_split(os.path.join(out_dir, "train"), name, split, records)


def _write_eval(out_dir: str, name: str, examples: list[Example], rng, candidates: int):
    save = _ImageWriter(out_dir, name, "Test")
    records = []
    for i, ex in enumerate(examples):
        targets = [(ex.pos_text, ex.pos_image)]
        targets += _distractors(name, i, examples, rng, candidates - 1)
        query = _query_text(SUBSETS[name][2][0], ex)
        records.append(
            mmeb.eval_record(query, save(ex.qry_image), [(t, save(im)) for t, im in targets])
        )
    mmeb.write_split(os.path.join(out_dir, "eval"), name, mmeb.EVAL_SPLIT, records)


def build(
    out_dir: str, seed: int = 0, train_rows: int = 200, eval_queries: int = 60, candidates: int = 12
) -> dict:
    """Writes the mini-MMEB to `out_dir`; returns a summary (subsets, rows, seconds).

    Args:
      out_dir: output folder (created); it must not already hold a mini-MMEB's subsets, so
        that no stale file survives a rebuild.
      seed: the output is a function of the seed and the sizes.
      train_rows: rows per training subset (each of the two splits).
      eval_queries: queries per evaluation subset.
      candidates: candidates per eval query at most (positive first); label and answer
        subsets have fewer when their vocabulary is smaller.
    """
    if train_rows < 1 or eval_queries < 2 or candidates < 2:
        raise ValueError(
            f"mini-MMEB sizes train_rows={train_rows} eval_queries={eval_queries} "
            f"candidates={candidates}: need >= 1, >= 2, >= 2."
        )
    if os.path.exists(os.path.join(out_dir, subsets_lib.MANIFEST_NAME)):
        raise FileExistsError(
            f"{out_dir} already holds a mini-MMEB; remove it or pick another --out."
        )
    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    infos = []
    for k, (name, (meta_task, group, _)) in enumerate(SUBSETS.items()):
        infos.append(subsets_lib.SubsetInfo(name, meta_task, group, train=group == "IND"))
        if group == "IND":
            rng = np.random.default_rng([seed, k, 0])
            _write_train(out_dir, name, [_example(name, rng) for _ in range(train_rows)], rng)
        rng = np.random.default_rng([seed, k, 1])
        examples = [_example(name, rng) for _ in range(eval_queries)]
        _write_eval(out_dir, name, examples, rng, candidates)
    subsets_lib.write_manifest(out_dir, infos)
    return dict(
        out=out_dir,
        subsets=len(infos),
        train_subsets=sum(i.train for i in infos),
        train_rows=train_rows,
        eval_queries=eval_queries,
        seconds=round(time.perf_counter() - start, 2),
    )


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiplies --train_rows and --eval_queries"
    )
    parser.add_argument("--train_rows", type=int, default=200)
    parser.add_argument("--eval_queries", type=int, default=60)
    parser.add_argument("--candidates", type=int, default=12)
    args = parser.parse_args(argv)
    summary = build(
        args.out,
        seed=args.seed,
        train_rows=max(1, round(args.train_rows * args.scale)),
        eval_queries=max(2, round(args.eval_queries * args.scale)),
        candidates=args.candidates,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
