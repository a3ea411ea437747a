"""bench/gpu_session.sh: the accelerator session's whole path, run on the CPU at toy sizes.

The script is what the first minutes on a GPU rely on, so its smoke mode runs here: every step,
every file it promises in $OUT (the device tool brings back at most 8), and figures that say
both sides of each benchmark ran.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_session.sh"
FILES = [
    "embed.json",
    "imports.txt",
    "session.log",
    "summary.txt",
    "train_g2e.json",
    "train_torch.json",
    "versions.txt",
]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_session")
    done = subprocess.run(
        ["bash", str(SCRIPT), "--smoke", "--out", str(out)],
        cwd=REPO,
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_smoke_session_writes_every_file_with_figures(session):
    assert sorted(p.name for p in session.iterdir()) == FILES
    log = (session / "session.log").read_text()
    for name in ("versions", "imports", "train_g2e", "train_torch", "embed"):
        assert f"== {name}: exit 0" in log, name
    assert "jax devices" in (session / "versions.txt").read_text()
    imports = (session / "imports.txt").read_text()
    assert "imports ok" in imports and "cuDNN fused attention needs a GPU" in imports
    g2e = json.loads((session / "train_g2e.json").read_text())
    assert g2e["seconds"] > 0 and g2e["gemm_peak"] > 0
    assert g2e["model_flops"] > g2e["model_flops_no_drop"] > 0
    assert g2e["compiles"] >= 1 and g2e["compiles_while_timed"] == 0
    torch_result = json.loads((session / "train_torch.json").read_text())
    for mode in ("autocast", "float32_adapters"):
        assert torch_result[mode]["seconds"] > 0, mode
    embed = json.loads((session / "embed.json").read_text())
    assert embed["max_abs_embedding_difference"] < 1e-4
    summary = (session / "summary.txt").read_text()
    for line in ("MFU without drop(x)@W", "torch autocast", "torch float32_adapters", "ratio"):
        assert line in summary, line


@pytest.mark.slow
def test_report_names_a_side_that_left_no_file(session, tmp_path):
    shutil.copy(session / "train_g2e.json", tmp_path)
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_train.py"), "--report", str(tmp_path)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert done.returncode == 0, done.stderr
    assert "g2e " in done.stdout and "train_torch.json" in done.stdout
    assert "torch autocast: not run" in done.stdout


def test_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(
        pathlib.Path(sys.executable).parent / "shellcheck"
    )
    assert os.path.exists(shellcheck), "shellcheck is missing: pip install -e '.[test]'"
    done = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
