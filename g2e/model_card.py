"""The model card (README.md) the export stage writes into its Hugging Face directory.

The card says what the export is and how to embed with it, then, from the run that made it:
- the prompts, rendered by g2e.data.prompts with the run's prompt options (docs/method.md §1);
- the recipe: the config values that decide the model (mining, training, adapter, inputs);
- the training data: where MMEB-train came from and which rows were used;
- the latest evaluation table: the `report` stage's report.json when it was written after
  every evaluation's results.json, else the same table collected now
  (g2e.evaluation.report.collect), so a run that exports before it reports still lists its
  evaluations, with the numbers `report` writes.

Nothing in the card depends on the time or the machine, so exporting twice writes the same
bytes.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_collections

from g2e import layout
from g2e.data import prompts
from g2e.evaluation import report as report_lib
from g2e.models.config import QWEN2_5_VL

# The config values a reader needs to reproduce a fine-tuned export (docs/recipe.md explains
# each); a zero-shot export lists only the prompt and input keys.
RECIPE_KEYS = (
    "mine.top_k",
    "mine.pool_mult",
    "mine.judge",
    "mine.judge_threshold",
    "train.steps",
    "train.lr",
    "train.warmup_steps",
    "train.weight_decay",
    "train.global_batch",
    "train.cluster_size",
    "train.temperature",
    "train.use_clusters",
    "train.keep_unclustered_rows",
    "train.mask_identical_positives",
    "train.adapter.kind",
    "train.adapter.r",
    "train.adapter.alpha",
    "train.adapter.dropout",
    "train.adapter.targets",
    "data.train_max_length",
    "data.train_image_resolution",
    "seed",
)
INPUT_KEYS = ("prompt.system", "prompt.suffix", "data.max_length", "data.image_resolution")
DATA_KEYS = (
    "data.train_dir",
    "data.train_subsets",
    "data.train_split",
    "data.max_rows_per_subset",
    "data.row_sample_seed",
    "data.heldout_rows",
)


def latest_evaluation(workdir: str | pathlib.Path) -> dict[str, Any] | None:
    """The run's evaluation table (report.json's layout), or None when nothing was evaluated:
    report.json if no evaluation's results.json is newer, else `report.collect(workdir)`."""
    workdir = pathlib.Path(workdir)
    written = workdir / "report.json"
    results = list(workdir.glob(f"eval*/{layout.RESULTS}"))
    newest = max((path.stat().st_mtime for path in results), default=0.0)
    if written.is_file() and written.stat().st_mtime >= newest:
        table = json.loads(written.read_text())
    elif results:
        table = report_lib.collect(workdir)
    else:
        return None
    return table if table.get("rows") else None


def model_card(
    *,
    base_model: str,
    model_type: str = "qwen2_vl",
    config: ml_collections.ConfigDict | None = None,
    trained: bool = False,
    evaluation: dict[str, Any] | None = None,
) -> str:
    """README.md of an export.

    Args:
      base_model: the checkpoint the export starts from (a Hub id or a directory).
      model_type: the base's model type (qwen2_vl or qwen2_5_vl).
      config: the run's config (None: the card has no prompts options, recipe or data).
      trained: whether the export is fine-tuned (else zero-shot: no recipe, no data).
      evaluation: the run's evaluation table (`latest_evaluation`).
    """
    family = "Qwen2.5-VL" if model_type == QWEN2_5_VL else "Qwen2-VL"
    how = "fine-tuned by g2e (the recipe below) as" if trained else "used by g2e as"
    lines = ["---", "library_name: transformers", "pipeline_tag: feature-extraction"]
    lines += ["tags:", "- g2e", "- multimodal-embedding", "---", ""]
    lines += [f"# g2e embedder ({family})", ""]
    lines += [
        f"{family} {how} a universal multimodal embedding model (base: `{base_model}`). The "
        "embedding is the last-layer hidden state of the last prompt token (the newline after "
        "`assistant`), L2-normalised.",
        "",
        "```python",
        "import pathlib",
        "",
        "from g2e import Embedder",
        "",
        'embedder = Embedder.from_pretrained("THIS_DIRECTORY_OR_HUB_ID")',
        'queries = embedder.encode(["a red circle"], prompt_name="query")',
        'candidates = embedder.encode([pathlib.Path("circle.png")], prompt_name="document")',
        "scores = embedder.similarity(queries, candidates)",
        "```",
        "",
    ]
    lines += _prompt_section(config)
    if config is not None and trained:
        lines += _values_section("Recipe", config, RECIPE_KEYS)
        lines += _values_section("Training data (MMEB-train)", config, DATA_KEYS)
    if config is not None:
        lines += _values_section("Inputs", config, INPUT_KEYS)
    lines += _evaluation_section(evaluation)
    return "\n".join(lines) + "\n"


def _prompt_section(config: ml_collections.ConfigDict | None) -> list[str]:
    options = prompts.PromptOptions()
    if config is not None:
        options = prompts.PromptOptions(system=config.prompt.system, suffix=config.prompt.suffix)
    cases = (
        ("A query with an image", True, "query"),
        ("A text-only query", False, "query"),
        ("A candidate (document)", True, "candidate"),
    )
    lines = [
        "## Prompts",
        "",
        "`{text}` is the input's text, its task instruction included; `<|image_pad|>` is "
        "repeated once per merged image patch.",
        "",
    ]
    for title, has_image, role in cases:
        text = prompts.embedding_prompt_text(
            "{text}", has_image=has_image, role=role, options=options
        )
        lines += [f"{title}:", "", "```", text.rstrip("\n"), "```", ""]
    return lines


def _values_section(title: str, config: ml_collections.ConfigDict, keys) -> list[str]:
    lines = [f"## {title}", "", "| key | value |", "|---|---|"]
    for key in keys:
        value = config
        for part in key.split("."):
            value = value[part]
        if isinstance(value, (tuple, list)):
            value = ", ".join(str(v) for v in value)
        lines.append(f"| `{key}` | `{value}` |" if value != "" else f"| `{key}` | '' |")
    return lines + [""]


def _evaluation_section(evaluation: dict[str, Any] | None) -> list[str]:
    """The report stage's main table (rows, intervals, chance, SugarCrepe when evaluated)."""
    if not evaluation:
        return []
    title = "## Evaluation (MMEB precision@1, %, with 95% bootstrap intervals)"
    return [title, "", *report_lib._main_table(evaluation), ""]
