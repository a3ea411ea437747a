"""The report's PNG charts, drawn with matplotlib's object API (Agg: no display, no pyplot state).

`results_chart`: one evaluation's precision@1 per subset. `report_chart`: every row of the run's
report, overall and per meta-task, with 95% bootstrap intervals and chance. `training_chart`:
in-batch and held-out accuracy over the steps of each training run.
"""

from __future__ import annotations

import io
import json
import pathlib
from collections.abc import Sequence
from typing import Any

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _figure(width: float, height: float):
    # Imported here: matplotlib is only needed by the stages that draw.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def results_chart(summary: dict[str, Any], model_name: str, meta_tasks: Sequence[str]) -> bytes:
    """A PNG bar chart: one bar per subset, coloured by meta-task (in `meta_tasks` order), OOD
    hatched, overall dashed."""
    from matplotlib.patches import Patch

    names = list(summary["subsets"])
    results = [summary["subsets"][n] for n in names]
    colours = dict(zip(meta_tasks, COLOURS))
    figure = _figure(max(7.0, 0.4 * len(names) + 3.5), 4.8)
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
    handles = [Patch(color=colours[t], label=t) for t in meta_tasks if t in summary["meta_tasks"]]
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
    return _png(figure)


def _row_score(row: dict[str, Any], group: str) -> float | None:
    return row[group] if group in ("overall", "IND", "OOD") else row["meta_tasks"].get(group)


def report_chart(report: dict[str, Any], groups: Sequence[str]) -> bytes:
    """A PNG of the report's rows: per group (e.g. overall and the meta-tasks), one bar per row
    with its 95% interval as an error bar, and the group's chance as a dashed line across."""
    rows = report["rows"]
    shown = [g for g in groups if any(_row_score(row, g) is not None for row in rows)]
    width = 0.8 / max(len(rows), 1)
    figure = _figure(max(7.0, 1.3 * len(shown) * max(len(rows), 1) / 3 + 4.0), 4.8)
    axes = figure.add_subplot()
    for index, row in enumerate(rows):
        positions, scores, errors = [], [], [[], []]
        for slot, group in enumerate(shown):
            score, interval = _row_score(row, group), row["ci95"].get(group)
            if score is None:
                continue
            positions.append(slot - 0.4 + width * (index + 0.5))
            scores.append(score)
            low, high = interval if interval else (score, score)
            errors[0].append(max(score - low, 0.0))
            errors[1].append(max(high - score, 0.0))
        axes.bar(
            positions,
            scores,
            width,
            yerr=errors,
            capsize=2,
            color=COLOURS[index % len(COLOURS)],
            label=row["name"],
        )
    for slot, group in enumerate(shown):
        if group in report["chance"]:
            axes.hlines(
                report["chance"][group],
                slot - 0.45,
                slot + 0.45,
                colors="black",
                linestyles="--",
                linewidth=1,
                label="chance" if slot == 0 else None,
            )
    axes.set_xticks(range(len(shown)), shown)
    axes.set_ylim(0, 105)
    axes.set_ylabel("precision@1 (%)")
    axes.set_title("MMEB precision@1 with 95% bootstrap intervals")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(figure)


def read_train_metrics(path: pathlib.Path) -> dict[str, dict[int, float]]:
    """{"in-batch": {step: %}, "held-out": {step: %}} from a training stage's metrics lines
    (in-batch `accuracy` is a fraction, `heldout_accuracy` a percentage); a step logged twice
    (a resumed run appends) keeps its last value."""
    curves: dict[str, dict[int, float]] = {"in-batch": {}, "held-out": {}}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "accuracy" in record:
            curves["in-batch"][int(record["step"])] = 100.0 * float(record["accuracy"])
        if "heldout_accuracy" in record:
            curves["held-out"][int(record["step"])] = float(record["heldout_accuracy"])
    return curves


def training_chart(runs: dict[str, dict[str, dict[int, float]]]) -> bytes:
    """A PNG of each training run's accuracy over its steps: in-batch (solid) and held-out
    (dashed, markers), one colour per run ({run name: read_train_metrics(...)})."""
    figure = _figure(8.0, 4.5)
    axes = figure.add_subplot()
    for index, (name, curves) in enumerate(runs.items()):
        colour = COLOURS[index % len(COLOURS)]
        for curve, style, marker in (("in-batch", "-", None), ("held-out", "--", "o")):
            points = sorted(curves[curve].items())
            if points:
                steps, values = zip(*points)
                axes.plot(
                    steps,
                    values,
                    linestyle=style,
                    marker=marker,
                    markersize=3,
                    color=colour,
                    label=f"{name}, {curve}",
                )
    axes.set_xlabel("step")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_ylim(0, 105)
    axes.set_title("Training: in-batch and held-out retrieval accuracy")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(figure)
