"""g2e: From Generator to Embedder, in JAX/Flax NNX.

As a library:

    from g2e import Embedder
    embedder = Embedder.from_pretrained(model_dir)           # a Qwen2-VL / Qwen2.5-VL directory
    vectors = embedder.embed(["a red circle"], role="query")  # float32 [N, D], L2-normalised

The recipe runs with `python -m g2e.main --config=configs/mmeb.py` (see README.md).
"""

import importlib


def __getattr__(name: str):
    # `g2e.Embedder` loads g2e.embedding on first use: importing the package (and its light
    # command-line tools, e.g. data preparation) loads nothing else.
    if name == "Embedder":
        return importlib.import_module("g2e.embedding").Embedder
    raise AttributeError(f"module 'g2e' has no attribute {name!r}")
