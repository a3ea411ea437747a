"""Bad input: one exception type and one skip report shared by the data readers and the stages.

Policy (`--config.data.on_bad_input`):
  'error' (default): the first bad input stops the run with a `BadInput` that names the subset,
                     the row, the file and what to do.
  'skip':            the input is dropped; `BadInputReport` counts it per (subset, reason) and
                     keeps a few examples, so the end of a stage can print what was left out.

Usage in a reader or a stage:

    report = BadInputReport(config.data.on_bad_input)
    for row_index, row in enumerate(rows):
        try:
            item = make_item(row)                       # may raise BadInput
        except BadInput as error:
            report.handle(error.with_context(subset=name, row=row_index))   # raises under 'error'
            continue
    print(report.summary())
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

POLICIES = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class Line:
    """Where an input came from in a text file (the embed command's JSONL): a BadInput's `row`
    that reads 'line N of FILE'."""

    path: str
    number: int

    def __str__(self) -> str:
        return f"line {self.number} of {self.path}"


class BadInput(ValueError):
    """An input row that cannot be used as is (bad image, empty or over-long text, ...).

    Attributes:
      reason: short, stable description used for counting (e.g. 'missing image').
      detail: longer free text (sizes, the decoder's message).
      subset, row, file: where the input came from; any may be unknown (None / '').
      hint: what the user can do about it.
    """

    def __init__(
        self,
        reason: str,
        *,
        detail: str = "",
        subset: str = "",
        row: Any = None,
        file: str = "",
        hint: str = "",
    ):
        self.reason = reason
        self.detail = detail
        self.subset = subset
        self.row = row
        self.file = file
        self.hint = hint
        super().__init__(self._message())

    def _message(self) -> str:
        where = []
        if self.subset:
            where.append(f"subset {self.subset!r}")
        if self.row is not None:
            where.append(str(self.row) if isinstance(self.row, Line) else f"row {self.row}")
        if self.file:
            where.append(f"file {self.file!r}")
        text = self.reason
        if self.detail:
            text += f" ({self.detail})"
        if where:
            text = ", ".join(where) + ": " + text
        if self.hint:
            text += f". {self.hint}"
        return text

    def with_context(
        self, *, subset: str | None = None, row: Any = None, file: str | None = None
    ) -> BadInput:
        """Returns a copy with the missing location fields filled in (known ones are kept)."""
        return BadInput(
            self.reason,
            detail=self.detail,
            subset=self.subset or (subset or ""),
            row=self.row if self.row is not None else row,
            file=self.file or (file or ""),
            hint=self.hint,
        )

    def __reduce__(self):  # Keeps the keyword fields through pickling (multiprocessing loaders).
        return (
            _rebuild_bad_input,
            (self.reason, self.detail, self.subset, self.row, self.file, self.hint),
        )


def _rebuild_bad_input(reason, detail, subset, row, file, hint) -> BadInput:
    return BadInput(reason, detail=detail, subset=subset, row=row, file=file, hint=hint)


@dataclasses.dataclass
class BadInputReport:
    """Applies the on_bad_input policy and counts what was skipped.

    `handle(error)` raises the error under 'error' and records it under 'skip'. `counts` maps
    (subset, reason) -> number skipped; `examples` keeps the first `max_examples` messages.
    """

    policy: str = "error"
    max_examples: int = 20
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(
                f"data.on_bad_input must be one of {POLICIES}, got {self.policy!r}; "
                "set --config.data.on_bad_input=error or =skip"
            )

    def handle(self, error: BadInput) -> None:
        """Raises `error` under the 'error' policy; otherwise counts it as skipped."""
        if self.policy == "error":
            raise error
        self.counts[(error.subset, error.reason)] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))

    @property
    def total(self) -> int:
        """Number of inputs skipped so far."""
        return sum(self.counts.values())

    def merge(self, other: BadInputReport) -> None:
        """Adds the counts and examples of another report (e.g. from another worker)."""
        self.counts.update(other.counts)
        room = self.max_examples - len(self.examples)
        self.examples.extend(other.examples[: max(room, 0)])

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form: {'skipped': N, 'by_subset_reason': [...], 'examples': [...]}."""
        return {
            "skipped": self.total,
            "by_subset_reason": [
                {"subset": subset, "reason": reason, "count": count}
                for (subset, reason), count in sorted(self.counts.items())
            ],
            "examples": list(self.examples),
        }

    def summary(self) -> str:
        """One human-readable paragraph for the end of a stage."""
        if not self.total:
            return "bad input: none skipped"
        lines = [f"bad input: {self.total} skipped (on_bad_input=skip)"]
        for (subset, reason), count in sorted(self.counts.items()):
            lines.append(f"  {subset or '<no subset>'}: {count} x {reason}")
        if self.examples:
            lines.append("  first examples:")
            lines.extend(f"    {example}" for example in self.examples[:5])
        return "\n".join(lines)
