"""Reports: one evaluation's results files, and the run's table of every evaluation.

`write_results` writes what `g2e.evaluation.mmeb.evaluate_mmeb` computed (the leaderboard's
layout plus a per-subset table, and a bar chart); `write_sugarcrepe` what eval_sugarcrepe
computed. `write_report` (the `report` stage) collects every evaluation the run made into one
table, <workdir>/report.md and report.json (printed too): rows plain zero-shot (`eval_plain`),
hierarchical zero-shot (`eval_zero_shot`), fine-tuned on SaHa clusters (`eval`), fine-tuned on
random batches (`eval_random`), then any other evaluation; columns the four meta-tasks, IND,
OOD and overall, each with a 95% bootstrap interval over queries, and SugarCrepe when
evaluated; a last row gives chance (a random ranking's precision@1). On the demo, the mining
judge's precision and recall against the mini-MMEB's truth follow (the judge_quality stage).
"""

from __future__ import annotations

import io
import json
import math
import pathlib
from typing import Any

import numpy as np

from g2e import atomic
from g2e.data import subsets as subset_registry

META_TASKS = ("Classification", "VQA", "Retrieval", "Grounding")
SPLITS = ("IND", "OOD")
# The subset table spells meta-tasks in lower case; reports use the leaderboard's names.
META_TASK_NAMES = dict(zip(subset_registry.META_TASKS, META_TASKS))

# (stage whose results.json makes the row, row name), in the report's order; any other
# `eval*` stage with MMEB results follows as an extra row.
ROWS = (
    ("eval_plain", "zero-shot, plain prompt"),
    ("eval_zero_shot", "zero-shot, hierarchical prompt"),
    ("eval", "fine-tuned (SaHa)"),
    ("eval_random", "fine-tuned, random batches"),
)
GROUPS = (*META_TASKS, *SPLITS, "overall")  # what a row reports, with an interval each
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0


def _cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def _members(results: dict[str, Any], group: str) -> list[str]:
    """The subsets a group's mean is over (a meta-task, IND, OOD or overall)."""
    subsets = results["subsets"]
    if group in META_TASKS:
        return [n for n, r in subsets.items() if r["meta_task"] == group]
    if group in SPLITS:
        return [n for n, r in subsets.items() if r["split"] == group]
    return list(subsets)


def bootstrap_ci95(results: dict[str, Any]) -> dict[str, list[float]]:
    """95% percentile intervals of every group's mean precision@1, resampling each subset's
    queries with replacement (BOOTSTRAP_SAMPLES times, a fixed seed); a group is the unweighted
    mean of its subsets, as on the leaderboard."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    samples = {}
    for name, subset in results["subsets"].items():
        outcomes = np.frombuffer(subset["correct"].encode(), np.uint8) == ord("1")
        draws = rng.integers(0, len(outcomes), size=(BOOTSTRAP_SAMPLES, len(outcomes)))
        samples[name] = 100.0 * outcomes[draws].mean(axis=1)
    intervals = {}
    for group in GROUPS:
        members = _members(results, group)
        if members:
            means = np.mean([samples[m] for m in members], axis=0)
            intervals[group] = [round(float(np.percentile(means, q)), 2) for q in (2.5, 97.5)]
    return intervals


def chance(results: dict[str, Any]) -> dict[str, float]:
    """The precision@1 of a random ranking per group (1 / candidates, averaged like scores)."""
    return {
        group: round(float(np.mean([results["subsets"][m]["chance"] for m in members])), 2)
        for group in GROUPS
        if (members := _members(results, group))
    }


def _row(stage: str, name: str, results: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "stage": stage,
        "overall": results["overall"],
        "IND": results["IND"],
        "OOD": results["OOD"],
        "meta_tasks": dict(results["meta_tasks"]),
        "ci95": bootstrap_ci95(results),
        "subsets": {n: r["precision_at_1"] for n, r in results["subsets"].items()},
    }


def collect(workdir: pathlib.Path) -> dict[str, Any]:
    """The report.json content (a contract): {"rows": [{"name", "overall", "IND", "OOD",
    "meta_tasks": {meta_task: score}, "ci95": {group: [lo, hi]}, "stage", "subsets",
    "sugarcrepe"?}], "chance": {group: score}, "export", "peft", "mining", "judge_quality"};
    scores in percent, rows in ROWS order then any other evaluation stage."""
    known = [stage for stage, _ in ROWS]
    extra = sorted(
        p.parent.name
        for p in workdir.glob("eval*/results.json")
        if p.parent.name not in known and p.parent.name != "eval_sugarcrepe"
    )
    names = dict(ROWS)
    rows, chances = [], {}
    for stage in known + extra:
        path = workdir / stage / "results.json"
        if path.is_file():
            results = json.loads(path.read_text())
            rows.append(_row(stage, names.get(stage, stage), results))
            chances = chances or chance(results)
    _attach_sugarcrepe(workdir, rows)
    export, peft = workdir / "export" / "hf", workdir / "export" / "peft"
    return {
        "rows": rows,
        "chance": chances,
        "export": str(export) if export.is_dir() else None,
        "peft": str(peft) if peft.is_dir() else None,
        "mining": _read(workdir / "mine" / "report.json"),
        "judge_quality": _read(workdir / "judge_quality" / "results.json"),
    }


def _read(path: pathlib.Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _attach_sugarcrepe(workdir: pathlib.Path, rows: list[dict[str, Any]]) -> None:
    """Adds eval_sugarcrepe's scores to the row of the model it evaluated."""
    path = workdir / "eval_sugarcrepe" / "results.json"
    if not path.is_file():
        return
    results = json.loads(path.read_text())
    stage = "eval" if results["model"] == "fine-tuned" else "eval_zero_shot"
    for row in rows:
        if row["stage"] == stage:
            row["sugarcrepe"] = sugarcrepe_scores(results)


def _with_interval(row: dict[str, Any], group: str, value: float | None) -> str:
    interval = row["ci95"].get(group)
    if value is None or interval is None:
        return _cell(value)
    return f"{value:.1f} ({interval[0]:.1f}-{interval[1]:.1f})"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: meta-tasks, IND, OOD and overall with 95% intervals, chance,
    SugarCrepe when evaluated, then per-subset precision@1."""
    extra = sorted({k for row in report["rows"] for k in row.get("sugarcrepe", {})})
    header = ["Model", *META_TASKS, *SPLITS, "Overall", *extra]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in report["rows"]:
        values = [row["meta_tasks"].get(t) for t in META_TASKS] + [
            row["IND"],
            row["OOD"],
            row["overall"],
        ]
        cells = [_with_interval(row, g, v) for g, v in zip(GROUPS, values)]
        cells += [_cell(row.get("sugarcrepe", {}).get(k)) for k in extra]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    if report["chance"]:
        lines.append(
            "| chance | "
            + " | ".join(_cell(report["chance"].get(g)) for g in GROUPS)
            + " |"
            + " - |" * len(extra)
        )
    subsets = sorted({name for row in report["rows"] for name in row["subsets"]})
    if subsets:
        lines += [
            "",
            "| Subset | " + " | ".join(r["stage"] for r in report["rows"]) + " |",
            "|---" * (len(report["rows"]) + 1) + "|",
        ]
        for name in subsets:
            lines.append(
                f"| {name} | "
                + " | ".join(_cell(r["subsets"].get(name)) for r in report["rows"])
                + " |"
            )
    if report.get("judge_quality"):
        lines += [
            "",
            "Mining judge against the mini-MMEB's truth (a pair is true when the "
            "owner's positive also answers the anchor's query; %):",
            "",
            "| Subset | pairs judged | truly false negatives | judge said yes | "
            "precision | recall |",
            "|---|---|---|---|---|---|",
        ]
        for name, q in report["judge_quality"].items():
            lines.append(
                f"| {name} | {q['pairs']} | {q['true_pairs']} ({_cell(q['base_rate'])})"
                f" | {q['yes']} | {_cell(q['precision'])} | {_cell(q['recall'])} |"
            )
    if report["export"]:
        lines += ["", f"Exported Hugging Face model: `{report['export']}`"]
    if report["peft"]:
        lines.append(f"PEFT adapter: `{report['peft']}`")
    return "\n".join(lines) + "\n"


def write_report(workdir: pathlib.Path) -> dict[str, Any]:
    """Writes report.md and report.json into workdir, prints the table, returns a summary."""
    report = collect(workdir)
    text = markdown(report)
    atomic.write_text(
        workdir / "report.md",
        "# g2e report (MMEB precision@1, %, with 95% bootstrap intervals)\n\n" + text,
    )
    atomic.write_json(workdir / "report.json", report, indent=2)
    print("\n" + text, flush=True)
    return {"rows": [row["stage"] for row in report["rows"]], "export": report["export"]}


# ---------------------------------------------------------------------------------------------
# SugarCrepe results.


def sugarcrepe_scores(results: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of eval_sugarcrepe's results: SugarCrepe's average accuracy, and
    SugarCrepe++'s image-to-text and text-only averages."""
    scores = {}
    if "sugarcrepe" in results:
        scores["SugarCrepe"] = results["sugarcrepe"]["average"]
    if "sugarcrepe_pp" in results:
        average = results["sugarcrepe_pp"]["average"]
        scores["SugarCrepe++ ITT"] = average["image_to_text"]
        scores["SugarCrepe++ TOT"] = average["text_only"]
    return scores


def write_sugarcrepe(out_dir: pathlib.Path, results: dict[str, Any]) -> None:
    """eval_sugarcrepe's results.json and results.md (one table per benchmark)."""
    atomic.write_text(out_dir / "results.json", json.dumps(results, indent=2))
    lines = [f"# SugarCrepe and SugarCrepe++ accuracy (%): {results['model']} model", ""]
    for key, metrics in (
        ("sugarcrepe", ("accuracy",)),
        ("sugarcrepe_pp", ("image_to_text", "text_only")),
    ):
        if key not in results:
            continue
        summary = results[key]
        categories = list(summary["categories"])
        lines += [
            f"## {summary['benchmark']}",
            "",
            "| Metric | " + " | ".join(categories) + " | Average |",
            "|" + "---|" * (len(categories) + 2),
        ]
        for metric in metrics:
            average = summary["average"]
            mean = average[metric] if isinstance(average, dict) else average
            cells = [_cell(summary["categories"][c][metric]) for c in categories]
            lines.append(f"| {metric} | " + " | ".join(cells) + f" | {_cell(mean)} |")
        lines.append("")
    atomic.write_text(out_dir / "results.md", "\n".join(lines))


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
    row = [
        model_name,
        *(_cell(summary["meta_tasks"].get(t)) for t in tasks),
        *(_cell(summary[s]) for s in SPLITS),
        _cell(summary["overall"]),
    ]
    number = [
        "# subsets",
        *(str(counts[t]) for t in tasks),
        *(str(counts[s]) for s in SPLITS),
        str(len(summary["subsets"])),
    ]
    lines = [
        f"# MMEB precision@1 (%): {model_name}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        "| " + " | ".join(number) + " |",
        "| " + " | ".join(row) + " |",
        "",
        "| Subset | Meta-task | Split | Queries | Precision@1 |",
        "|---|---|---|---|---|",
    ]
    for name, r in summary["subsets"].items():
        lines.append(
            f"| {name} | {r['meta_task']} | {r['split']} | {r['num_queries']} | "
            f"{_cell(r['precision_at_1'])} |"
        )
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
    bars = axes.bar(
        range(len(names)),
        [r["precision_at_1"] for r in results],
        color=[colours[r["meta_task"]] for r in results],
        edgecolor="white",
    )
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
        handles.append(
            axes.axhline(
                summary["overall"],
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"overall {summary['overall']:.1f}",
            )
        )
    axes.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.set_title(f"MMEB precision@1: {model_name}")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()
