"""Qwen2-VL and Qwen2.5-VL model configuration read from a Hugging Face config.json.

Two config.json layouts exist and both are read:
    * transformers >= 4.5x / 5.x: text fields under "text_config", rope under "rope_parameters";
    * released checkpoints (e.g. Qwen2-VL-2B-Instruct, Qwen2.5-VL-3B-Instruct): text fields at
        the top level, rope under "rope_scaling" / "rope_theta", vision "in_chans".

The two families share the text decoder (Qwen2 with M-RoPE) and differ in the vision tower
only, so one config class serves both; `model_type` ('qwen2_vl' or 'qwen2_5_vl') is read from
config.json and kept on the vision config. The vision config.json keys differ too: Qwen2-VL
names the ViT width `embed_dim` and the merger output `hidden_size`; Qwen2.5-VL names them
`hidden_size` and `out_hidden_size`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

MODEL_TYPE = "qwen2_vl"
QWEN2_5_VL = "qwen2_5_vl"
MODEL_TYPES = (MODEL_TYPE, QWEN2_5_VL)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Qwen2 decoder sizes (letters of the `g2e.models` legend: D, H, K, E, F, V, N)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """ViT sizes; `hidden_size` is the merger's output width (= text hidden size).

    Qwen2.5-VL (`model_type` 'qwen2_5_vl') differs from Qwen2-VL in: RMSNorms instead of
    LayerNorms, a SwiGLU MLP of width `intermediate_size` instead of fc1/fc2 of width
    embed_dim * mlp_ratio, and attention confined to windows of `window_size` pixels square in
    every block except `fullatt_block_indexes`. Those fields are unused by Qwen2-VL.
    """

    depth: int
    embed_dim: int
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0
    model_type: str = MODEL_TYPE
    intermediate_size: int | None = None
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: int = 2  # video temporal ids only; kept so to_hf writes it back
    # How the image processor turns 8-bit pixels into model inputs (preprocessor_config.json's
    # rescale_factor, image_mean, image_std; these defaults are every Qwen2-VL's). The host
    # sends uint8 patches and the tower applies them (`pixel_table`).
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def pixel_table(self) -> np.ndarray:
        """float32 [3, 256]: the model input of 8-bit value v in channel c.

        Computed as the Hugging Face image processor computes it (v in float64 times the
        rescale factor, cast to float32, minus the mean, over the std, in float32), so a
        lookup gives its pixel values bit for bit.
        """
        values = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, np.float32)[:, None]
        std = np.asarray(self.image_std, np.float32)[:, None]
        return ((values[None, :] - mean) / std).astype(np.float32)

    @property
    def is_qwen2_5(self) -> bool:
        return self.model_type == QWEN2_5_VL

    @property
    def mlp_width(self) -> int:
        """F: the block MLP's hidden width."""
        if self.is_qwen2_5:
            return int(self.intermediate_size)
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def window_merged(self) -> int:
        """Side of an attention window in merged units (transformers' vit_merger_window_size)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def full_attention_blocks(self) -> tuple[bool, ...]:
        """Per block: True where it attends over the whole image, False where within windows.

        Indexes past the depth are ignored, as transformers does (a truncated debug model may
        keep the released [7, 15, 23, 31]).
        """
        full = set(self.fullatt_block_indexes) if self.is_qwen2_5 else set(range(self.depth))
        return tuple(i in full for i in range(self.depth))

    @property
    def patch_dim(self) -> int:
        """Flattened patch length as the HF image processor emits it (3*2*14*14 = 1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    """Whole-model config: text decoder, vision tower and the special token ids.

    Serves Qwen2-VL and Qwen2.5-VL alike; `model_type` tells them apart.
    """

    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645

    @property
    def spatial_merge_size(self) -> int:
        return self.vision.spatial_merge_size

    @property
    def model_type(self) -> str:
        """'qwen2_vl' or 'qwen2_5_vl' (the families differ in the vision tower only)."""
        return self.vision.model_type

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, source: str = "config.json") -> Qwen2VLConfig:
        """Builds the config from a parsed HF config.json dict (either layout).

        Raises:
            ValueError: model_type is not qwen2_vl or qwen2_5_vl, or a required key is missing
                or wrong (named).
        """
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type is {model_type!r}, expected {MODEL_TYPE!r} or "
                f"{QWEN2_5_VL!r}; g2e only reads Qwen2-VL and Qwen2.5-VL checkpoints "
                "(Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)."
            )
        # Newer files nest text fields; older ones keep them at the top level.
        text = dict(hf)
        text.update(hf.get("text_config") or {})
        vision = hf.get("vision_config")
        if not vision:
            raise ValueError(f"{source}: no 'vision_config'; is this a Qwen2-VL config.json?")
        text_cfg = _text_from_hf(text, source)
        vision_cfg = _vision_from_hf(vision, model_type, text_cfg.hidden_size, source)
        tie = bool(
            hf.get("tie_word_embeddings", False)
            or (hf.get("text_config") or {}).get("tie_word_embeddings", False)
        )
        eos = text.get("eos_token_id")
        return cls(
            text=text_cfg,
            vision=vision_cfg,
            image_token_id=int(hf.get("image_token_id", 151655)),
            video_token_id=int(hf.get("video_token_id", 151656)),
            vision_start_token_id=int(hf.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(hf.get("vision_end_token_id", 151653)),
            tie_word_embeddings=tie,
            bos_token_id=text.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )

    @classmethod
    def from_dir(cls, path: str | pathlib.Path) -> Qwen2VLConfig:
        """Reads `path`/config.json, and the pixel normalisation of preprocessor_config.json.

        Raises:
            FileNotFoundError: the directory or its config.json does not exist.
            ValueError: see `from_hf`.
        """
        config_path = pathlib.Path(path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{config_path}: no config.json; point model_dir at a Hugging Face Qwen2-VL or "
                "Qwen2.5-VL checkpoint directory (config.json + model*.safetensors)."
            )
        with open(config_path) as f:
            config = cls.from_hf(json.load(f), source=str(config_path))
        preprocessor = pathlib.Path(path) / "preprocessor_config.json"
        if not preprocessor.is_file():
            return config
        with open(preprocessor) as f:
            pixels = json.load(f)
        vision = dataclasses.replace(
            config.vision,
            rescale_factor=float(pixels.get("rescale_factor", config.vision.rescale_factor)),
            image_mean=tuple(float(v) for v in pixels.get("image_mean", config.vision.image_mean)),
            image_std=tuple(float(v) for v in pixels.get("image_std", config.vision.image_std)),
        )
        return dataclasses.replace(config, vision=vision)

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict in transformers' nested layout (loadable by transformers 5).

        Qwen2.5-VL configs are written for Qwen2_5_VLForConditionalGeneration.
        """
        architecture = (
            "Qwen2_5_VLForConditionalGeneration"
            if self.vision.is_qwen2_5
            else "Qwen2VLForConditionalGeneration"
        )
        return dict(
            architectures=[architecture],
            model_type=self.model_type,
            text_config=_text_to_hf(self),
            vision_config=_vision_to_hf(self.vision),
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id,
            tie_word_embeddings=self.tie_word_embeddings,
        )


def _text_to_hf(config: Qwen2VLConfig) -> dict[str, Any]:
    """config.json's `text_config` (the decoder, its M-RoPE and the text-side token ids)."""
    t = config.text
    rope = {
        "rope_type": "default",
        "type": "mrope",
        "mrope_section": list(t.mrope_section),
        "rope_theta": t.rope_theta,
    }
    return dict(
        model_type=f"{config.model_type}_text",
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        rms_norm_eps=t.rms_norm_eps,
        hidden_act=t.hidden_act,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters=rope,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        use_sliding_window=False,
        attention_dropout=0.0,
    )


def _vision_to_hf(v: VisionConfig) -> dict[str, Any]:
    """config.json's `vision_config`, in the keys of the family (see the module docstring)."""
    if v.is_qwen2_5:
        return dict(
            model_type="qwen2_5_vl_vision",
            depth=v.depth,
            hidden_size=v.embed_dim,
            out_hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_heads=v.num_heads,
            patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size,
            in_channels=v.in_channels,
            hidden_act=v.hidden_act,
            window_size=v.window_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes),
            tokens_per_second=v.tokens_per_second,
            rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
        )
    return dict(
        model_type="qwen2_vl_vision",
        depth=v.depth,
        embed_dim=v.embed_dim,
        hidden_size=v.hidden_size,
        num_heads=v.num_heads,
        mlp_ratio=int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio,
        patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size,
        spatial_merge_size=v.spatial_merge_size,
        in_channels=v.in_channels,
        hidden_act=v.hidden_act,
        rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
    )


def _need(d: dict[str, Any], key: str, where: str, source: str) -> Any:
    """d[key]; raises ValueError naming `source` and the key when it is missing or null."""
    if key not in d or d[key] is None:
        raise ValueError(f"{source}: missing required key {where}{key!r}")
    return d[key]


def _text_from_hf(text: dict[str, Any], source: str) -> TextConfig:
    """The decoder config of config.json's text fields (nested ones merged over top-level)."""

    def need(key: str) -> Any:
        return _need(text, key, "text_config.", source)

    rope = dict(text.get("rope_scaling") or {})
    rope.update(text.get("rope_parameters") or {})
    rope_theta = rope.get("rope_theta", text.get("rope_theta", 1000000.0))
    mrope_section = tuple(rope.get("mrope_section", (16, 24, 24)))
    num_heads = need("num_attention_heads")
    text_cfg = TextConfig(
        vocab_size=need("vocab_size"),
        hidden_size=need("hidden_size"),
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=text.get("num_key_value_heads") or num_heads,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        mrope_section=mrope_section,
        hidden_act=text.get("hidden_act", "silu"),
        max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
    )
    if 2 * sum(mrope_section) != text_cfg.head_dim:
        raise ValueError(
            f"{source}: mrope_section {list(mrope_section)} sums to {sum(mrope_section)}, but "
            f"head_dim/2 is {text_cfg.head_dim // 2}"
        )
    return text_cfg


def _vision_from_hf(
    vision: dict[str, Any], model_type: str, text_hidden_size: int, source: str
) -> VisionConfig:
    """The vision tower config of config.json's `vision_config` (keys differ per family)."""

    def need(key: str) -> Any:
        return _need(vision, key, "vision_config.", source)

    vision_rope = vision.get("rope_parameters") or {}
    common = dict(
        depth=need("depth"),
        num_heads=need("num_heads"),
        patch_size=int(vision.get("patch_size", 14)),
        temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
        spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
        in_channels=int(vision.get("in_channels", vision.get("in_chans", 3))),
        rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
    )
    if model_type != QWEN2_5_VL:
        return VisionConfig(
            **common,
            embed_dim=need("embed_dim"),
            hidden_size=vision.get("hidden_size", text_hidden_size),
            mlp_ratio=float(vision.get("mlp_ratio", 4)),
            hidden_act=vision.get("hidden_act", "quick_gelu"),
        )
    vision_cfg = VisionConfig(
        **common,
        model_type=QWEN2_5_VL,
        embed_dim=need("hidden_size"),
        hidden_size=vision.get("out_hidden_size", text_hidden_size),
        intermediate_size=need("intermediate_size"),
        hidden_act=vision.get("hidden_act", "silu"),
        window_size=int(need("window_size")),
        fullatt_block_indexes=tuple(int(i) for i in vision.get("fullatt_block_indexes") or ()),
        tokens_per_second=int(vision.get("tokens_per_second", 2)),
    )
    if vision_cfg.window_merged < 1:
        raise ValueError(
            f"{source}: vision_config.window_size={vision_cfg.window_size} is smaller "
            f"than one merged unit ({vision_cfg.spatial_merge_size * vision_cfg.patch_size}"
            " pixels); Qwen2.5-VL windows are whole merged units."
        )
    return vision_cfg
