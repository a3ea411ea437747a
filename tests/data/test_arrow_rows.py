"""Parquet training rows read by index from an Arrow copy: what a worker receives does not
grow with the number of rows, and the rows are those the parquet reader gives."""

from __future__ import annotations

import json
import pathlib
import pickle
import subprocess
import sys
import types

import pytest

from g2e.data import mmeb, rows
from g2e.data.errors import BadInputReport
from g2e.training.batches import RowCodec

REPO = pathlib.Path(__file__).resolve().parents[2]


def _data(tmp_path, count: int, **settings) -> types.SimpleNamespace:
    train_dir = tmp_path / f"train_{count}"
    records = [mmeb.train_record(f"query {i}", "", f"positive {i}", "") for i in range(count)]
    mmeb.write_split(str(train_dir), "MSCOCO", "original", records)
    return types.SimpleNamespace(
        format="parquet",
        train_dir=str(train_dir),
        train_image_root="",
        train_split="original",
        **{"max_rows_per_subset": 0, "row_sample_seed": -1, "heldout_rows": 0, **settings},
    )


def _worker_pickle(tmp_path, count: int, **settings) -> tuple[int, rows.ArrowRows]:
    """The pickled size of the function Grain sends every worker (RowCodec.encode) over the
    train stage's kind of row sequence, and the rows."""
    data = _data(tmp_path, count, **settings)
    cache = tmp_path / "rows_cache"
    subset_rows = rows.train_rows(data, "MSCOCO", BadInputReport("error"), cache_dir=cache)
    all_rows = rows.ConcatRows([subset_rows])
    return len(pickle.dumps(RowCodec(None, all_rows, image_root=None).encode)), subset_rows


def test_worker_pickles_do_not_grow_with_the_rows(tmp_path):
    small, _ = _worker_pickle(tmp_path, 5_000, heldout_rows=10)
    large, large_rows = _worker_pickle(tmp_path, 100_000, heldout_rows=10)
    assert len(large_rows) == 100_000 - 10
    assert large < 1.2 * small and large < 4096, (small, large)


def _peaks(tmp_path, count: int, copy: bool = False) -> dict[str, int]:
    """Peak RSS (kB) of a worker reading rows by index and of its main process, over `count`
    parquet rows (tests/data/worker_memory_run.py, in a fresh process)."""
    data = _data(tmp_path, count)
    cache = tmp_path / f"rows_cache_{count}"
    run = [sys.executable, "-m", "tests.data.worker_memory_run", data.train_dir, str(cache)]
    subprocess.run([*run, "convert"], check=True, cwd=REPO)
    done = subprocess.run(
        [*run, "measure", *(["--copy"] if copy else [])],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_worker_and_main_memory_do_not_grow_with_the_rows(tmp_path):
    small, large = _peaks(tmp_path, 5_000), _peaks(tmp_path, 100_000)
    assert (small["rows"], large["rows"]) == (5_000, 100_000)
    for process in ("worker_kb", "main_kb"):
        assert large[process] < 1.2 * small[process], (process, small, large)


def test_arrow_rows_equal_the_parquet_rows_and_are_kept(tmp_path):
    data = _data(tmp_path, 300)
    report = BadInputReport("error")
    expected = mmeb.read_train_subset(data.train_dir, "MSCOCO", "original", data.train_dir, report)
    cache = tmp_path / "rows_cache"
    arrow = rows.train_rows(data, "MSCOCO", report, cache_dir=cache)
    assert isinstance(arrow, rows.ArrowRows)
    assert list(arrow) == expected
    copy = pickle.loads(pickle.dumps(arrow))  # a worker's view: the path only
    assert copy[299] == expected[299] and copy[-1] == expected[-1]
    (written,) = cache.iterdir()
    stamp = written.stat().st_mtime_ns
    again = rows.train_rows(data, "MSCOCO", report, cache_dir=cache)
    assert again.path == arrow.path and written.stat().st_mtime_ns == stamp  # not re-read
