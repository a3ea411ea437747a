"""Named points where a test may stop a child process, with no sleeps and no races.

A test starts a g2e process with `G2E_KILLPOINT=<name>` and `G2E_KILLPOINT_FILE=<path>`; when
the process reaches the point of that name it writes the file and waits there until it is
killed (SIGKILL from the test, which polls for the file) or released: a test that sends
SIGTERM (whose handler only sets a flag) then writes `<path>.release`, and the process goes on
to act on the signal at its next boundary. Without the variable the call is one dictionary
lookup. Point names: `train_step_<n>` after step n's checkpoint decision,
`embedding_shard_<subset>/<name>_<n>` after shard n of an evaluation or mining embedding
cache's `<name>` (queries, candidates, positives) is written,
`judge_shard_<subset>_<n>` after a judge-cache shard is written.
"""

from __future__ import annotations

import os
import pathlib
import time

ENV_NAME = "G2E_KILLPOINT"
ENV_FILE = "G2E_KILLPOINT_FILE"


def reached(name: str) -> None:
    """Writes G2E_KILLPOINT_FILE and waits to be killed or released if G2E_KILLPOINT is `name`."""
    if os.environ.get(ENV_NAME) != name:
        return
    marker = os.environ.get(ENV_FILE)
    if not marker:
        raise RuntimeError(f"{ENV_NAME}={name} needs {ENV_FILE}, the file the test polls for")
    release = pathlib.Path(marker + ".release")
    pathlib.Path(marker).write_text(f"{os.getpid()} {name}\n")
    while not release.exists():  # signal handlers still run between the sleeps
        time.sleep(0.05)
