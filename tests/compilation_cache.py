"""Test helper: the test session's one persistent compilation cache.

tests/conftest.py makes a fresh folder per session and names it in JAX_COMPILATION_CACHE_DIR,
which the test processes and every subprocess they start inherit. Compiled programs are then
shared: a test that builds the same model again, and the runs of a resume test, load what an
earlier process compiled instead of compiling it again. `python -m g2e.main` points the cache at
its workdir instead (g2e.main.setup_compilation_cache); a test passes `main_flags()` to share the
session's.
"""

from __future__ import annotations

import os

ENV_NAME = "JAX_COMPILATION_CACHE_DIR"


def main_flags() -> list[str]:
    """`python -m g2e.main` flags that use the session's cache, for every program compiled."""
    return [
        f"--config.compilation_cache.dir={os.environ[ENV_NAME]}",
        "--config.compilation_cache.min_compile_time_secs=0",
    ]
