"""Test-wide setup: 8 simulated CPU devices and one compilation cache for the session, set
before anything imports jax."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Subprocesses (`python -m g2e.main`, multi-process runs) import the g2e of this checkout, not
# whichever copy the virtual environment's editable install points at.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)

# One persistent compilation cache for the session (tests/compilation_cache.py), made by the
# process that starts the session; the test processes (pytest-xdist) and their subprocesses
# inherit it. Fresh each session, so no test meets programs compiled by an older checkout.
_SESSION_CACHE_OWNER = "G2E_TEST_SESSION_CACHE"
if _SESSION_CACHE_OWNER not in os.environ:
    os.environ[_SESSION_CACHE_OWNER] = str(os.getpid())
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="g2e-tests-jax-cache-")


def pytest_unconfigure(config):
    if os.environ.get(_SESSION_CACHE_OWNER) == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Files with slow tests first, so the two test processes (pytest.ini) do not end on one
    long file while the other idles; the order inside a file is kept."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
