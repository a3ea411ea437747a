"""The `report` stage: one table of every MMEB evaluation the run made, and where the export is.

Rows (those that ran): plain zero-shot (`eval_plain`), hierarchical zero-shot
(`eval_zero_shot`), fine-tuned (`eval`); columns: the four meta-tasks, IND, OOD, overall.
Written to <workdir>/report.md and <workdir>/report.json and printed.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

ROWS = (("eval_plain", "zero-shot, plain prompt"),
        ("eval_zero_shot", "zero-shot, hierarchical prompt"),
        ("eval", "fine-tuned (SaHa + DoRA)"))
COLUMNS = ("Classification", "VQA", "Retrieval", "Grounding", "IND", "OOD", "Overall")


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
    (workdir / "report.md").write_text("# g2e report (MMEB precision@1, %)\n\n" + text)
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + text, flush=True)
    return {"rows": [row["stage"] for row in report["rows"]], "export": report["export"]}
