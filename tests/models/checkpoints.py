"""Test helper: tiny Hugging Face Qwen2-VL / Qwen2.5-VL checkpoints made on the fly.

Nothing is downloaded: a `Qwen2VLConfig` (or `Qwen2_5_VLConfig`) is built from plain numbers,
the PyTorch model is initialised with normal(0, 0.05) weights (large enough that a wrong op
shows in a parity test, unlike the default 0.02 init with zeroed biases) and written with
`save_pretrained`.

Width presets, Qwen2-VL (model_type 'qwen2_vl'):
  'tiny': text hidden 64, 4 heads / 2 KV heads, MLP 128, vocab 512; vision width 32, 4 heads.
  '2b':   Qwen2-VL-2B widths (hidden 1536, 12 heads / 2 KV heads, MLP 8960, vision width 1280
          with 16 heads, merger to 1536), 2 layers each, reduced vocab unless `vocab_size` given.
Qwen2.5-VL (model_type 'qwen2_5_vl'), the last vision block full attention, the others windowed:
  'tiny': the tiny text; vision width 32, 4 heads, SwiGLU width 48, windows of 56 pixels
          (2x2 merged units, so tiny images hold several windows).
  '3b':   Qwen2.5-VL-3B widths (hidden 2048, 16 heads / 2 KV heads, MLP 11008, tied embeddings;
          vision width 1280, 16 heads, SwiGLU 3420, merger to 2048, windows of 112 pixels),
          2 layers each, reduced vocab unless `vocab_size` given.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch
import transformers

# Special token ids of the tiny config sit at the top of the vocabulary, like Qwen's do.
TINY_VOCAB = 512


QWEN2_5_VL = "qwen2_5_vl"


def _qwen2_5_presets(widths: str, vocab_size: int | None) -> tuple[int, dict, dict]:
    """(vocab, text kwargs, vision kwargs) of a Qwen2.5-VL width preset."""
    if widths == "tiny":
        text = dict(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        )
        vision = dict(
            hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4, window_size=56
        )
        return vocab_size or TINY_VOCAB, text, vision
    if widths == "3b":
        text = dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_attention_heads=16,
            num_key_value_heads=2,
            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        )
        vision = dict(
            hidden_size=1280,
            out_hidden_size=2048,
            intermediate_size=3420,
            num_heads=16,
            window_size=112,
        )
        return vocab_size or 4096, text, vision
    raise ValueError(f"Qwen2.5-VL widths must be 'tiny' or '3b', got {widths!r}")


def hf_config_dict(
    widths: str = "tiny",
    *,
    tie_word_embeddings: bool | None = None,
    vocab_size: int | None = None,
    num_layers: int = 2,
    model_type: str = "qwen2_vl",
) -> dict[str, Any]:
    """Keyword arguments of a `transformers.Qwen2VLConfig` (or `Qwen2_5_VLConfig`) preset.

    `tie_word_embeddings` None: as the preset's model (tied only for '3b', as Qwen2.5-VL-3B).
    """
    if tie_word_embeddings is None:
        tie_word_embeddings = widths == "3b"
    if model_type == QWEN2_5_VL:
        vocab, text, vision = _qwen2_5_presets(widths, vocab_size)
        vision.update(fullatt_block_indexes=[num_layers - 1], tokens_per_second=2)
    elif widths == "tiny":
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
    vision.update(
        depth=num_layers,
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        in_channels=3,
        hidden_act="silu" if model_type == QWEN2_5_VL else "quick_gelu",
    )
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
    tie_word_embeddings: bool | None = None,
    seed: int = 0,
    vocab_size: int | None = None,
    num_layers: int = 2,
    std: float = 0.05,
    model_type: str = "qwen2_vl",
) -> transformers.PreTrainedModel:
    """A float32 eval-mode PyTorch Qwen2-VL (or Qwen2.5-VL) with normal(0, std) weights (norm
    scales 1 + noise)."""
    config_class, model_class = (
        (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration)
        if model_type == QWEN2_5_VL
        else (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration)
    )
    config = config_class(
        **hf_config_dict(
            widths,
            tie_word_embeddings=tie_word_embeddings,
            vocab_size=vocab_size,
            num_layers=num_layers,
            model_type=model_type,
        )
    )
    # sdpa and eager agree; eager keeps the reference free of kernel choices.
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    randomize(model, seed, std)
    return model


def make_hf_checkpoint(
    out_dir: str | pathlib.Path,
    *,
    widths: str = "tiny",
    tie_word_embeddings: bool | None = None,
    seed: int = 0,
    vocab_size: int | None = None,
    num_layers: int = 2,
    max_shard_size: str | None = None,
    model_type: str = "qwen2_vl",
) -> tuple[transformers.PreTrainedModel, pathlib.Path]:
    """Writes a random Qwen2(.5)-VL checkpoint with `save_pretrained`; returns (torch model, dir).

    `max_shard_size` (e.g. "200KB") makes transformers write sharded model-*.safetensors files
    with a model.safetensors.index.json, as large released checkpoints are.
    """
    out_dir = pathlib.Path(out_dir)
    model = make_hf_model(
        widths=widths,
        tie_word_embeddings=tie_word_embeddings,
        seed=seed,
        vocab_size=vocab_size,
        num_layers=num_layers,
        model_type=model_type,
    )
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kwargs)
    return model, out_dir
