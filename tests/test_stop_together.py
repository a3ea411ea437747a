"""Two processes stop together: a SIGTERM to one, or a bad row on one, stops both the same way.

Each job is two processes of 4 CPU devices (tests/stop_together_run.py) on a coordinator on
127.0.0.1. SIGTERM goes to JAX's preemption notifier there (g2e.training.checkpointing), whose
multi-host sync point makes both processes save the same step; a bad row met by one process
reaches the other through the step's shape agreement (g2e.training.batches.StepInputs.agree).
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from g2e import killpoints

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, out, bad_row=None, killpoint=None, marker=None):
    """The two processes of one job; `killpoint` (with its marker file) on process 1 only."""
    port, processes = _free_port(), []
    for index in range(2):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop(killpoints.ENV_NAME, None)
        if killpoint is not None and index == 1:
            env[killpoints.ENV_NAME], env[killpoints.ENV_FILE] = killpoint, str(marker)
        argv = [sys.executable, "-m", "tests.stop_together_run", str(workdir), str(out)]
        argv += [str(index), str(port)] + ([] if bad_row is None else [str(bad_row)])
        processes.append(
            subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return processes


def _finish(processes, timeout=240) -> list[tuple[int, str]]:
    """(exit code, output) of each process; a process still running after `timeout` (a hang)
    fails the test."""
    deadline, results = time.monotonic() + timeout, []
    try:
        for p in processes:
            output = p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
            results.append((p.returncode, output))
    except subprocess.TimeoutExpired:
        for p in processes:
            p.kill()
        tails = [p.communicate()[0][-3000:] for p in processes]
        pytest.fail("the processes hang:\n" + "\n---\n".join(tails))
    return results


def _steps_saved(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    work, marker = tmp_path / "run", tmp_path / "killpoint"
    stopped = _start(work, tmp_path / "out.npz", killpoint="train_step_4", marker=marker)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert all(p.poll() is None for p in stopped), [p.communicate()[0] for p in stopped]
        assert time.monotonic() < deadline, "process 1 never reached train_step_4"
        time.sleep(0.05)
    stopped[1].send_signal(signal.SIGTERM)  # only process 1 is told
    pathlib.Path(f"{marker}.release").touch()
    results = _finish(stopped)
    finished = []
    for code, output in results:
        assert code == 0, output
        finished.append([line for line in output.splitlines() if line.startswith("finished")])
    assert finished[0] == finished[1], finished
    (line,) = finished[0]
    step = int(line.split("step=")[1].split()[0])
    assert line == f"finished step={step} stopped_early=True" and 4 < step < 40, line
    assert _steps_saved(work)[-1] == step

    # Resumed, the job ends where an uninterrupted one does, bit for bit.
    for code, output in _finish(_start(work, tmp_path / "out.npz")):
        assert code == 0 and "finished step=40 stopped_early=False" in output, output
    for code, output in _finish(_start(tmp_path / "ref", tmp_path / "ref.npz")):
        assert code == 0, output
    ref, out = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "out.npz")
    assert sorted(ref.files) == sorted(out.files)
    for key in ref.files:
        np.testing.assert_array_equal(out[key], ref[key], err_msg=key)


@pytest.mark.slow
def test_a_bad_row_on_one_process_stops_both_with_its_error(tmp_path):
    # Row 20 is in the second half of step 0's global batch: process 1 encodes it, process 0 not.
    results = _finish(_start(tmp_path / "run", tmp_path / "out.npz", bad_row=20))
    errors = []
    for code, output in results:
        assert code != 0, output
        lines = [line for line in output.splitlines() if line.startswith("ValueError")]
        assert lines, output[-3000:]
        errors.append(lines[-1])
    assert errors[0] == errors[1], errors
    assert "training step" in errors[0] and "row 20" in errors[0], errors[0]
    assert "unreadable image" in errors[0] and "toy/20.png" in errors[0], errors[0]
