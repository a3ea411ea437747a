"""Embedding throughput: g2e's jitted Qwen2VL vs transformers' PyTorch model, same weights.

    python bench/bench_model.py [--batch 8] [--iters 5] [--layers 2]

Builds a random Qwen2-VL at Qwen2-VL-2B widths (hidden 1536, 12/2 heads, MLP 8960, vision
1280/16 heads), `--layers` layers each, with the real vocabulary (151,936) and tied embeddings
(as the released 2B), writes it with transformers' save_pretrained and loads it with
g2e.models.hf_io. One batch of examples with a 224x224 image and text (optionally some text-only
ones, whose padded patches g2e's fixed-shape batch still runs through the tower); both models
embed it (last-token hidden state, L2-normalised), fp32 on CPU. Prints examples/s for
each, their ratio and the largest embedding difference.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from g2e.models import hf_io  # noqa: E402
from tests.models import checkpoints  # noqa: E402
from tests.models.test_qwen2_vl import make_batch  # noqa: E402

REAL_VOCAB = 151_936


def examples_for(batch_size: int, text_only_every: int) -> list[list]:
    """Examples with a 224x224 image (16x16 patches) and ~30 text tokens; every
    `text_only_every`-th example is text only instead (0: none)."""
    out = []
    for i in range(batch_size):
        if text_only_every and i % text_only_every == text_only_every - 1:
            out.append([30 + i])
        else:
            out.append([8, (1, 16, 16), 20 + i])
    return out


def best_time(fns: dict, iters: int) -> dict[str, float]:
    """Best seconds per call of each function, calls interleaved so both see the same load.

    Best-of-N, because the other processes on a shared machine only ever add time.
    """
    for fn in fns.values():
        fn()  # warm-up (JAX compiles here)
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--text-only-every",
        type=int,
        default=0,
        help="make every N-th example text-only (0: all have an image)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        hf_model, path = checkpoints.make_hf_checkpoint(
            tmp,
            widths="2b",
            vocab_size=REAL_VOCAB,
            tie_word_embeddings=True,
            num_layers=args.layers,
            seed=0,
        )
        model = hf_io.load_model(path)
    hf_model.config._attn_implementation = "sdpa"  # transformers' default, its fastest on CPU
    hf_model.model.config._attn_implementation = "sdpa"
    hf_model.model.visual.config._attn_implementation = "sdpa"
    hf_model.model.language_model.config._attn_implementation = "sdpa"

    examples = examples_for(args.batch, args.text_only_every)
    batch, hf_inputs = make_batch(
        model.config, examples, "left", np.random.default_rng(0), length_pad=0, patch_pad=0
    )
    print(
        f"batch: {args.batch} examples, length {batch['input_ids'].shape[1]}, "
        f"{batch['pixel_values'].shape[1]} patches per example; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )

    graphdef, state = nnx.split(model)
    embed = jax.jit(lambda state, batch: nnx.merge(graphdef, state).embed(batch))
    device_batch = jax.device_put(batch)
    ours = lambda: jax.block_until_ready(embed(state, device_batch))  # noqa: E731

    def theirs():
        with torch.no_grad():
            hidden = hf_model.model(**hf_inputs).last_hidden_state
            pooled = hidden[torch.arange(args.batch), torch.from_numpy(batch["last_index"])]
            return torch.nn.functional.normalize(pooled, dim=-1)

    diff = np.abs(np.asarray(ours()) - theirs().numpy()).max()
    seconds = best_time({"g2e": ours, "transformers": theirs}, args.iters)
    jax_s, torch_s = seconds["g2e"], seconds["transformers"]
    print(f"g2e (jax.jit, fp32):          {args.batch / jax_s:8.2f} examples/s")
    print(f"transformers (torch eager):   {args.batch / torch_s:8.2f} examples/s")
    print(f"ratio g2e / transformers:     {torch_s / jax_s:8.2f}x   (target >= 1.5x)")
    print(f"max |embedding difference|:   {diff:.2e}")


if __name__ == "__main__":
    main()
