"""Embed-path throughput: g2e (jitted JAX) vs transformers (PyTorch, eager) on the same inputs.

  python bench/bench_embed.py [--items 32] [--batch-size 8] [--layers 2] [--pack-length 512] [--out DIR]
  # toy sizes (bench/gpu_session.sh --smoke): tiny widths and vocabulary
  python bench/bench_embed.py --widths tiny --items 4 --batch-size 2 --repeats 1

Runs where JAX's default backend is (CPU here; a GPU where jax has one, and then PyTorch runs on
CUDA too, with TF32 off on both sides so both compute in float32).

The model has Qwen2-VL-2B widths (text 1536, vision 1280), `--layers` layers in each tower and
the real vocabulary (151,936), with random weights written by transformers (tests/models/
checkpoints.py) and a tokenizer from g2e.demo.tiny. The items are a fixed mix of text-only
queries and candidates and ~224x224 images (PNG files, so both sides decode them).

Both sides run end to end in float32, preprocessing included (prompt,
tokenising, image loading and processing, padding, forward, pooling, L2 norm), in batches of
`--batch-size`:
  * g2e: `Embedder` (buckets, one jitted program per bucket); the first pass compiles and is
    reported separately as warm-up; the timed passes reuse the compiled programs.
  * transformers: `AutoTokenizer` + `Qwen2VLImageProcessorPil` + the base `Qwen2VLModel`
    (no LM head over every position, which favours transformers), eager attention, left
    padding, batches in input order padded to their longest item.
Both sides get the same CPU threads (XLA's and torch's defaults: every usable core). Prints
the median over `--repeats` timed passes after a warm-up pass (and the spread), examples/s of
both, their ratio (target: g2e >= 1.5x) and the largest difference between the two sides'
embeddings (both must compute the same thing: within 1e-4).
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np
import torch
import transformers
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from g2e.data import prompts  # noqa: E402
from g2e.data.preprocess import EmbedItem, Processor  # noqa: E402
from g2e.demo import tiny  # noqa: E402
from g2e.embedding import Embedder  # noqa: E402
from g2e.models import hf_io  # noqa: E402
from tests.models import checkpoints  # noqa: E402

VOCAB_SIZE = 151936
TINY_VOCAB_SIZE = 1031  # the tiny tokenizer's 1024 learned tokens and its 7 special ones
TEXTS = (
    "a red circle and a blue square",
    "a dog sitting in front of the house",
    "Find me an everyday image that matches the given caption: a man holding a cup",
    "Represent the given image with the following question: What is in the picture?",
    "two people walking on the street near the water under a bright sky",
)


def write_checkpoint(out_dir: pathlib.Path, layers: int, widths: str = "2b") -> pathlib.Path:
    """Random checkpoint (2B widths and vocabulary, or 'tiny') + tiny tokenizer; config ids
    follow the tokenizer's."""
    vocab_size = VOCAB_SIZE if widths == "2b" else TINY_VOCAB_SIZE
    model, _ = checkpoints.make_hf_checkpoint(
        out_dir, widths=widths, vocab_size=vocab_size, num_layers=layers
    )
    del model
    gc.collect()
    tokenizer = tiny.build_tokenizer(TEXTS)
    tokenizer.save_pretrained(out_dir)
    ids = tiny.special_token_ids(tokenizer)
    config = json.loads((out_dir / "config.json").read_text())
    # The checkpoint put Qwen's special ids at the top of the vocabulary; the tokenizer has them
    # right after its small learned vocabulary. Weights do not depend on which ids are special.
    config.update(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    config["text_config"].update(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    # Qwen2-VL's released pixel limits (a 224x224 image is 256 patches, 64 merged tokens).
    processor = tiny.preprocessor_config(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return out_dir


def make_items(out_dir: pathlib.Path, count: int) -> list[EmbedItem]:
    """Half text-only, half with an image file of about 224x224; queries and candidates."""
    rng = np.random.RandomState(0)
    items = []
    for index in range(count):
        text = TEXTS[index % len(TEXTS)]
        role = "query" if index % 3 else "candidate"
        image = None
        if index % 2:
            height, width = 224 - 28 * (index % 3), 224  # 256, 224 or 192 patches
            path = out_dir / f"image_{index}.png"
            Image.fromarray(rng.randint(0, 256, (height, width, 3), np.uint8)).save(path)
            image = str(path)
            if index % 4 == 1:
                text = "<|image_1|>\n" + text
        items.append(EmbedItem(text, image, role))
    return items


def run_g2e(
    directory: pathlib.Path,
    items: list[EmbedItem],
    batch_size: int,
    repeats: int,
    workers: int,
    pack_length: int = 0,
) -> tuple[np.ndarray, float, list[float]]:
    """(embeddings, warm-up seconds, timed seconds of each pass)."""
    model = hf_io.load_model(directory)
    processor = Processor.from_dir(directory, max_length=2048)
    embedder = Embedder(
        model,
        processor,
        mesh=None,
        batch_size=batch_size,
        progress=False,
        workers=workers,
        pack_length=pack_length,
    )
    start = time.perf_counter()
    embedder(items)
    warmup = time.perf_counter() - start
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = embedder(items)
        timings.append(time.perf_counter() - start)
    print(f"g2e padding: {processor.padding_report()}", flush=True)
    return out, warmup, timings


@torch.no_grad()
def transformers_pass(
    model, tokenizer, image_processor, items: list[EmbedItem], batch_size: int, device: str
) -> np.ndarray:
    """One end-to-end pass: prompts, images, tokens, forward, last-token pooling."""
    image_token_id = tokenizer.convert_tokens_to_ids(prompts.IMAGE_PAD)
    merge = image_processor.merge_size**2
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        texts, images = [], []
        for item in chunk:
            text = prompts.embedding_prompt_text(
                item.text, has_image=item.image is not None, role=item.role
            )
            if item.image is not None:
                images.append(Image.open(item.image).convert("RGB"))
            texts.append(text)
        inputs = {}
        if images:
            features = image_processor(images=images)
            grids = np.asarray(features["image_grid_thw"])
            counts = iter(int(g.prod()) // merge for g in grids)
            texts = [
                t.replace(prompts.IMAGE_PAD, prompts.IMAGE_PAD * next(counts), 1)
                if prompts.IMAGE_PAD in t
                else t
                for t in texts
            ]
            inputs = dict(
                pixel_values=torch.tensor(np.asarray(features["pixel_values"])),
                image_grid_thw=torch.tensor(grids),
            )
        tokens = tokenizer(
            texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False
        )
        inputs = {key: value.to(device) for key, value in inputs.items()}
        tokens = {key: value.to(device) for key, value in tokens.items()}
        hidden = model.model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            mm_token_type_ids=(tokens["input_ids"] == image_token_id).long(),
            **inputs,
        ).last_hidden_state[:, -1]
        out.append(torch.nn.functional.normalize(hidden.double(), dim=-1).float().cpu().numpy())
    return np.concatenate(out)


def run_transformers(
    directory: pathlib.Path, items: list[EmbedItem], batch_size: int, repeats: int, device: str
) -> tuple[np.ndarray, float, list[float]]:
    model = (
        transformers.Qwen2VLForConditionalGeneration.from_pretrained(
            directory, dtype=torch.float32, attn_implementation="eager"
        )
        .eval()
        .to(device)
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(directory)
    start = time.perf_counter()
    transformers_pass(model, tokenizer, image_processor, items, batch_size, device)
    warmup = time.perf_counter() - start
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = transformers_pass(model, tokenizer, image_processor, items, batch_size, device)
        timings.append(time.perf_counter() - start)
    return out, warmup, timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed passes after the warm-up (the median is compared)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="g2e's Grain encoding processes (0: in the main process, as the transformers side)",
    )
    parser.add_argument("--out", default="", help="work folder (default: a temporary one)")
    parser.add_argument("--widths", default="2b", choices=("2b", "tiny"))
    parser.add_argument(
        "--pack-length",
        type=int,
        default=0,
        help="g2e packs several inputs into rows of this many tokens (data.pack_length; 0: off)",
    )
    parser.add_argument("--result", default="", help="also write the figures here (JSON)")
    args = parser.parse_args()
    backend = jax.default_backend()
    device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
    # float32 means float32 on both sides: no TF32 matmuls on a GPU.
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(
        f"jax backend: {backend} ({jax.devices()[0].device_kind}), torch device: {device}, "
        f"torch threads: {torch.get_num_threads()}",
        flush=True,
    )
    out_dir = pathlib.Path(args.out or tempfile.mkdtemp(prefix="bench_embed_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    directory = write_checkpoint(out_dir / "checkpoint", args.layers, args.widths)
    items = make_items(out_dir, args.items)
    print(
        f"checkpoint and items: {time.perf_counter() - start:.1f} s "
        f"({sum(i.image is not None for i in items)} of {len(items)} items with an image)",
        flush=True,
    )

    g2e_out, g2e_warmup, g2e_times = run_g2e(
        directory, items, args.batch_size, args.repeats, args.workers, args.pack_length
    )
    gc.collect()
    hf_out, hf_warmup, hf_times = run_transformers(
        directory, items, args.batch_size, args.repeats, device
    )
    g2e_seconds, hf_seconds = float(np.median(g2e_times)), float(np.median(hf_times))
    figures = {
        "jax_backend": backend,
        "torch_device": device,
        "items": len(items),
        "batch_size": args.batch_size,
        "layers": args.layers,
        "g2e_warmup_s": round(g2e_warmup, 2),
        "g2e_s": round(g2e_seconds, 2),
        "g2e_examples_per_s": round(len(items) / g2e_seconds, 2),
        "transformers_first_pass_s": round(hf_warmup, 2),
        "transformers_s": round(hf_seconds, 2),
        "transformers_examples_per_s": round(len(items) / hf_seconds, 2),
        "ratio": round(hf_seconds / g2e_seconds, 2),
        "g2e_pass_s_min_max": [round(min(g2e_times), 2), round(max(g2e_times), 2)],
        "transformers_pass_s_min_max": [round(min(hf_times), 2), round(max(hf_times), 2)],
        "max_abs_embedding_difference": float(np.abs(g2e_out - hf_out).max()),
    }
    figures["widths"] = args.widths
    print(json.dumps(figures))
    if args.result:
        pathlib.Path(args.result).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
