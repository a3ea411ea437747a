"""Tiny Qwen2-VL assets made in-process: tokenizer, config.json dict, preprocessor config.

Used by the demo (which trains a tiny model from scratch) and by the tests. Nothing is
downloaded and torch is not needed:
  * `build_tokenizer` trains a byte-level BPE tokenizer with the `tokenizers` package, with
    Qwen2's pre-tokenizer and normaliser and Qwen's special tokens at the top of the vocabulary,
    wrapped as transformers' `Qwen2TokenizerFast` (it reloads with `AutoTokenizer`);
  * `tiny_hf_config` returns a Qwen2-VL (or, with model_type='qwen2_5_vl', Qwen2.5-VL)
    config.json dict with the tokenizer's special ids;
  * `preprocessor_config` returns the Qwen2-VL image processor settings for tiny images;
  * `write_assets` writes all three into a checkpoint directory (weights are written by
    whoever builds the model).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable
from typing import Any

import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2-VL's special tokens, in Qwen's id order (they follow the learned vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2's pre-tokenisation regex (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# A small built-in corpus so the tokenizer learns common English pieces even with no texts
# given: the prompt words of g2e, the judge's answers, colours, objects, shapes and verbs.
BUILTIN_CORPUS = """
Given an image, summarize the provided image in one word. Given only text, describe the text in
one word. Represent the given text/image in one word. Represent the given text in one word.
Represent the given image with the following question: Find me an image that matches the given
caption: Does the candidate correctly answer or match the query? Answer Yes or No. Yes No yes no
Query: Candidate: You are a careful judge. Decide whether a candidate is a correct match for a
query: the right answer to its question, or the item it asks for or describes.
a an the of in on at to with and or is are was were this that what which who where when how why
red green blue yellow orange purple black white gray brown pink dark light bright colour color
circle square triangle star cross ring stripe dot line shape object animal person car bus train
dog cat bird horse cow sheep boat plane bicycle tree flower house street city sky water grass
man woman child people group table chair cup bottle phone book computer picture photo image
big small large tiny tall short left right top bottom middle center above below near next front
one two three four five six seven eight nine ten many some few all no not only also very
sitting standing walking running holding looking playing eating riding wearing showing there
Select the portion of the image that follows the language expressions. Identify the category.
Retrieve an image that matches the caption. Answer the question about the image. Find a caption.
about after again against around because before behind between during under over through
kitchen bedroom bathroom office garden beach mountain river forest road bridge building tower
window door wall floor roof fence sign light lamp clock mirror picture painting poster screen
apple banana orange pizza sandwich cake bread coffee tea milk wine beer soup salad dinner lunch
shirt dress jacket hat shoe bag umbrella glasses watch helmet uniform coat scarf glove
football baseball tennis soccer basketball skateboard surfboard snowboard kite frisbee ball
elephant giraffe zebra bear lion tiger monkey mouse rabbit duck chicken fish snake turtle
number letter word sentence question answer category label caption title document chart table
news article story report sports politics business science health travel food fashion music
country state place scene indoor outdoor morning evening night winter summer spring autumn
happy sad angry calm quiet loud fast slow old new young hot cold warm clean dirty empty full
Yes
No
"""


def build_tokenizer(
    texts: Iterable[str] = (),
    *,
    vocab_size: int = 1024,
) -> transformers.Qwen2TokenizerFast:
    """Trains a byte-level BPE tokenizer on the built-in corpus plus `texts`.

    Args:
      texts: extra training texts (e.g. the demo's data), so its words become few tokens.
      vocab_size: size of the learned vocabulary (the 7 special tokens come on top of it).
    Returns:
      A `Qwen2TokenizerFast` with eos '<|im_end|>' and pad '<|endoftext|>' (as Qwen2-VL-Instruct),
      whose special tokens hold the ids vocab..vocab+6 in `SPECIAL_TOKENS` order.
    """
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [line for line in BUILTIN_CORPUS.splitlines() if line.strip()]
    backend.train_from_iterator([*corpus, *texts], trainer)

    model = json.loads(backend.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # Special tokens follow the learned vocabulary, as in Qwen's tokenizer.
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = transformers.Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    for token in SPECIAL_TOKENS:
        if tokenizer.convert_tokens_to_ids(token) != vocab[token]:
            raise RuntimeError(f"special token {token} did not keep id {vocab[token]}")
    return tokenizer


def special_token_ids(tokenizer: transformers.PreTrainedTokenizerBase) -> dict[str, int]:
    """Maps each of Qwen's special tokens to its id in `tokenizer`."""
    return {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}


def tiny_hf_config(
    tokenizer: transformers.PreTrainedTokenizerBase,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    mrope_section: tuple[int, int, int] | None = None,
    vision_width: int = 32,
    vision_heads: int = 4,
    vision_layers: int = 2,
    vision_mlp_ratio: int = 2,
    tie_word_embeddings: bool = False,
    vocab_multiple: int = 64,
    model_type: str = "qwen2_vl",
    vision_window_size: int = 56,
    vision_fullatt_blocks: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """A Qwen2-VL config.json dict (the nested layout transformers 5 writes) for `tokenizer`.

    The vocabulary is the tokenizer's size rounded up to `vocab_multiple` (Qwen pads its
    embedding table the same way). `mrope_section` defaults to Qwen's 1:1.5:1.5 split of half
    the head dimension (16, 24, 24 for head dim 128).

    model_type='qwen2_5_vl' writes a Qwen2.5-VL config instead: SwiGLU vision MLP of width
    vision_width * vision_mlp_ratio, attention windows of `vision_window_size` pixels (56: 2x2
    merged units, so tiny images hold several), full attention in `vision_fullatt_blocks`
    (default: the last block).
    """
    if model_type not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"model_type must be 'qwen2_vl' or 'qwen2_5_vl', got {model_type!r}")
    mrope_section = _checked_mrope_section(hidden_size // heads, mrope_section)
    ids = special_token_ids(tokenizer)
    vocab_size = -(-len(tokenizer) // vocab_multiple) * vocab_multiple
    text_config = _text_config(
        ids,
        model_type=model_type,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        mrope_section=mrope_section,
        tie_word_embeddings=tie_word_embeddings,
    )
    vision_config, architecture = _vision_section(
        model_type,
        hidden_size=hidden_size,
        vision_width=vision_width,
        vision_heads=vision_heads,
        vision_layers=vision_layers,
        vision_mlp_ratio=vision_mlp_ratio,
        window_size=vision_window_size,
        fullatt_blocks=vision_fullatt_blocks,
    )
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": tie_word_embeddings,
    }


def _vision_section(
    model_type: str, *, window_size: int, fullatt_blocks: tuple[int, ...] | None, **widths: int
) -> tuple[dict[str, Any], str]:
    """(vision_config, architecture name) of `model_type`; Qwen2.5-VL's full attention defaults
    to the last block."""
    if model_type == "qwen2_5_vl":
        fullatt = (widths["vision_layers"] - 1,) if fullatt_blocks is None else fullatt_blocks
        config = _qwen2_5_vl_vision_config(
            **widths, window_size=window_size, fullatt_blocks=fullatt
        )
        return config, "Qwen2_5_VLForConditionalGeneration"
    return _qwen2_vl_vision_config(**widths), "Qwen2VLForConditionalGeneration"


def _checked_mrope_section(
    head_dim: int, mrope_section: tuple[int, int, int] | None
) -> tuple[int, int, int]:
    """`mrope_section`, or Qwen's 1:1.5:1.5 split of half the head dimension when None."""
    if mrope_section is None:
        half = head_dim // 2
        temporal = half // 4
        height = (half - temporal) // 2
        mrope_section = (temporal, height, half - temporal - height)
    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    return mrope_section


def _text_config(
    ids: dict[str, int],
    *,
    model_type: str,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    layers: int,
    heads: int,
    kv_heads: int,
    mrope_section: tuple[int, int, int],
    tie_word_embeddings: bool,
) -> dict[str, Any]:
    """config.json's `text_config` (the Qwen2 decoder) with the tokenizer's special `ids`."""
    return {
        "model_type": f"{model_type}_text",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": list(mrope_section),
        },
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }


def _qwen2_vl_vision_config(
    *,
    hidden_size: int,
    vision_width: int,
    vision_heads: int,
    vision_layers: int,
    vision_mlp_ratio: int,
) -> dict[str, Any]:
    """Qwen2-VL's `vision_config`: a quick-GELU MLP ViT, merged into `hidden_size`."""
    return {
        "model_type": "qwen2_vl_vision",
        "depth": vision_layers,
        "embed_dim": vision_width,
        "hidden_size": hidden_size,
        "num_heads": vision_heads,
        "mlp_ratio": vision_mlp_ratio,
        "hidden_act": "quick_gelu",
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }


def _qwen2_5_vl_vision_config(
    *,
    hidden_size: int,
    vision_width: int,
    vision_heads: int,
    vision_layers: int,
    vision_mlp_ratio: int,
    window_size: int,
    fullatt_blocks: tuple[int, ...],
) -> dict[str, Any]:
    """Qwen2.5-VL's `vision_config`: SwiGLU MLP, attention windows of `window_size` pixels,
    full attention in `fullatt_blocks`."""
    return {
        "model_type": "qwen2_5_vl_vision",
        "depth": vision_layers,
        "hidden_size": vision_width,
        "out_hidden_size": hidden_size,
        "intermediate_size": vision_width * vision_mlp_ratio,
        "num_heads": vision_heads,
        "hidden_act": "silu",
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": window_size,
        "fullatt_block_indexes": list(fullatt_blocks),
        "tokens_per_second": 2,
    }


def preprocessor_config(
    *, min_pixels: int = 56 * 56, max_pixels: int = 224 * 224, model_type: str = "qwen2_vl"
) -> dict[str, Any]:
    """Qwen2-VL image processor settings (patch 14, merge 2, temporal 2) for tiny images.

    Qwen2.5-VL uses the same image processor; only the processor class differs.
    """
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": (
            "Qwen2_5_VLProcessor" if model_type == "qwen2_5_vl" else "Qwen2VLProcessor"
        ),
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,  # BICUBIC, as Qwen2-VL's processor
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }


def write_assets(
    out_dir: str | pathlib.Path,
    *,
    texts: Iterable[str] = (),
    vocab_size: int = 1024,
    min_pixels: int = 56 * 56,
    max_pixels: int = 224 * 224,
    **config_kwargs: Any,
) -> dict[str, Any]:
    """Writes tokenizer files, preprocessor_config.json and config.json into `out_dir`.

    `config_kwargs` go to `tiny_hf_config`. Returns the config dict written.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.save_pretrained(out_dir)
    config = tiny_hf_config(tokenizer, **config_kwargs)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    processor = preprocessor_config(
        min_pixels=min_pixels, max_pixels=max_pixels, model_type=config["model_type"]
    )
    (out_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return config


def write_generator_assets(
    out_dir: str | pathlib.Path,
    texts: Iterable[str],
    *,
    vocab_size: int,
    hidden_size: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vision_width: int,
    vision_layers: int,
) -> dict[str, Any]:
    """`write_assets` for the demo's generator shape: MLP twice the width, the vision tower
    with the text's head count, tied embeddings (the committed asset and `demo.generator=train`
    are built alike)."""
    return write_assets(
        out_dir,
        texts=texts,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        vision_width=vision_width,
        vision_heads=heads,
        vision_layers=vision_layers,
        tie_word_embeddings=True,
    )
