"""Mini-MMEB: a procedurally drawn MMEB in the hub's exact train and eval formats.

  python -m g2e.data.mini_mmeb --out DIR [--seed N] [--scale S]
      [--train_rows 200] [--eval_queries 60] [--candidates 12]

Images are small (56-112 px sides; grounding candidates are crops of single objects) scenes
of coloured shapes on a 3x3 grid. Ten subsets
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
its text starts with one). Classification labels repeat across rows, so candidates have
several owner queries, as SaHa mining expects. The output is a function of the seed and the
sizes (byte for byte, with one Pillow version: JPEG encoding may differ between versions).
"""

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pyarrow as pa
import pyarrow.parquet as pq

from g2e.data import mmeb
from g2e.data import subsets as subsets_lib

IMAGE = "<|image_1|>\n"
REPRESENT_IMAGE = IMAGE + "Represent the given image."
REPRESENT_CROP = IMAGE + "Represent the given cropped image of the object"
MIN_SIDE, MAX_SIDE = 56, 112

SHAPES = ("circle", "triangle", "square", "diamond", "pentagon", "hexagon", "star", "cross")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "orange": (245, 130, 20),
    "purple": (140, 40, 180),
    "black": (20, 20, 20),
    "pink": (240, 110, 180),
}
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
NUMBERS = ("one", "two", "three", "four", "five", "six")

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


@dataclasses.dataclass(frozen=True)
class Obj:
    """One drawn object: shape, colour name, grid cell (0..8, row-major) and relative size."""

    shape: str
    color: str
    cell: int
    size: float


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


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a star or cross centred on (cx, cy) with outer radius r."""
    if shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(cx + rr * np.cos(a), cy - rr * np.sin(a)) for a, rr in zip(angles, radii)]
    t = 0.35 * r  # half-width of the cross's bars
    pts = [
        (t, r),
        (t, t),
        (r, t),
        (r, -t),
        (t, -t),
        (t, -r),
        (-t, -r),
        (-t, -t),
        (-r, -t),
        (-r, t),
        (-t, t),
        (-t, r),
    ]
    return [(cx + x, cy + y) for x, y in pts]


def draw(
    rng: np.random.Generator,
    objects: list[Obj],
) -> tuple[PIL.Image.Image, list[tuple[int, int, int, int]]]:
    """Draws `objects` on a pale background of random size; returns the image and each
    object's bounding box (x0, y0, x1, y1)."""
    w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    grey = int(rng.integers(205, 246))
    image = PIL.Image.new("RGB", (w, h), (grey, grey, grey))
    canvas = PIL.ImageDraw.Draw(image)
    boxes = []
    for obj in objects:
        row, col = divmod(obj.cell, 3)
        r = obj.size * min(w, h) / 6
        cx = (col + 0.5) * w / 3 + rng.uniform(-0.1, 0.1) * w / 3
        cy = (row + 0.5) * h / 3 + rng.uniform(-0.1, 0.1) * h / 3
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape in ("star", "cross"):
            canvas.polygon(_polygon(obj.shape, cx, cy, r), fill=fill)
        else:
            sides = {"triangle": 3, "square": 4, "diamond": 4, "pentagon": 5, "hexagon": 6}
            rotation = {"diamond": 45}.get(obj.shape, 0)  # PIL draws a 4-gon axis-aligned
            canvas.regular_polygon((cx, cy, r), sides[obj.shape], rotation=rotation, fill=fill)
        boxes.append(
            (
                max(0, int(cx - r) - 2),
                max(0, int(cy - r) - 2),
                min(w, int(cx + r) + 3),
                min(h, int(cy + r) + 3),
            )
        )
    return image, boxes


def _objects(rng: np.random.Generator, n: int, shapes=None, colors=None) -> list[Obj]:
    """n objects in distinct cells; shapes/colors fix them, else they are drawn at random."""
    cells = rng.choice(9, size=n, replace=False)
    shapes = shapes or [SHAPES[i] for i in rng.integers(0, len(SHAPES), size=n)]
    colors = colors or [list(COLORS)[i] for i in rng.integers(0, len(COLORS), size=n)]
    return [
        Obj(s, c, int(cell), float(rng.uniform(0.55, 0.9)))
        for s, c, cell in zip(shapes, colors, cells)
    ]


def _pick(rng: np.random.Generator, items, k: int | None = None):
    """One item (k=None) or k distinct items of `items`, drawn at random."""
    items = list(items)
    if k is None:
        return items[int(rng.integers(0, len(items)))]
    return [items[i] for i in rng.choice(len(items), size=k, replace=False)]


def _plural(shape: str, count: int) -> str:
    if count == 1:
        return shape
    return shape + ("es" if shape == "cross" else "s")


def caption(objects: list[Obj]) -> str:
    """'two red circles and a blue star': objects grouped by colour and shape."""
    groups: dict[tuple[str, str], int] = {}
    for o in sorted(objects, key=lambda o: o.cell):
        groups[(o.color, o.shape)] = groups.get((o.color, o.shape), 0) + 1
    article = lambda color: "an" if color[0] in "aeiou" else "a"
    parts = [
        f"{article(color) if n == 1 else NUMBERS[n - 1]} {color} {_plural(shape, n)}"
        for (color, shape), n in groups.items()
    ]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _crop(image: PIL.Image.Image, box) -> PIL.Image.Image:
    return image.crop(box)


def _example(name: str, rng: np.random.Generator) -> Example:
    """Draws one query/positive pair of subset `name`."""
    if name == "ShapeCls":
        shape = _pick(rng, SHAPES)
        image, _ = draw(rng, _objects(rng, 1, shapes=[shape]))
        return Example("", image, shape, None)
    if name == "ColorCls":
        color, n = _pick(rng, COLORS), int(rng.integers(1, 4))
        image, _ = draw(rng, _objects(rng, n, colors=[color] * n))
        return Example("", image, color, None)
    if name == "CountCls":
        n = int(rng.integers(1, len(NUMBERS) + 1))
        image, _ = draw(rng, _objects(rng, n))
        return Example("", image, NUMBERS[n - 1], None)
    if name == "ShapeVQA":
        kind = int(rng.integers(0, 3))
        if kind == 2:  # counting: k copies of one shape among other shapes
            shape, k = _pick(rng, SHAPES), int(rng.integers(1, 5))
            others = [s for s in _pick(rng, SHAPES, 3) if s != shape][: int(rng.integers(0, 3))]
            image, _ = draw(rng, _objects(rng, k + len(others), shapes=[shape] * k + others))
            return Example(f"How many {_plural(shape, 2)} are there?", image, NUMBERS[k - 1], None)
        n = int(rng.integers(1, 4))
        objects = _objects(rng, n, shapes=_pick(rng, SHAPES, n), colors=_pick(rng, COLORS, n))
        image, _ = draw(rng, objects)
        target = objects[int(rng.integers(0, n))]
        if kind == 0:
            return Example(f"What shape is the {target.color} object?", image, target.shape, None)
        return Example(f"What color is the {target.shape}?", image, target.color, None)
    if name == "PositionVQA":
        n = int(rng.integers(1, 5))
        objects = _objects(rng, n, shapes=_pick(rng, SHAPES, n))
        image, _ = draw(rng, objects)
        target = objects[int(rng.integers(0, n))]
        return Example(
            f"Where is the {target.color} {target.shape} in the image?",
            image,
            POSITIONS[target.cell],
            None,
        )
    if name in ("ShapeCaption_t2i", "ShapeCaption_i2t"):
        objects = _objects(rng, int(rng.integers(1, 4)))
        image, _ = draw(rng, objects)
        if name.endswith("t2i"):
            return Example(caption(objects), None, REPRESENT_IMAGE, image)
        return Example("", image, caption(objects), None)
    if name == "ShapeEdit":
        objects = _objects(rng, int(rng.integers(1, 4)))
        state = rng.bit_generator.state
        source, _ = draw(rng, objects)
        i = int(rng.integers(0, len(objects)))
        new_color = _pick(rng, [c for c in COLORS if c != objects[i].color])
        edited = list(objects)
        edited[i] = dataclasses.replace(objects[i], color=new_color)
        after = rng.bit_generator.state
        rng.bit_generator.state = state  # same canvas and placement for the edited scene
        target, _ = draw(rng, edited)
        rng.bit_generator.state = after
        change = f"make the {objects[i].color} {objects[i].shape} {new_color}"
        # The unedited scene is the hardest negative.
        return Example(change, source, REPRESENT_IMAGE, target, [(REPRESENT_IMAGE, source)])
    if name in ("ShapeGround", "ShapeRef-Matching"):
        n = int(rng.integers(2, 5))
        objects = _objects(rng, n, shapes=_pick(rng, SHAPES, n), colors=_pick(rng, COLORS, n))
        image, boxes = draw(rng, objects)
        instruction = SUBSETS[name][2][0]
        if name == "ShapeGround":
            label = lambda o: f"{o.color} {o.shape}"
            cand_text = lambda o: REPRESENT_CROP
        else:
            label = lambda o: f"the {o.color} {o.shape} at the {POSITIONS[o.cell]}"
            cand_text = lambda o: IMAGE + instruction + label(o)
        crops = [(cand_text(o), _crop(image, b)) for o, b in zip(objects, boxes)]
        t = int(rng.integers(0, n))
        # The scene's other objects are the hard negatives.
        return Example(
            label(objects[t]),
            image,
            crops[t][0],
            crops[t][1],
            [c for j, c in enumerate(crops) if j != t],
        )
    raise ValueError(f"mini-MMEB has no subset {name!r}; its subsets: {list(SUBSETS)}.")


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
        vocab = next((v for v in (SHAPES, tuple(COLORS), NUMBERS, POSITIONS) if ex.pos_text in v))
        return [
            (t, None)
            for t in _pick(rng, [v for v in vocab if v != ex.pos_text], min(k, len(vocab) - 1))
        ]
    # What makes a candidate right: its caption for text positives, else the query's words.
    key = lambda e: e.pos_text if e.pos_image is None else e.question
    picked = list(ex.distractors[:k])
    others = [j for j in range(len(examples)) if j != i]
    seen = {key(ex)}
    for j in _pick(rng, others, len(others)):
        if len(picked) >= k:
            break
        other = examples[j]
        if key(other) in seen:
            continue  # it would be a second correct candidate
        seen.add(key(other))
        picked.append((other.pos_text, other.pos_image))
    return picked


class _ImageWriter:
    """Saves images under DIR/images/<Subset>/<Train|Test>/ and returns their relative path."""

    def __init__(self, out_dir: str, subset: str, part: str):
        self.out_dir, self.folder = out_dir, f"images/{subset}/{part}"
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


def _write_parquet(path: str, records: list[dict], schema: pa.Schema) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)


TRAIN_SCHEMA = pa.schema([(c, pa.string()) for c in mmeb.TRAIN_COLUMNS])
EVAL_SCHEMA = pa.schema(
    [
        ("qry_text", pa.string()),
        ("qry_img_path", pa.string()),
        ("tgt_text", pa.list_(pa.string())),
        ("tgt_img_path", pa.list_(pa.string())),
    ]
)


def _write_train(out_dir: str, name: str, examples: list[Example], rng) -> None:
    save = _ImageWriter(out_dir, name, "Train")
    instructions = SUBSETS[name][2]
    for split in ("original", "diverse_instruction"):
        records = []
        for ex in examples:
            instruction = instructions[0] if split == "original" else _pick(rng, instructions[1:])
            records.append(
                dict(
                    qry=_query_text(instruction, ex),
                    qry_image_path=save(ex.qry_image),
                    pos_text=ex.pos_text,
                    pos_image_path=save(ex.pos_image),
                    neg_text="",
                    neg_image_path="",
                )
            )
        path = os.path.join(out_dir, "train", name, f"{split}-00000-of-00001.parquet")
        _write_parquet(path, records, TRAIN_SCHEMA)


def _write_eval(out_dir: str, name: str, examples: list[Example], rng, candidates: int):
    save = _ImageWriter(out_dir, name, "Test")
    records = []
    for i, ex in enumerate(examples):
        targets = [(ex.pos_text, ex.pos_image)]
        targets += _distractors(name, i, examples, rng, candidates - 1)
        records.append(
            dict(
                qry_text=_query_text(SUBSETS[name][2][0], ex),
                qry_img_path=save(ex.qry_image),
                tgt_text=[t for t, _ in targets],
                tgt_img_path=[save(im) for _, im in targets],
            )
        )
    _write_parquet(
        os.path.join(out_dir, "eval", name, "test-00000-of-00001.parquet"), records, EVAL_SCHEMA
    )


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
