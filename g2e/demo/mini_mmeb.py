"""Mini-MMEB: a procedurally drawn MMEB in the hub's exact train and eval formats.

  python -m g2e.demo.mini_mmeb --out DIR [--seed N] [--scale S]
  (or, as before, python -m g2e.data.mini_mmeb ...)
      [--train_rows 200] [--eval_queries 60] [--candidates 12]

Images are small scenes of coloured shapes on a 3x3 grid (g2e.demo.scenes; grounding
candidates are crops of single objects). Ten subsets cover MMEB's four meta-tasks with an IND/OOD split like MMEB's; IND subsets have training
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
mining expects.

The rows (g2e.demo.mini_rows): evaluation rows say everything in canonical words, so no query
has two right candidates. Training rows also hold what SaHa mining is for: distinct positives
that answer the same queries (paraphrased labels, an earlier row's objects captioned in other
words) and siblings, scenes one colour or shape apart (g2e.demo.siblings), with the other
structure of each subset's scenes. `answers` is the truth of which positive answers which
query, by meaning (g2e.demo.wording), so a judge's quality can be measured against it.

The output is a function of the seed and the sizes (byte for byte, with one Pillow version:
JPEG encoding may differ between versions).
"""

import argparse
import json
import os
import time
from collections.abc import Hashable
from typing import Any

import numpy as np
import PIL.Image

from g2e.data import mmeb
from g2e.data import subsets as subsets_lib
from g2e.demo import mini_rows, scenes, wording
from g2e.demo.mini_rows import IMAGE, Example

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


# The seed streams of a subset (subset_rng's `part`).
TRAIN_PART, EVAL_PART, LESSONS_PART = 0, 1, 2


def subset_rng(seed: int, name: str, part: int) -> np.random.Generator:
    """The seed stream of one part of subset `name`: TRAIN_PART (its training rows, then the
    instructions of the `diverse_instruction` split), EVAL_PART (its evaluation rows, then
    their distractors) or LESSONS_PART (draw_examples')."""
    return np.random.default_rng([seed, list(SUBSETS).index(name), part])


def draw_rows(name: str, rng: np.random.Generator, count: int, train: bool) -> list[Example]:
    """`count` rows of subset `name` as drawn, images in memory (see g2e.demo.mini_rows):
    `build` writes draw_rows(name, subset_rng(seed, name, TRAIN_PART), rows, True) as the
    subset's training rows."""
    instruction = SUBSETS[name][2][0]
    return mini_rows.draw_subset(name, rng, count, train=train, instruction=instruction)


def draw_examples(name: str, seed: int, count: int) -> list[tuple[str, Any, str, Any]]:
    """`count` fresh (query text, query image, positive text, positive image) training pairs
    of subset `name`, images in memory: the same kind of rows the files hold (paraphrases and
    siblings included), for a separate purpose (the demo generator's matching lessons), from
    their own seed."""
    rng, instruction = subset_rng(seed, name, LESSONS_PART), SUBSETS[name][2][0]
    return [
        (query_text(instruction, ex), ex.qry_image, ex.pos_text, ex.pos_image)
        for ex in draw_rows(name, rng, count, train=True)
    ]


def answers(anchor: Any, owner: Any) -> bool:
    """Whether `owner`'s positive also answers `anchor`'s query, as the mini-MMEB is drawn.

    Rows (or anything with qry_text, qry_image, pos_text, pos_image): a text positive (a label,
    an answer, a caption) answers every query whose own positive means the same, in whatever
    words (`wording.canonical`: 'red' is 'a red one', 'two' is '2', 'a red circle and two blue
    stars' is '2 blue stars and one red circle'); an image positive answers a text-only query
    (a caption) whose words mean what its own query's do; no other positive answers another
    row's query (a crop belongs to its own scene, an edit to its own source image). A sibling
    never answers: its words differ in one colour or shape. This is the truth the judge's
    quality is measured against.
    """
    if owner is anchor:
        return True
    if anchor.pos_image is None and owner.pos_image is None:
        return wording.canonical(anchor.pos_text) == wording.canonical(owner.pos_text)
    if (
        anchor.pos_image is not None
        and owner.pos_image is not None
        and anchor.qry_image is None
        and owner.qry_image is None
    ):
        return wording.canonical(_caption(anchor.qry_text)) == wording.canonical(
            _caption(owner.qry_text)
        )
    return False


def _caption(query_text: str) -> str:
    """A retrieval query's own words: the text after its instruction's colon."""
    return query_text.rsplit(": ", 1)[-1].strip()


def query_text(instruction: str, example: Example) -> str:
    """The query's text as the files hold it: placeholder, instruction, question."""
    text = instruction + example.question
    return IMAGE + text if example.qry_image is not None else text


def _meaning(text: str, image, shows: tuple) -> Hashable:
    """What makes a candidate right: its words' meaning, or for an image the objects it shows."""
    if image is None:
        return wording.canonical(text)
    return wording.canonical(scenes.caption(list(shows)))


def _distractors(
    name: str, i: int, examples: list[Example], rng: np.random.Generator, k: int
) -> list[tuple[str, PIL.Image.Image | None]]:
    """Up to k eval negatives for example i, none meaning what its positive means."""
    ex = examples[i]
    meta_task = SUBSETS[name][0]
    if meta_task in ("classification", "vqa"):
        # Answers of the same kind: the label set of the subset (or of the question).
        vocabularies = (scenes.SHAPES, tuple(scenes.COLORS), scenes.NUMBERS, scenes.POSITIONS)
        vocab = next(v for v in vocabularies if ex.pos_text in v)
        others = [v for v in vocab if v != ex.pos_text]
        return [(t, None) for t in scenes.pick(rng, others, min(k, len(others)))]
    own = ex.distractors[:k]
    picked = [(text, image) for text, image, _ in own]
    seen = {_meaning(ex.pos_text, ex.pos_image, ex.pos_shows)}
    seen.update(_meaning(*d) for d in own)
    others = [j for j in range(len(examples)) if j != i]
    for j in scenes.pick(rng, others, len(others)):
        if len(picked) >= k:
            break
        other = examples[j]
        meaning = _meaning(other.pos_text, other.pos_image, other.pos_shows)
        if meaning in seen:
            continue  # it would be a second correct candidate
        seen.add(meaning)
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
                    query_text(instruction, ex),
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
        query = query_text(SUBSETS[name][2][0], ex)
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
    for name, (meta_task, group, _) in SUBSETS.items():
        infos.append(subsets_lib.SubsetInfo(name, meta_task, group, train=group == "IND"))
        if group == "IND":
            rng = subset_rng(seed, name, TRAIN_PART)
            _write_train(out_dir, name, draw_rows(name, rng, train_rows, train=True), rng)
        rng = subset_rng(seed, name, EVAL_PART)
        examples = draw_rows(name, rng, eval_queries, train=False)
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
