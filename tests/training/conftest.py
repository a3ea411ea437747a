"""Fixtures of the training tests."""

import pytest

from g2e.demo import mini_mmeb, tiny


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A mini-MMEB (12 training rows per subset) and a tiny model, once per module."""
    root = tmp_path_factory.mktemp("mini")
    mini_mmeb.build(str(root / "data"), seed=0, train_rows=12, eval_queries=2, candidates=2)
    tiny.write_assets(root / "model")
    return root
