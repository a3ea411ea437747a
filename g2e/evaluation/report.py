"""Reports of MMEB results: one evaluation's results.{json,md,png}, and the run's table.

`write_results` writes what `g2e.evaluation.mmeb.evaluate_mmeb` computed (the leaderboard's
layout plus a per-subset table, and a bar chart). `write_report` (the `report` stage) collects
every evaluation the run made into one table: rows plain zero-shot (`eval_plain`),
hierarchical zero-shot (`eval_zero_shot`) and fine-tuned (`eval`), columns the four meta-tasks,
IND, OOD and overall; written to <workdir>/report.md and <workdir>/report.json and printed.
"""

from __future__ import annotations

import io
import json
import math
import pathlib
from typing import Any

from g2e import atomic
from g2e.data import subsets as subset_registry

META_TASKS = ("Classification", "VQA", "Retrieval", "Grounding")
SPLITS = ("IND", "OOD")
# The subset table spells meta-tasks in lower case; reports use the leaderboard's names.
META_TASK_NAMES = dict(zip(subset_registry.META_TASKS, META_TASKS))

ROWS = (("eval_plain", "zero-shot, plain prompt"),
        ("eval_zero_shot", "zero-shot, hierarchical prompt"),
        ("eval", "fine-tuned (SaHa + DoRA)"))
COLUMNS = (*META_TASKS, *SPLITS, "Overall")


def _score(results: dict[str, Any], column: str) -> float | None:
    if column in ("IND", "OOD"):
        return results.get(column)
    if column == "Overall":
        return results.get("overall")
    return results.get("meta_tasks", {}).get(column)


def _cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def collect(workdir: pathlib.Path) -> dict[str, Any]:
    """{'rows': [{'stage', 'model', column: score...}], 'export': path or None, ...}."""
    rows = []
    for stage, label in ROWS:
        path = workdir / stage / "results.json"
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        rows.append({"stage": stage, "model": label,
                     **{column: _score(results, column) for column in COLUMNS},
                     "subsets": {name: r["precision_at_1"]
                                 for name, r in results.get("subsets", {}).items()}})
    export = workdir / "export" / "hf"
    mine = workdir / "mine" / "report.json"
    return {"rows": rows, "export": str(export) if export.is_dir() else None,
            "peft": str(workdir / "export" / "peft") if (workdir / "export" / "peft").is_dir()
            else None,
            "mining": json.loads(mine.read_text()) if mine.is_file() else None}


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the meta-task table, then per-subset precision@1."""
    lines = ["| Model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in report["rows"]:
        lines.append(f"| {row['model']} | " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |")
    subsets = sorted({name for row in report["rows"] for name in row["subsets"]})
    if subsets:
        lines += ["", "| Subset | " + " | ".join(r["stage"] for r in report["rows"]) + " |",
                  "|---" * (len(report["rows"]) + 1) + "|"]
        for name in subsets:
            lines.append(f"| {name} | " + " | ".join(_cell(r["subsets"].get(name))
                                                      for r in report["rows"]) + " |")
    if report["export"]:
        lines += ["", f"Exported Hugging Face model: `{report['export']}`"]
    if report["peft"]:
        lines.append(f"PEFT adapter: `{report['peft']}`")
    return "\n".join(lines) + "\n"


def write_report(workdir: pathlib.Path) -> dict[str, Any]:
    """Writes report.md and report.json into workdir, prints the table, returns a summary."""
    report = collect(workdir)
    text = markdown(report)
    atomic.write_text(workdir / "report.md", "# g2e report (MMEB precision@1, %)\n\n" + text)
    atomic.write_json(workdir / "report.json", report, indent=2)
    print("\n" + text, flush=True)
    return {"rows": [row["stage"] for row in report["rows"]], "export": report["export"]}


# ---------------------------------------------------------------------------------------------
# One evaluation's results files.


def write_results(out_dir: pathlib.Path, summary: dict[str, Any], model_name: str) -> None:
    """results.json, results.md and results.png of one evaluation in `out_dir` (atomically)."""
    atomic.write_text(out_dir / "results.json", json.dumps(summary, indent=2))
    atomic.write_text(out_dir / "results.md", results_markdown(summary, model_name))
    atomic.write_bytes(out_dir / "results.png", results_chart(summary, model_name))


def results_markdown(summary: dict[str, Any], model_name: str = "g2e") -> str:
    """results.json's content as Markdown: the leaderboard row, then one row per subset.

    Leaderboard columns: Model | Classification | VQA | Retrieval | Grounding | IND | OOD |
    Overall; a group with no subset evaluated shows '-'.
    """
    tasks = [META_TASK_NAMES[t] for t in subset_registry.META_TASKS]
    counts = {t: sum(r["meta_task"] == t for r in summary["subsets"].values()) for t in tasks}
    counts.update({s: sum(r["split"] == s for r in summary["subsets"].values()) for s in SPLITS})
    header = ["Model", *tasks, *SPLITS, "Overall"]
    row = [model_name, *(_cell(summary["meta_tasks"].get(t)) for t in tasks),
           *(_cell(summary[s]) for s in SPLITS), _cell(summary["overall"])]
    number = ["# subsets", *(str(counts[t]) for t in tasks), *(str(counts[s]) for s in SPLITS),
              str(len(summary["subsets"]))]
    lines = [f"# MMEB precision@1 (%): {model_name}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             "| " + " | ".join(number) + " |", "| " + " | ".join(row) + " |", "",
             "| Subset | Meta-task | Split | Queries | Precision@1 |", "|---|---|---|---|---|"]
    for name, r in summary["subsets"].items():
        lines.append(f"| {name} | {r['meta_task']} | {r['split']} | {r['num_queries']} | "
                     f"{_cell(r['precision_at_1'])} |")
    return "\n".join(lines) + "\n"


def results_chart(summary: dict[str, Any], model_name: str = "g2e") -> bytes:
    """A PNG bar chart: one bar per subset, coloured by meta-task, OOD hatched, overall dashed."""
    # The object API (no pyplot) keeps no global figure state and needs no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = list(summary["subsets"])
    results = [summary["subsets"][n] for n in names]
    colours = dict(zip(META_TASKS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    figure = Figure(figsize=(max(7.0, 0.4 * len(names) + 3.5), 4.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    bars = axes.bar(range(len(names)), [r["precision_at_1"] for r in results],
                    color=[colours[r["meta_task"]] for r in results], edgecolor="white")
    for bar, result in zip(bars, results):
        if result["split"] == "OOD":
            bar.set_hatch("//")
    axes.bar_label(bars, fmt="%.1f", fontsize=7)
    axes.set_xticks(range(len(names)), names, rotation=75, ha="right", fontsize=8)
    axes.set_ylim(0, 105)
    axes.set_ylabel("precision@1 (%)")
    handles = [Patch(color=colours[t], label=t) for t in META_TASKS if t in summary["meta_tasks"]]
    handles.append(Patch(facecolor="lightgrey", edgecolor="white", hatch="//", label="OOD"))
    if summary["overall"] is not None:
        handles.append(axes.axhline(summary["overall"], color="black", linestyle="--",
                                    linewidth=1, label=f"overall {summary['overall']:.1f}"))
    axes.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.set_title(f"MMEB precision@1: {model_name}")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()
