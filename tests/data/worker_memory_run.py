"""Child process of test_worker_memory: reads training rows by index in a Grain worker, as the
train stage's row encoder does, and prints the peak RSS (kB) of the worker and of this process.

  python -m tests.data.worker_memory_run DATA_DIR CACHE_DIR convert|measure [--copy]

'convert' makes the one-time Arrow copy (not measured); 'measure' reads 4,000 random rows.
`--copy` plants the defect the test names: the rows copied into a list the worker receives.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from collections.abc import Sequence
from typing import Any

import numpy as np

from g2e.data import rows, workers
from g2e.data.errors import BadInputReport


def peak_kb() -> int:
    """This process's peak resident set (VmHWM), kB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


@dataclasses.dataclass(frozen=True)
class ReadRow:
    """Reads row `index` in the worker (what RowCodec.encode does before tokenising); returns
    the worker's peak RSS."""

    rows: Sequence[Any]

    def __call__(self, index: int) -> int:
        row = self.rows[int(index)]
        if not row.qry_text.startswith("query"):
            raise ValueError(f"row {index} reads {row.qry_text!r}")
        return peak_kb()


def main(data_dir: str, cache_dir: str, mode: str, copy: bool) -> None:
    data = types.SimpleNamespace(
        format="parquet",
        train_dir=data_dir,
        train_image_root="",
        train_split="original",
        max_rows_per_subset=0,
        row_sample_seed=-1,
        heldout_rows=0,
    )
    subset_rows = rows.train_rows(data, "MSCOCO", BadInputReport("error"), cache_dir=cache_dir)
    if mode == "convert":
        return
    training_rows = rows.ConcatRows([list(subset_rows) if copy else subset_rows])
    indices = np.random.default_rng(0).integers(0, len(training_rows), 4000).tolist()
    stream = workers.Stream(indices, ReadRow(training_rows), workers=1, min_items=0)
    print(json.dumps({"rows": len(training_rows), "worker_kb": max(stream), "main_kb": peak_kb()}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], "--copy" in sys.argv)
