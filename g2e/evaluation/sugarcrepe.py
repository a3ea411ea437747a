"""SugarCrepe and SugarCrepe++ evaluators (docs/method.md §4), on local copies of their data.

Data as users have it:
  SugarCrepe (github.com/RAIVNLab/sugar-crepe, `data/`): one JSON file per category,
    add_att.json, add_obj.json, replace_att.json, replace_obj.json, replace_rel.json,
    swap_att.json, swap_obj.json, each {id: {"filename", "caption", "negative_caption"}}.
  SugarCrepe++ (github.com/Sri-Harsha/scpp, `data/`): replace_att.json, replace_obj.json,
    replace_rel.json, swap_att.json, swap_obj.json, each a list of {"id", "filename",
    "caption", "caption2", "negative_caption"}.
  Both name COCO val2017 images by file name; `image_root` is the folder that holds them
  (e.g. .../coco/val2017). Either JSON shape (dict by id or list) is accepted for both.

Protocol (as the release evaluates it): an image is a candidate with text `<|image_pad|>`; a
caption is a query `Find me an image that matches the given caption: <caption>` without image.
Scores are cosines.
  SugarCrepe: correct when cos(image, caption) > cos(image, negative).
  SugarCrepe++ image-to-text: correct when both positive captions beat the negative:
    cos(image, caption) > cos(image, negative) and cos(image, caption2) > cos(image, negative).
  SugarCrepe++ text-only: correct when cos(caption, caption2) > cos(caption, negative) and
    cos(caption, caption2) > cos(caption2, negative).
Comparisons are strict: a tie counts as wrong. Every unique image and caption is embedded once
across all categories evaluated. Accuracies are in percent; averages are unweighted means over
the categories evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from g2e import atomic
from g2e.data import prompts
from g2e.data.errors import BadInput, BadInputReport
from g2e.data.preprocess import EmbedItem
from g2e.evaluation import mmeb

SUGARCREPE_CATEGORIES = (
    "replace_obj",
    "replace_att",
    "replace_rel",
    "swap_obj",
    "swap_att",
    "add_obj",
    "add_att",
)
SUGARCREPE_PP_CATEGORIES = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att")
# The SugarCrepe paper reports its categories in three groups.
SUGARCREPE_GROUPS = ("replace", "swap", "add")

EmbedFn = Callable[[Sequence[EmbedItem]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Example:
    """One SugarCrepe(++) example; `caption2` is the second positive (SugarCrepe++ only)."""

    category: str
    id: str
    image: str
    caption: str
    negative_caption: str
    caption2: str = ""


def present_categories(data_dir: str, known: Sequence[str]) -> list[str]:
    """The categories in `known` whose <category>.json is in `data_dir`, in `known`'s order."""
    return [c for c in known if os.path.isfile(os.path.join(data_dir, f"{c}.json"))]


def read_category(
    data_dir: str, category: str, image_root: str, *, plus_plus: bool, report: BadInputReport
) -> list[Example]:
    """Reads `data_dir/<category>.json` into examples with absolute, existing image paths.

    Args:
        data_dir: the folder with the category JSON files.
        category: e.g. 'replace_obj'.
        image_root: the folder that holds the COCO val2017 images the files name.
        plus_plus: SugarCrepe++ (needs `caption2`).
        report: the on_bad_input policy; a bad example raises (error) or is counted (skip).
    Returns:
        The examples in file order.
    Raises:
        FileNotFoundError: no such file. BadInput: under 'error', a bad example or image.
    """
    path = os.path.join(data_dir, f"{category}.json")
    fields = ("filename", "caption", "negative_caption") + (("caption2",) if plus_plus else ())
    examples = []
    for example_id, record in _records(path, data_dir):
        try:
            image = _image_of(record, fields, image_root)
        except BadInput as error:
            report.handle(error.with_context(subset=category, row=example_id, file=path))
            continue
        examples.append(
            Example(
                category,
                str(example_id),
                os.path.abspath(image),
                record["caption"],
                record["negative_caption"],
                record.get("caption2", "") if plus_plus else "",
            )
        )
    return examples


def _records(path: str, data_dir: str) -> list[tuple[str, Any]]:
    """The (example id, record) pairs of a category file, in file order, from either JSON
    shape (an object by id, or a list whose records may carry an "id").

    Raises:
        FileNotFoundError: no such file (the message lists the JSON files in `data_dir`).
        ValueError: the file holds neither shape.
    """
    if not os.path.isfile(path):
        found = "no such directory"
        if os.path.isdir(data_dir):
            found = sorted(f for f in os.listdir(data_dir) if f.endswith(".json"))
        raise FileNotFoundError(
            f"{path} does not exist; data_dir must hold the benchmark's "
            f"<category>.json files (found there: {found})"
        )
    with open(path, encoding="utf-8") as f:
        content = json.load(f)
    if isinstance(content, dict):
        return list(content.items())
    if isinstance(content, list):
        return [
            (str(r.get("id", i)) if isinstance(r, dict) else str(i), r)
            for i, r in enumerate(content)
        ]
    raise ValueError(
        f"{path}: expected a JSON object by id or a list of examples, got {type(content).__name__}"
    )


def _image_of(record: Any, fields: Sequence[str], image_root: str) -> str:
    """The image path of one record under `image_root`.

    Raises:
        BadInput: the record is not an object with string `fields`, or its image is missing.
    """
    if not isinstance(record, dict) or any(not isinstance(record.get(k), str) for k in fields):
        raise BadInput(
            "missing fields",
            detail=f"needs string fields {list(fields)}",
            hint="use the benchmark's original JSON files",
        )
    image = os.path.join(image_root, record["filename"])
    if not os.path.isfile(image):
        raise BadInput(
            "missing image",
            detail=image,
            hint="image_root must be the folder holding COCO val2017 images",
        )
    return image


def _embed_examples(
    embed_fn: EmbedFn,
    examples: Sequence[Example],
    captions: Sequence[str],
    *,
    benchmark: str,
    batch_size: int,
    progress: bool,
    allow_skipped: bool,
) -> tuple[np.ndarray, dict[str, int], np.ndarray, dict[str, int]]:
    """Embeds each unique image once (candidate) and each unique caption text once (query).

    Returns (image embeddings, image path -> row, caption embeddings, caption -> row); with
    `allow_skipped`, rows of inputs embed_fn skipped as bad are NaN.
    """
    image_rows = {}
    for e in examples:
        image_rows.setdefault(e.image, len(image_rows))
    caption_rows = {}
    for text in captions:
        caption_rows.setdefault(text, len(caption_rows))
    image_items = [
        EmbedItem(
            text=prompts.SUGARCREPE_IMAGE_TEXT, image=path, role="candidate", subset=benchmark
        )
        for path in image_rows
    ]
    caption_items = [
        EmbedItem(text=prompts.sugarcrepe_caption(text), image=None, role="query", subset=benchmark)
        for text in caption_rows
    ]
    images = mmeb.embed_items(
        embed_fn,
        image_items,
        batch_size=batch_size,
        desc=f"{benchmark} images",
        progress=progress,
        allow_skipped=allow_skipped,
    )
    texts = mmeb.embed_items(
        embed_fn,
        caption_items,
        batch_size=batch_size,
        desc=f"{benchmark} captions",
        progress=progress,
        allow_skipped=allow_skipped,
    )
    return images, image_rows, texts, caption_rows


def _gather(
    group: Sequence[Example],
    fields: Sequence[str],
    images: np.ndarray,
    image_rows: dict[str, int],
    texts: np.ndarray,
    caption_rows: dict[str, int],
) -> tuple[list[np.ndarray], int]:
    """Per field ('image' or a caption field) the [N, D] embeddings of the usable examples,
    and how many examples were dropped because embed_fn skipped one of their inputs."""
    arrays = [
        images[[image_rows[e.image] for e in group]]
        if f == "image"
        else texts[[caption_rows[getattr(e, f)] for e in group]]
        for f in fields
    ]
    usable = np.all([~np.isnan(a).any(axis=1) for a in arrays], axis=0)
    return [a[usable] for a in arrays], int((~usable).sum())


def _unit(embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, np.float32)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", _unit(a), _unit(b))


def sugarcrepe_correct(
    images: np.ndarray, captions: np.ndarray, negatives: np.ndarray
) -> np.ndarray:
    """bool [N]: cos(image, caption) > cos(image, negative), strictly (ties are wrong).

    All inputs are [N, D] embeddings, row n of each belonging to example n.
    """
    return _cos(images, captions) > _cos(images, negatives)


def sugarcrepe_pp_correct(
    images: np.ndarray, captions: np.ndarray, captions2: np.ndarray, negatives: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """SugarCrepe++ (image-to-text, text-only) correctness, bool [N] each; ties are wrong.

    image-to-text: both positives beat the negative against the image.
    text-only: cos(caption, caption2) beats cos(caption, negative) and cos(caption2, negative).
    """
    negative_score = _cos(images, negatives)
    image_to_text = (_cos(images, captions) > negative_score) & (
        _cos(images, captions2) > negative_score
    )
    positives = _cos(captions, captions2)
    text_only = (positives > _cos(captions, negatives)) & (positives > _cos(captions2, negatives))
    return image_to_text, text_only


def _read_all(
    data_dir: str,
    image_root: str,
    categories: str | Sequence[str] | None,
    known: Sequence[str],
    plus_plus: bool,
    report: BadInputReport,
    benchmark: str,
) -> dict[str, list[Example]]:
    if isinstance(categories, str):
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    categories = list(categories or present_categories(data_dir, known))
    if not categories:
        raise FileNotFoundError(
            f"{data_dir}: none of {benchmark}'s files "
            f"({', '.join(c + '.json' for c in known)}) is there"
        )
    by_category = {}
    for category in categories:
        by_category[category] = read_category(
            data_dir, category, image_root, plus_plus=plus_plus, report=report
        )
        if not by_category[category]:
            raise ValueError(
                f"{benchmark} {category}: no usable examples in "
                f"{os.path.join(data_dir, category + '.json')}"
            )
    return by_category


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _embedded_categories(
    embed_fn: EmbedFn,
    by_category: dict[str, list[Example]],
    fields: Sequence[str],
    *,
    benchmark: str,
    batch_size: int,
    progress: bool,
    allow_skipped: bool,
) -> tuple[dict[str, list[np.ndarray]], int]:
    """Per category, the [N, D] embeddings of each of `fields` over its usable examples, and
    how many examples were dropped because embed_fn skipped one of their inputs.

    The captions are embedded in the order of `fields` ('image' first), example by example.
    Raises ValueError for a category every example of which uses a skipped input.
    """
    examples = [e for group in by_category.values() for e in group]
    captions = [getattr(e, f) for e in examples for f in fields if f != "image"]
    images, image_rows, texts, caption_rows = _embed_examples(
        embed_fn,
        examples,
        captions,
        benchmark=benchmark,
        batch_size=batch_size,
        progress=progress,
        allow_skipped=allow_skipped,
    )
    embedded, dropped = {}, 0
    for category, group in by_category.items():
        arrays, category_dropped = _gather(group, fields, images, image_rows, texts, caption_rows)
        dropped += category_dropped
        if not len(arrays[0]):
            raise ValueError(f"{benchmark} {category}: every example uses a skipped input")
        embedded[category] = arrays
    return embedded, dropped


def _log_and_write(
    summary: dict[str, Any],
    report: BadInputReport,
    out_dir: str | None,
    model_name: str,
    metrics: Sequence[str],
) -> dict[str, Any]:
    """Logs what was skipped, writes results.json and results.md to `out_dir` if set, and
    returns `summary`."""
    if report.total:
        logging.warning("%s", report.summary())
    if out_dir:
        _write(out_dir, summary, _markdown(summary, model_name, metrics))
    return summary


def evaluate_sugarcrepe(
    embed_fn: EmbedFn,
    *,
    data_dir: str,
    image_root: str,
    categories: str | Sequence[str] | None = None,
    out_dir: str | None = None,
    on_bad_input: str = "error",
    batch_size: int = 16,
    model_name: str = "g2e",
    progress: bool = True,
) -> dict[str, Any]:
    """SugarCrepe accuracy per category, per group (replace/swap/add) and on average.

    Args:
        embed_fn: items -> float32 [N, D] embeddings in input order.
        data_dir: the folder with SugarCrepe's <category>.json files.
        image_root: the folder with the COCO val2017 images.
        categories: names or a comma-separated string; None: every category present.
        out_dir: if set, results.json and results.md are written there.
        on_bad_input: 'error' or 'skip': examples with a missing image or field, or an input
            embed_fn skipped (a NaN row), are dropped and counted in "skipped".
        batch_size: items per embed_fn call.
        model_name: the Model column of results.md.
        progress: show progress bars.
    Returns:
        {"benchmark": "SugarCrepe", "categories": {name: {"accuracy", "num_examples"}},
        "groups": {group: mean}, "average": mean, "skipped": count}; accuracies in percent.
    """
    report = BadInputReport(on_bad_input)
    by_category = _read_all(
        data_dir, image_root, categories, SUGARCREPE_CATEGORIES, False, report, "SugarCrepe"
    )
    embedded, dropped = _embedded_categories(
        embed_fn,
        by_category,
        ("image", "caption", "negative_caption"),
        benchmark="SugarCrepe",
        batch_size=batch_size,
        progress=progress,
        allow_skipped=report.policy == "skip",
    )
    results = {}
    for category, arrays in embedded.items():
        correct = sugarcrepe_correct(*arrays)
        results[category] = {
            "accuracy": 100.0 * float(correct.mean()),
            "num_examples": len(correct),
        }
    summary = {
        "benchmark": "SugarCrepe",
        "categories": results,
        "groups": _group_means(results),
        "average": _mean([r["accuracy"] for r in results.values()]),
        "skipped": report.total + dropped,
    }
    return _log_and_write(summary, report, out_dir, model_name, ("accuracy",))


def _group_means(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The mean accuracy of each SugarCrepe group (replace/swap/add) with categories here."""
    groups = {}
    for prefix in SUGARCREPE_GROUPS:
        value = _mean([r["accuracy"] for c, r in results.items() if c.startswith(prefix + "_")])
        if value is not None:
            groups[prefix] = value
    return groups


def evaluate_sugarcrepe_pp(
    embed_fn: EmbedFn,
    *,
    data_dir: str,
    image_root: str,
    categories: str | Sequence[str] | None = None,
    out_dir: str | None = None,
    on_bad_input: str = "error",
    batch_size: int = 16,
    model_name: str = "g2e",
    progress: bool = True,
) -> dict[str, Any]:
    """SugarCrepe++ image-to-text and text-only accuracy per category and on average.

    Arguments as `evaluate_sugarcrepe` (data_dir holds SugarCrepe++'s <category>.json files).
    Returns:
        {"benchmark": "SugarCrepe++", "categories": {name: {"image_to_text", "text_only",
        "num_examples"}}, "average": {"image_to_text", "text_only"}, "skipped": count}.
    """
    report = BadInputReport(on_bad_input)
    by_category = _read_all(
        data_dir, image_root, categories, SUGARCREPE_PP_CATEGORIES, True, report, "SugarCrepe++"
    )
    embedded, dropped = _embedded_categories(
        embed_fn,
        by_category,
        ("image", "caption", "caption2", "negative_caption"),
        benchmark="SugarCrepe++",
        batch_size=batch_size,
        progress=progress,
        allow_skipped=report.policy == "skip",
    )
    results = {}
    for category, arrays in embedded.items():
        image_to_text, text_only = sugarcrepe_pp_correct(*arrays)
        results[category] = {
            "image_to_text": 100.0 * float(image_to_text.mean()),
            "text_only": 100.0 * float(text_only.mean()),
            "num_examples": len(image_to_text),
        }
    summary = {
        "benchmark": "SugarCrepe++",
        "categories": results,
        "average": {
            k: _mean([r[k] for r in results.values()]) for k in ("image_to_text", "text_only")
        },
        "skipped": report.total + dropped,
    }
    return _log_and_write(summary, report, out_dir, model_name, ("image_to_text", "text_only"))


def _markdown(summary: dict[str, Any], model_name: str, metrics: Sequence[str]) -> str:
    """One row per metric, one column per category, then the average."""
    categories = list(summary["categories"])
    average = summary["average"]
    lines = [
        f"# {summary['benchmark']} accuracy (%): {model_name}",
        "",
        "| Metric | " + " | ".join(categories) + " | Average |",
        "|" + "---|" * (len(categories) + 2),
    ]
    for metric in metrics:
        mean = average if not isinstance(average, dict) else average[metric]
        cells = [f"{summary['categories'][c][metric]:.1f}" for c in categories]
        lines.append(f"| {metric} | " + " | ".join(cells) + f" | {mean:.1f} |")
    return "\n".join(lines) + "\n"


def _write(out_dir: str, summary: dict[str, Any], markdown: str) -> None:
    atomic.write_text(os.path.join(out_dir, "results.json"), json.dumps(summary, indent=2))
    atomic.write_text(os.path.join(out_dir, "results.md"), markdown)
