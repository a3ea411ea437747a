"""Test helper: tiny Hugging Face Qwen2-VL checkpoints made on the fly with transformers.

Nothing is downloaded: a `Qwen2VLConfig` is built from plain numbers, the PyTorch model is
initialised with normal(0, 0.05) weights (large enough that a wrong op shows in a parity test,
unlike the default 0.02 init with zeroed biases) and written with `save_pretrained`.

Two width presets:
  'tiny': text hidden 64, 4 heads / 2 KV heads, MLP 128, vocab 512; vision width 32, 4 heads.
  '2b':   Qwen2-VL-2B widths (hidden 1536, 12 heads / 2 KV heads, MLP 8960, vision width 1280
          with 16 heads, merger to 1536), 2 layers each, reduced vocab unless `vocab_size` given.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch
import transformers

# Special token ids of the tiny config sit at the top of the vocabulary, like Qwen's do.
TINY_VOCAB = 512


def hf_config_dict(
    widths: str = "tiny",
    *,
    tie_word_embeddings: bool = False,
    vocab_size: int | None = None,
    num_layers: int = 2,
) -> dict[str, Any]:
    """Returns the keyword arguments of a `transformers.Qwen2VLConfig` for a width preset."""
    if widths == "tiny":
        vocab = vocab_size or TINY_VOCAB
        text = dict(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        )
        vision = dict(embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2)
    elif widths == "2b":
        vocab = vocab_size or 4096
        text = dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_attention_heads=12,
            num_key_value_heads=2,
            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        )
        vision = dict(embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4)
    else:
        raise ValueError(f"widths must be 'tiny' or '2b', got {widths!r}")
    # Qwen's special ids are the last ones of its vocabulary; keep that shape in small vocabs.
    image_token_id = vocab - 4
    text.update(
        vocab_size=vocab,
        num_hidden_layers=num_layers,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=4096,
        hidden_act="silu",
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=vocab - 8,
        eos_token_id=vocab - 7,
        pad_token_id=vocab - 8,
    )
    vision.update(depth=num_layers, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                  in_channels=3, hidden_act="quick_gelu")
    return dict(
        text_config=text,
        vision_config=vision,
        image_token_id=image_token_id,
        video_token_id=vocab - 3,
        vision_start_token_id=vocab - 6,
        vision_end_token_id=vocab - 5,
        tie_word_embeddings=tie_word_embeddings,
    )


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """normal(0, std) weights; norm scales 1 + noise, so activations keep a sane size."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator) * std
        param.copy_(1.0 + noise if "norm" in name or "ln_q" in name else noise)
    if model.config.tie_word_embeddings:
        model.tie_weights()


def make_hf_model(
    *,
    widths: str = "tiny",
    tie_word_embeddings: bool = False,
    seed: int = 0,
    vocab_size: int | None = None,
    num_layers: int = 2,
    std: float = 0.05,
) -> transformers.Qwen2VLForConditionalGeneration:
    """A float32 eval-mode PyTorch Qwen2-VL with normal(0, std) weights (norm scales 1 + noise)."""
    config = transformers.Qwen2VLConfig(
        **hf_config_dict(widths, tie_word_embeddings=tie_word_embeddings, vocab_size=vocab_size,
                         num_layers=num_layers))
    # sdpa and eager agree; eager keeps the reference free of kernel choices.
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Qwen2VLForConditionalGeneration(config).float().eval()
    randomize(model, seed, std)
    return model


def make_hf_checkpoint(
    out_dir: str | pathlib.Path,
    *,
    widths: str = "tiny",
    tie_word_embeddings: bool = False,
    seed: int = 0,
    vocab_size: int | None = None,
    num_layers: int = 2,
    max_shard_size: str | None = None,
) -> tuple[transformers.Qwen2VLForConditionalGeneration, pathlib.Path]:
    """Writes a random Qwen2-VL checkpoint with `save_pretrained` and returns (torch model, dir).

    `max_shard_size` (e.g. "200KB") makes transformers write sharded model-*.safetensors files
    with a model.safetensors.index.json, as large released checkpoints are.
    """
    out_dir = pathlib.Path(out_dir)
    model = make_hf_model(widths=widths, tie_word_embeddings=tie_word_embeddings, seed=seed,
                          vocab_size=vocab_size, num_layers=num_layers)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kwargs)
    return model, out_dir
