"""Reports: one evaluation's results files, and the run's table of every evaluation.

`write_results` writes what `g2e.evaluation.mmeb.evaluate_mmeb` computed (the leaderboard's
layout plus a per-subset table, and a bar chart); `write_sugarcrepe` what eval_sugarcrepe
computed. `write_report` (the `report` stage) collects every evaluation the run made into one
table, <workdir>/report.md and report.json (printed too): the rows of ROWS, in that order, then
any other evaluation; columns the four meta-tasks, IND, OOD and overall, each with a 95%
bootstrap interval over queries, and SugarCrepe when evaluated; a last row gives chance (a
random ranking's precision@1). Under the table, PAIRS: the difference of two rows with a paired
bootstrap interval (the same resampled queries for both rows), which says whether an effect
(the prompt's, SaHa's) stands out of the noise of a few hundred queries. On the demo, the mining
judge's precision and recall against the mini-MMEB's truth follow (the judge_quality stage).
report.png draws the rows with their intervals; train.png the training runs' accuracy
(g2e.evaluation.charts).
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import numpy as np

from g2e import atomic, layout
from g2e.data import subsets as subset_registry
from g2e.evaluation import charts

META_TASKS = ("Classification", "VQA", "Retrieval", "Grounding")
SPLITS = ("IND", "OOD")
# The subset table spells meta-tasks in lower case; reports use the leaderboard's names.
META_TASK_NAMES = dict(zip(subset_registry.META_TASKS, META_TASKS))

# (stage whose results.json makes the row, row name), in the report's order; any other
# `eval*` stage with MMEB results follows as an extra row.
ROWS = (
    (layout.EVAL_PLAIN, "zero-shot, plain prompt"),
    (layout.EVAL_ZERO_SHOT, "zero-shot, hierarchical prompt"),
    (layout.EVAL, "fine-tuned (SaHa)"),
    (layout.EVAL_RANDOM, "fine-tuned, random batches"),
    (layout.EVAL_PLAIN_RANDOM, "fine-tuned, plain prompt, random batches"),
)
# (row a, row b, group): the differences a - b the report gives a paired interval, where both
# rows exist. What each shows: the hierarchical prompt zero-shot; fine-tuning on SaHa clusters
# over the zero-shot model; SaHa over random batches; the prompt under fine-tuning.
PAIRS = (
    (layout.EVAL_ZERO_SHOT, layout.EVAL_PLAIN, "overall"),
    (layout.EVAL, layout.EVAL_ZERO_SHOT, "overall"),
    (layout.EVAL, layout.EVAL_ZERO_SHOT, "IND"),
    (layout.EVAL, layout.EVAL_ZERO_SHOT, "OOD"),
    (layout.EVAL, layout.EVAL_RANDOM, "overall"),
    (layout.EVAL_RANDOM, layout.EVAL_PLAIN_RANDOM, "overall"),
)
GROUPS = (*META_TASKS, *SPLITS, "overall")  # what a row reports, with an interval each
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
# report.md's title; report.png and train.png sit beside it.
REPORT_TITLE = "# g2e report (MMEB precision@1, %, with 95% bootstrap intervals)"


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


# ---------------------------------------------------------------------------------------------
# Bootstrap over queries: one routine for a row's intervals and for paired differences.


def query_outcomes(results: dict[str, Any]) -> dict[str, np.ndarray]:
    """{subset: bool [queries]}: whether each query's positive ranked first (results.json's
    per-subset `correct` string of '0'/'1', in query order)."""
    return {
        name: np.frombuffer(subset["correct"].encode(), np.uint8) == ord("1")
        for name, subset in results["subsets"].items()
    }


def resample_queries(
    outcomes: dict[str, np.ndarray],
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, np.ndarray]:
    """{subset: int [samples, queries]}: query indices drawn with replacement within each
    subset, `samples` times (a fixed seed, subsets in the order given)."""
    rng = np.random.default_rng(seed)
    return {name: rng.integers(0, len(o), size=(samples, len(o))) for name, o in outcomes.items()}


def bootstrap_group_scores(
    results: dict[str, Any], draws: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """{group: float [samples]}: each group's score (percent) on every resample of `draws`: a
    subset's score is the mean over its resampled queries, a group's the unweighted mean of
    its subsets' (as on the leaderboard)."""
    outcomes = query_outcomes(results)
    subset_scores = {name: 100.0 * outcomes[name][draws[name]].mean(axis=1) for name in outcomes}
    return {
        group: np.mean([subset_scores[m] for m in members], axis=0)
        for group in GROUPS
        if (members := _members(results, group))
    }


def _percentile_interval(samples: np.ndarray) -> list[float]:
    return [round(float(np.percentile(samples, q)), 2) for q in (2.5, 97.5)]


def bootstrap_ci95(
    results: dict[str, Any], draws: dict[str, np.ndarray] | None = None
) -> dict[str, list[float]]:
    """95% percentile intervals of every group's mean precision@1 over resampled queries
    (`draws`, default resample_queries of the results: BOOTSTRAP_SAMPLES, a fixed seed)."""
    draws = draws if draws is not None else resample_queries(query_outcomes(results))
    scores = bootstrap_group_scores(results, draws)
    return {group: _percentile_interval(values) for group, values in scores.items()}


def paired_difference(
    results_a: dict[str, Any],
    results_b: dict[str, Any],
    group: str,
    draws: dict[str, np.ndarray] | None = None,
) -> tuple[float, list[float]]:
    """(a - b, its 95% interval) of a group's score, in points: a paired bootstrap, the same
    resampled queries (`draws`, default resample_queries) scoring both rows.

    Raises:
      ValueError: the two evaluations are not over the same queries (subsets or counts differ).
    """
    outcomes_a, outcomes_b = query_outcomes(results_a), query_outcomes(results_b)
    sizes_a = {name: len(o) for name, o in outcomes_a.items()}
    sizes_b = {name: len(o) for name, o in outcomes_b.items()}
    if sizes_a != sizes_b:
        raise ValueError(
            f"paired bootstrap: the evaluations differ in their subsets or query counts "
            f"({sizes_a} against {sizes_b}); pair only evaluations of the same eval set"
        )
    draws = draws if draws is not None else resample_queries(outcomes_a)
    everything = {name: np.arange(size)[None] for name, size in sizes_a.items()}
    point = (
        bootstrap_group_scores(results_a, everything)[group]
        - bootstrap_group_scores(results_b, everything)[group]
    )
    samples = (
        bootstrap_group_scores(results_a, draws)[group]
        - bootstrap_group_scores(results_b, draws)[group]
    )
    return round(float(point[0]), 2), _percentile_interval(samples)


def chance(results: dict[str, Any]) -> dict[str, float]:
    """The precision@1 of a random ranking per group (1 / candidates, averaged like scores)."""
    return {
        group: round(float(np.mean([results["subsets"][m]["chance"] for m in members])), 2)
        for group in GROUPS
        if (members := _members(results, group))
    }


# ---------------------------------------------------------------------------------------------
# The run's report.


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


def _evaluations(workdir: pathlib.Path) -> dict[str, dict[str, Any]]:
    """{stage: results.json} of every MMEB evaluation in the workdir: ROWS' stages in order,
    then any other `eval*` stage's."""
    known = [stage for stage, _ in ROWS]
    extra = sorted(
        p.parent.name
        for p in workdir.glob(f"eval*/{layout.RESULTS}")
        if p.parent.name not in known
        and p.parent.name not in (layout.EVAL_SUGARCREPE, layout.EVAL_MMEB_V2)
    )
    return {
        stage: json.loads(path.read_text())
        for stage in known + extra
        if (path := layout.results_file(workdir, stage)).is_file()
    }


def paired_rows(
    evaluations: dict[str, dict[str, Any]], names: dict[str, str]
) -> list[dict[str, Any]]:
    """The PAIRS whose two rows exist: {"a", "b" (row names), "metric", "diff", "ci95"}."""
    paired = []
    for stage_a, stage_b, group in PAIRS:
        if stage_a in evaluations and stage_b in evaluations:
            diff, interval = paired_difference(evaluations[stage_a], evaluations[stage_b], group)
            paired.append(
                {
                    "a": names[stage_a],
                    "b": names[stage_b],
                    "metric": group,
                    "diff": diff,
                    "ci95": interval,
                }
            )
    return paired


def collect(workdir: pathlib.Path) -> dict[str, Any]:
    """The report.json content (a contract): {"rows": [{"name", "overall", "IND", "OOD",
        "meta_tasks": {meta_task: score}, "ci95": {group: [lo, hi]}, "stage", "subsets",
        "sugarcrepe"?}], "paired": [{"a", "b", "metric", "diff", "ci95"}], "chance": {group:
        score}, "export", "peft", "mining", "judge_quality", "mmeb_v2" (eval_mmeb_v2's "model",
    "overall", "modalities", "meta_tasks" and per-task "scores", or None)}; scores and differences in percent
        points, rows in ROWS order then any other evaluation stage."""
    evaluations = _evaluations(workdir)
    names = {stage: stage for stage in evaluations} | dict(ROWS)
    rows = [_row(stage, names[stage], results) for stage, results in evaluations.items()]
    chances = chance(next(iter(evaluations.values()))) if evaluations else {}
    _attach_sugarcrepe(workdir, rows)
    export, peft = layout.export_dirs(workdir)
    return {
        "rows": rows,
        "paired": paired_rows(evaluations, names),
        "chance": chances,
        "export": str(export) if export.is_dir() else None,
        "peft": str(peft) if peft.is_dir() else None,
        "mining": _read(layout.mining_report_file(workdir)),
        "judge_quality": _read(layout.judge_quality_file(workdir)),
        "mmeb_v2": _mmeb_v2(workdir),
    }


def _mmeb_v2(workdir: pathlib.Path) -> dict[str, Any] | None:
    results = _read(layout.results_file(workdir, layout.EVAL_MMEB_V2))
    if results is None:
        return None
    keep = ("model", "overall", "modalities", "meta_tasks")
    scores = {name: task["score"] for name, task in results["tasks"].items()}
    return {key: results.get(key) for key in keep} | {"scores": scores}


def _read(path: pathlib.Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _attach_sugarcrepe(workdir: pathlib.Path, rows: list[dict[str, Any]]) -> None:
    """Adds eval_sugarcrepe's scores to the row of the model it evaluated."""
    path = layout.results_file(workdir, layout.EVAL_SUGARCREPE)
    if not path.is_file():
        return
    results = json.loads(path.read_text())
    stage = layout.EVAL if results["model"] == "fine-tuned" else layout.EVAL_ZERO_SHOT
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
    SugarCrepe when evaluated; the paired differences; per-subset precision@1; the judge's
    quality; the exported model."""
    lines = _main_table(report) + _paired_table(report) + _subset_table(report)
    lines += _judge_table(report) + _mmeb_v2_table(report)
    if report["export"]:
        lines += ["", f"Exported Hugging Face model: `{report['export']}`"]
    if report["peft"]:
        lines.append(f"PEFT adapter: `{report['peft']}`")
    return "\n".join(lines) + "\n"


def _mmeb_v2_table(report: dict[str, Any]) -> list[str]:
    """eval_mmeb_v2's modality means and overall (hit@1 for image and video, NDCG@5 for
    visual documents), then each task's score."""
    v2 = report.get("mmeb_v2")
    if not v2:
        return []
    modalities = ("image", "video", "visdoc")
    lines = [
        "",
        f"MMEB-V2 ({v2['model']} model; hit@1, visual documents NDCG@5):",
        "",
        "| Model | Image | Video | VisDoc | Overall |",
        "|---|---|---|---|---|",
        f"| {v2['model']} | "
        + " | ".join(_cell(v2["modalities"].get(m)) for m in modalities)
        + f" | {_cell(v2['overall'])} |",
        "",
        "| Task | " + " | ".join(v2["scores"]) + " |",
        "|---" * (len(v2["scores"]) + 1) + "|",
        "| score | " + " | ".join(_cell(v) for v in v2["scores"].values()) + " |",
    ]
    return lines


def _main_table(report: dict[str, Any]) -> list[str]:
    extra = sorted({k for row in report["rows"] for k in row.get("sugarcrepe", {})})
    header = ["Model", *META_TASKS, *SPLITS, "Overall", *extra]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in report["rows"]:
        values = [row["meta_tasks"].get(t) for t in META_TASKS]
        values += [row["IND"], row["OOD"], row["overall"]]
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
    return lines


def _paired_table(report: dict[str, Any]) -> list[str]:
    if not report.get("paired"):
        return []
    lines = [
        "",
        "Paired differences (a - b, points; 95% paired bootstrap interval, the same resampled "
        "queries for both rows):",
        "",
        "| a | b | metric | a - b | 95% interval |",
        "|---|---|---|---|---|",
    ]
    for pair in report["paired"]:
        low, high = pair["ci95"]
        lines.append(
            f"| {pair['a']} | {pair['b']} | {pair['metric']} | {pair['diff']:+.1f} | "
            f"{low:+.1f} to {high:+.1f} |"
        )
    return lines


def _subset_table(report: dict[str, Any]) -> list[str]:
    subsets = sorted({name for row in report["rows"] for name in row["subsets"]})
    if not subsets:
        return []
    lines = [
        "",
        "| Subset | " + " | ".join(r["stage"] for r in report["rows"]) + " |",
        "|---" * (len(report["rows"]) + 1) + "|",
    ]
    for name in subsets:
        cells = [_cell(r["subsets"].get(name)) for r in report["rows"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _judge_table(report: dict[str, Any]) -> list[str]:
    if not report.get("judge_quality"):
        return []
    lines = [
        "",
        "Mining judge against the mini-MMEB's truth (a pair is true when the "
        "owner's positive also answers the anchor's query; %; Wilson 95% interval):",
        "",
        "| Subset | pairs judged | truly false negatives | judge said yes | precision | recall |",
        "|---|---|---|---|---|---|",
    ]
    for name, q in report["judge_quality"].items():
        interval = q.get("precision_ci95")
        precision = _cell(q["precision"])
        if interval:
            precision += f" ({interval[0]:.1f}-{interval[1]:.1f})"
        lines.append(
            f"| {name} | {q['pairs']} | {q['true_pairs']} ({_cell(q['base_rate'])})"
            f" | {q['yes']} | {precision} | {_cell(q['recall'])} |"
        )
    return lines


def write_report(workdir: pathlib.Path) -> dict[str, Any]:
    """Writes report.md, report.json, report.png (the rows with their intervals) and, when a
    training stage logged metrics, train.png into workdir; prints the table; returns a
    summary."""
    report = collect(workdir)
    text = markdown(report)
    atomic.write_text(workdir / "report.md", REPORT_TITLE + "\n\n" + text)
    atomic.write_json(workdir / "report.json", report, indent=2)
    if report["rows"]:
        atomic.write_bytes(
            workdir / "report.png", charts.report_chart(report, ("overall", *META_TASKS))
        )
    runs = {
        stage: charts.read_train_metrics(path)
        for stage in layout.TRAINING_STAGES
        if (path := layout.train_metrics_file(workdir, stage)).is_file()
    }
    if runs:
        atomic.write_bytes(workdir / "train.png", charts.training_chart(runs))
    print("\n" + text, flush=True)
    return {
        "rows": [row["stage"] for row in report["rows"]],
        "paired": {
            f"{p['a']} - {p['b']} ({p['metric']})": [p["diff"], *p["ci95"]]
            for p in report["paired"]
        },
        "export": report["export"],
    }


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
    atomic.write_text(out_dir / layout.RESULTS, json.dumps(results, indent=2))
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
    atomic.write_text(out_dir / layout.RESULTS, json.dumps(summary, indent=2))
    atomic.write_text(out_dir / "results.md", results_markdown(summary, model_name))
    atomic.write_bytes(
        out_dir / "results.png", charts.results_chart(summary, model_name, META_TASKS)
    )


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
