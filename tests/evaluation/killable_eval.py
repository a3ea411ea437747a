"""Test helper: the MMEB evaluation of test_mmeb's label embedder in a process of its own, so a
test can SIGKILL it at a kill point (g2e.killpoints, tests/killing.py).

    python -m tests.evaluation.killable_eval '<keyword arguments of evaluate_mmeb, as JSON>'
"""

import json
import sys

from g2e.evaluation import mmeb as evaluation
from tests.evaluation.test_mmeb import FakeEmbedder

if __name__ == "__main__":
    evaluation.evaluate_mmeb(FakeEmbedder(), **json.loads(sys.argv[1]))
