"""Synthetic MMEB: data in MMEB's exact hub layout at any scale, for work on the host side.

  python -m g2e.data.synthetic_mmeb --out DIR --rows N [--subsets 4] [--eval_queries 1000]
      [--candidates 1000] [--page_fraction 0.15] [--seed 0] [--image_scale 1.0] [--pool 256]

Layout (as g2e.data.mmeb reads it; the train and eval image root is DIR):
  DIR/subsets.json                                        meta-task of each subset (all IND)
  DIR/train/<Subset>/original-00000-of-00001.parquet      MMEB-train columns
  DIR/train/<Subset>/diverse_instruction-00000-of-00001.parquet   same rows, varied wording
  DIR/eval/<Subset>/test-00000-of-00001.parquet           MMEB-eval columns, positive first
  DIR/images/<Subset>/{Train,Test}/<n>.{jpg,png}          the paths the parquet names

Subsets, the meta-tasks in turn (K=4 gives one of each), each with N/K train rows (both
splits) and Q eval queries:
  SynthCls_<k>     classification, like ImageNet-1K: image -> label (C labels in all; eval
                   candidates: the C labels)
  SynthVQA_<k>     vqa, like DocVQA: image + question -> answer (eval: the answer and C-1
                   other queries' answers)
  SynthRet_<k>     retrieval, like MSCOCO_t2i: caption -> image (eval: C images of a pool of
                   max(Q, C), which the queries' candidate lists share, as MMEB's do)
  SynthGround_<k>  grounding, like MSCOCO: image + object label -> crop (eval: C crops of a
                   pool of max(Q, C))
Texts carry `<|image_1|>` exactly when the side has an image, as MMEB's do.

Images: photos are 640x480 JPEGs (COCO, ImageNet, VisualNews), document pages about
1700x2200 PNGs of text-like lines, boxes and bars (DocVQA, InfographicsVQA, ChartQA);
`--image_scale` scales both (small images for memory tests). In every subset an exact
`--page_fraction` of the rows' (and eval pools') main images are pages, at seeded positions
(MMEB keeps its pages in its document VQA subsets; per-image host cost is what matters here).

Speed (the choice made): drawing and encoding a photo takes ~10-35 ms on one core and a page
~100 ms, so 20k rows drawn one by one would take ~10 minutes. Instead a pool of `--pool`
distinct photos and pool/8 distinct pages (with 4 crops each, for grounding) is drawn once,
and each file the rows name is a pool image's encoded bytes with the file's own name written
into a comment (a JPEG COM segment, a PNG tEXt chunk). Every file thus has its own path and
its own bytes (a hash tells them apart) and the decode cost of a real file of its kind, while
files made from one pool entry show the same pixels. A row then costs a file write.
Train rows each have their own image files; eval images are shared by the candidate lists.
Noise-free pages compress better than scans: the PNGs are smaller than DocVQA's (~20 KB vs
~100-300 KB) and somewhat cheaper to inflate; the decode is otherwise a page's.

The output is a function of the seed and the options (byte for byte with one Pillow version).
"""

import argparse
import dataclasses
import io
import json
import os
import struct
import time
import zlib

import numpy as np
import PIL.Image
import PIL.ImageDraw

from g2e.data import mmeb
from g2e.data import subsets as subsets_lib

PHOTO_SIZE = (640, 480)
PAGE_SIZE = (1700, 2200)
CROPS_PER_IMAGE = 4
IMAGE = "<|image_1|>\n"
WORDS = (
    "red green blue small large old new round square bright dark wooden metal glass paper "
    "stone river city table chair window door street market garden harbour bridge tower train "
    "boat horse bird dog cat child woman man tree flower mountain cloud field road house "
    "kitchen office chart report invoice letter form page figure total price date name "
    "number year sales income growth share region"
).split()

# (name prefix, meta-task, instructions: the first is the `original` split's wording).
TASKS = (
    (
        "SynthCls",
        "classification",
        (
            "Represent the given image for classification",
            "Identify the category of the object in the given image",
            "Classify the given image",
        ),
    ),
    (
        "SynthVQA",
        "vqa",
        (
            "Represent the given image with the following question: ",
            "Given the image, answer the following question: ",
            "Look at the image and represent this question about it: ",
        ),
    ),
    (
        "SynthRet",
        "retrieval",
        (
            "Find me an everyday image that matches the given caption: ",
            "Retrieve the image described by the following caption: ",
            "Find a picture that fits this description: ",
        ),
    ),
    (
        "SynthGround",
        "grounding",
        (
            "Select the portion of the image that isolates the object labeled as ",
            "Find the region of the image that shows the object labeled as ",
            "Crop the part of the image that contains the object labeled as ",
        ),
    ),
)
REPRESENT_IMAGE = IMAGE + "Represent the given image."
REPRESENT_CROP = IMAGE + "Represent the given cropped image of the object"


# ---- drawing --------------------------------------------------------------------------------


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def draw_photo(rng: np.random.Generator, size: tuple[int, int] = PHOTO_SIZE) -> PIL.Image.Image:
    """A photo-like RGB image: a smooth colour field, grain, and a few filled shapes."""
    width, height = size
    field = PIL.Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    pixels = np.asarray(field.resize(size, PIL.Image.Resampling.BICUBIC), np.int16)
    grain = rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
    image = PIL.Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8))
    draw = PIL.ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 10))):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(0.05, 0.4) * width, rng.uniform(0.05, 0.4) * height
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x, y, x + w, y + h], fill=_colour(rng), outline=_colour(rng))
    return image


def draw_page(rng: np.random.Generator, size: tuple[int, int] = PAGE_SIZE) -> PIL.Image.Image:
    """A document-page-like RGB image: a title, lines of word-like marks, framed boxes with
    bars (charts, tables) on white."""
    width, height = size
    margin, unit = max(1, width // 11), max(1.0, width / 1700)
    image = PIL.Image.new("RGB", size, "white")
    draw = PIL.ImageDraw.Draw(image)
    y = margin
    draw.rectangle([margin, y, width * rng.uniform(0.4, 0.8), y + 40 * unit], fill=(20, 20, 20))
    y += 90 * unit
    while y < height - margin:
        if rng.random() < 0.07:  # a chart or table box
            box = rng.uniform(150, 450) * unit
            draw.rectangle([margin, y, width - margin, y + box], outline=(0, 0, 0), width=2)
            bars = int(rng.integers(3, 12))
            step = (width - 2 * margin) / (bars + 1)
            for b in range(bars):
                top = y + box * rng.uniform(0.1, 0.9)
                x = margin + step * (b + 0.5)
                draw.rectangle([x, top, x + step * 0.6, y + box - 4], fill=_colour(rng))
            y += box + 40 * unit
            continue
        line = rng.uniform(20, 30) * unit
        x = margin
        while True:
            word = rng.uniform(25, 160) * unit
            if x + word > width - margin:
                break
            draw.rectangle([x, y, x + word, y + 0.7 * line], fill=(35, 35, 35))
            x += word + 0.6 * line
        y += 1.6 * line
    return image


def _encode(image: PIL.Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=90)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def tagged(data: bytes, tag: str) -> bytes:
    """`data` (a JPEG or PNG file) with `tag` written into a comment: other bytes, same pixels."""
    text = tag.encode()
    if data[:2] == b"\xff\xd8":  # JPEG: a COM segment right after SOI
        return data[:2] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + data[2:]
    if data[:8] == b"\x89PNG\r\n\x1a\n":  # PNG: a tEXt chunk right after IHDR (8 + 25 bytes)
        body = b"tEXt" + b"Comment\x00" + text
        chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
        return data[:33] + chunk + data[33:]
    raise ValueError("tagged() takes JPEG or PNG bytes")


@dataclasses.dataclass
class Pool:
    """The distinct base images, encoded: per kind ('photo' JPEG, 'page' PNG) the images and,
    per image, CROPS_PER_IMAGE crops of it (grounding positives)."""

    images: dict[str, list[bytes]]
    crops: dict[str, list[list[bytes]]]
    extension = {"photo": "jpg", "page": "png"}

    @classmethod
    def draw(cls, seed: int, size: int, scale: float, with_pages: bool) -> "Pool":
        rng = np.random.default_rng([seed, 1_000_003])
        images, crops = {}, {}
        for kind, count, draw, base, fmt in (
            ("photo", size, draw_photo, PHOTO_SIZE, "JPEG"),
            ("page", max(1, size // 8) if with_pages else 0, draw_page, PAGE_SIZE, "PNG"),
        ):
            shape = tuple(max(8, round(side * scale)) for side in base)
            images[kind], crops[kind] = [], []
            for _ in range(count):
                image = draw(rng, shape)
                images[kind].append(_encode(image, fmt))
                crops[kind].append(
                    [_encode(_crop(rng, image), fmt) for _ in range(CROPS_PER_IMAGE)]
                )
        return cls(images, crops)


def _crop(rng: np.random.Generator, image: PIL.Image.Image) -> PIL.Image.Image:
    width, height = image.size
    w, h = max(4, int(width * rng.uniform(0.2, 0.5))), max(4, int(height * rng.uniform(0.2, 0.5)))
    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    return image.crop((x, y, x + w, y + h))


# ---- texts ----------------------------------------------------------------------------------


def _phrase(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def label(i: int) -> str:
    """The i-th class label: distinct for every i."""
    a, b = divmod(i, len(WORDS))
    first = WORDS[a % len(WORDS)] + (str(a // len(WORDS)) if a >= len(WORDS) else "")
    return f"{first} {WORDS[b]}"


# ---- writing --------------------------------------------------------------------------------


class _Files:
    """Writes the image files of one subset part (DIR/images/<Subset>/<Train|Test>/)."""

    def __init__(self, out_dir: str, subset: str, part: str, pool: Pool):
        self.out_dir, self.folder, self.pool = out_dir, mmeb.image_folder(subset, part), pool
        os.makedirs(os.path.join(out_dir, self.folder), exist_ok=True)
        self.count = self.bytes = 0

    def write(self, kind: str, entry: int, crop: int | None = None) -> str:
        """Writes a new file from pool entry `entry` of `kind` (or its crop); returns its path."""
        extension = Pool.extension[kind]
        path = f"{self.folder}/{self.count:07d}.{extension}"
        base = self.pool.images[kind][entry] if crop is None else self.pool.crops[kind][entry][crop]
        data = tagged(base, path)
        with open(os.path.join(self.out_dir, path), "wb") as f:
            f.write(data)
        self.count += 1
        self.bytes += len(data)
        return path


def _kinds(rng: np.random.Generator, n: int, page_fraction: float) -> list[str]:
    """'page' at round(n * page_fraction) seeded positions, 'photo' elsewhere."""
    pages = set(rng.permutation(n)[: round(n * page_fraction)].tolist())
    return ["page" if i in pages else "photo" for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Example:
    """One query and its positive: the query's text after the instruction and its image path,
    the positive's text and image path ('' for none), and its label (classification)."""

    detail: str
    qry_image: str
    pos_text: str
    pos_image: str
    label: int = -1


def _examples(
    meta_task: str, rng, files: _Files, n: int, queries: int, page_fraction: float, labels: int
) -> list[Example]:
    """n examples of `meta_task`, the first `queries` complete; the others are positives only
    (the extra candidates of eval pools larger than the queries), without query files."""
    examples = []
    for i, kind in enumerate(_kinds(rng, n, page_fraction)):
        entry = int(rng.integers(len(files.pool.images[kind])))
        needs_query = i < queries and meta_task != "retrieval"
        image = files.write(kind, entry) if needs_query else ""
        if meta_task == "classification":
            target = int(rng.integers(labels))
            examples.append(Example("", image, label(target), "", target))
        elif meta_task == "vqa":
            answer = f"{_phrase(rng, 2)} {i}"  # distinct: no second correct candidate
            examples.append(Example(f"what is the {_phrase(rng, 3)}?", image, answer, ""))
        elif meta_task == "retrieval":
            caption = f"a photo of {_phrase(rng, 7)}"
            examples.append(Example(caption, "", REPRESENT_IMAGE, files.write(kind, entry)))
        else:
            target = int(rng.integers(labels))
            crop = files.write(kind, entry, int(rng.integers(CROPS_PER_IMAGE)))
            examples.append(Example(f'"{label(target)}"', image, REPRESENT_CROP, crop, target))
    return examples


def _query(instruction: str, example: Example) -> str:
    return (IMAGE if example.qry_image else "") + instruction + example.detail


def _write_train(
    train_dir: str, name: str, instructions: tuple, examples: list[Example], rng
) -> None:
    for split in mmeb.TRAIN_SPLITS:
        records = []
        for example in examples:
            wording = instructions[0]
            if split != "original":
                wording = instructions[int(rng.integers(1, len(instructions)))]
            records.append(
                mmeb.train_record(
                    _query(wording, example),
                    example.qry_image,
                    example.pos_text,
                    example.pos_image,
                )
            )
        mmeb.write_split(train_dir, name, split, records)


def _candidates(meta_task: str, rng, examples: list[Example], q: int, count: int) -> list:
    """The (text, image path) candidates of query q: its positive, then count-1 others."""
    example = examples[q]
    if meta_task == "classification":  # every label but the true one, in a seeded order
        others = [i for i in rng.permutation(count).tolist() if i != example.label]
        return [(example.pos_text, "")] + [(label(i), "") for i in others[: count - 1]]
    picks = rng.choice(len(examples) - 1, size=min(count, len(examples)) - 1, replace=False)
    others = [examples[p + (p >= q)] for p in picks.tolist()]  # never the query's own example
    return [(e.pos_text, e.pos_image) for e in [example, *others]]


def _write_eval(eval_dir: str, name: str, task: tuple, examples: list[Example], rng, sizes):
    records = []
    for q in range(sizes.eval_queries):
        candidates = _candidates(task[1], rng, examples, q, sizes.candidates)
        query = _query(task[2][0], examples[q])
        records.append(mmeb.eval_record(query, examples[q].qry_image, candidates))
    mmeb.write_split(eval_dir, name, mmeb.EVAL_SPLIT, records)


def subset_names(count: int) -> list[tuple[str, tuple]]:
    """The names of `count` subsets with their task: the meta-tasks in turn."""
    return [(f"{TASKS[k % len(TASKS)][0]}_{k}", TASKS[k % len(TASKS)]) for k in range(count)]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What `build` draws (see its arguments)."""

    rows: int
    subsets: int
    eval_queries: int
    candidates: int
    page_fraction: float
    image_scale: float
    pool: int

    def check(self) -> None:
        """Raises ValueError naming the size out of range."""
        if (
            self.rows < self.subsets
            or self.subsets < 1
            or self.eval_queries < 2
            or self.candidates < 2
            or self.pool < 1
        ):
            raise ValueError(
                f"synthetic MMEB sizes rows={self.rows} subsets={self.subsets} eval_queries="
                f"{self.eval_queries} candidates={self.candidates} pool={self.pool}: need rows "
                ">= subsets >= 1, eval_queries >= 2, candidates >= 2, pool >= 1"
            )
        if not 0 <= self.page_fraction <= 1 or self.image_scale <= 0:
            raise ValueError(
                f"page_fraction={self.page_fraction} must be in [0, 1] and image_scale="
                f"{self.image_scale} positive"
            )


def _write_subset(out_dir: str, k: int, seed: int, sizes: Sizes, images: Pool) -> list[_Files]:
    """Draws and writes subset k's train rows (both splits) and eval queries; returns the
    image writers of its two parts (their file counts and bytes)."""
    name, task = subset_names(sizes.subsets)[k]
    meta_task, fraction, labels = task[1], sizes.page_fraction, sizes.candidates
    count = sizes.rows // sizes.subsets + (k < sizes.rows % sizes.subsets)
    rng = np.random.default_rng([seed, k, 0])
    train_files = _Files(out_dir, name, "Train", images)
    examples = _examples(meta_task, rng, train_files, count, count, fraction, labels)
    _write_train(os.path.join(out_dir, "train"), name, task[2], examples, rng)
    # Eval: the queries, and for retrieval and grounding a pool of extra positives (at least
    # `candidates`) that the queries' candidate lists share.
    rng = np.random.default_rng([seed, k, 1])
    eval_files = _Files(out_dir, name, "Test", images)
    queries = sizes.eval_queries
    pool = queries if meta_task == "classification" else max(queries, sizes.candidates)
    examples = _examples(meta_task, rng, eval_files, pool, queries, fraction, labels)
    _write_eval(os.path.join(out_dir, "eval"), name, task, examples, rng, sizes)
    return [train_files, eval_files]


def build(
    out_dir: str,
    rows: int,
    subsets: int = 4,
    eval_queries: int = 1000,
    candidates: int = 1000,
    page_fraction: float = 0.15,
    seed: int = 0,
    image_scale: float = 1.0,
    pool: int = 256,
) -> dict:
    """Writes a synthetic MMEB to `out_dir` (see the module docstring); returns a summary.

    Args:
      out_dir: output folder (created); it must not hold a data set already.
      rows: train rows in all (each of the two splits), split evenly over the subsets.
      subsets: number of subsets, the meta-tasks in turn.
      eval_queries, candidates: queries per eval subset and candidates per query (positive
        first; also the number of classification labels).
      page_fraction: share of the main images that are document pages, in [0, 1].
      seed: the output is a function of the seed and the other arguments.
      image_scale: multiplies the photo (640x480) and page (1700x2200) sizes.
      pool: distinct photos drawn (pool // 8 pages); files are comment-tagged copies.

    Raises:
      ValueError: a size out of range. FileExistsError: `out_dir` holds a data set.
    """
    sizes = Sizes(rows, subsets, eval_queries, candidates, page_fraction, image_scale, pool)
    sizes.check()
    if os.path.exists(os.path.join(out_dir, subsets_lib.MANIFEST_NAME)):
        raise FileExistsError(
            f"{out_dir} already holds a data set; remove it or pick another --out."
        )
    start = time.perf_counter()
    images = Pool.draw(seed, pool, image_scale, with_pages=page_fraction > 0)
    pool_s = time.perf_counter() - start
    writers = []
    for k in range(subsets):
        writers += _write_subset(out_dir, k, seed, sizes, images)
    subsets_lib.write_manifest(
        out_dir,
        [
            subsets_lib.SubsetInfo(name, task[1], "IND", train=True)
            for name, task in subset_names(subsets)
        ],
    )
    return dict(
        out=out_dir,
        subsets=subsets,
        train_rows=rows,
        eval_queries=eval_queries,
        candidates=candidates,
        image_files=sum(w.count for w in writers),
        image_mb=round(sum(w.bytes for w in writers) / 2**20, 1),
        pool_s=round(pool_s, 2),
        seconds=round(time.perf_counter() - start, 2),
    )


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--rows", type=int, required=True, help="train rows in all")
    parser.add_argument("--subsets", type=int, default=4)
    parser.add_argument("--eval_queries", type=int, default=1000)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--page_fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    scale_help = "multiplies the photo (640x480) and page (1700x2200) sizes"
    parser.add_argument("--image_scale", type=float, default=1.0, help=scale_help)
    parser.add_argument("--pool", type=int, default=256, help="distinct photos (pages: 1/8)")
    options = vars(parser.parse_args(argv))
    print(json.dumps(build(options.pop("out"), options.pop("rows"), **options)))


if __name__ == "__main__":
    main()
