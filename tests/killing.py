"""Test helper: run a g2e process until it reaches a named kill point (g2e.killpoints) and
SIGKILL it there. The process waits at the point, so no sleep and no timing window decides
where it dies; the test only polls for the file the point writes."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence

from g2e import killpoints


def kill_at(
    command: Sequence[str],
    point: str,
    log: pathlib.Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> str:
    """Runs `command` with G2E_KILLPOINT=`point`, SIGKILLs it once it waits there.

    Returns the process's output (stdout and stderr, also left in `log`). Fails when the
    process ends, or does not reach the point within `timeout` seconds.
    """
    marker = log.with_name(log.name + ".killpoint")
    marker.unlink(missing_ok=True)
    env = {**(os.environ if env is None else env)}
    env.update({killpoints.ENV_NAME: point, killpoints.ENV_FILE: str(marker)})
    deadline = time.monotonic() + timeout
    with log.open("w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            while not marker.exists():
                if process.poll() is not None:
                    raise AssertionError(
                        f"exit code {process.returncode} before the kill point {point}:\n"
                        + log.read_text()[-4000:]
                    )
                if time.monotonic() > deadline:
                    raise AssertionError(f"kill point {point} not reached in {timeout} s")
                time.sleep(0.02)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()[-4000:]
    return log.read_text()
