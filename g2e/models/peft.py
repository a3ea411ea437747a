"""PEFT LoRA/DoRA adapters in and out: the directory format PEFT reads and writes.

`save_peft_adapter` writes a model's adapters as `adapter_config.json` +
`adapter_model.safetensors`, loadable by PEFT on top of the base model (Qwen2-VL or Qwen2.5-VL:
the adapter's `auto_mapping` names the base model's class); `read_peft_config` and
`load_peft_adapter` read such an adapter back (ours, or one trained with the original PyTorch
release) so it can be evaluated, mined and merged here. PEFT stores `lora_A` [R, in] and
`lora_B` [out, R] per layer; we hold them stacked over layers as [N, in, R] and [N, R, out].

Saving is collective like `hf_io.save_hf`: the adapters may be sharded across hosts, so every
process calls it, all take part in the gather, and only process 0 (given a directory) writes.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from g2e.models import hf_io, lora
from g2e.models.config import QWEN2_5_VL
from g2e.models.qwen2_vl import Qwen2VL

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_BLOCK_OF = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
# transformers 5 writes Qwen2-VL's decoder as model.language_model.layers; releases trained on
# transformers 4 (the paper's) wrote model.layers. Both read; we write the former.
_PEFT_NAME = re.compile(
    r"^base_model\.model\.(?:model\.)?(?:language_model\.)?layers\.(\d+)\."
    r"(self_attn|mlp)\.(\w+)\.(lora_A|lora_B|lora_magnitude_vector)"
    r"(?:\.default)?(?:\.weight)?$"
)
_VISION_MLP = {"gate_proj", "up_proj", "down_proj"}
_VISION_MODULES = r".*\bvisual\..*"  # exclude_modules: PEFT full-matches it to module names
_OUR_KEY = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_magnitude_vector": "magnitude"}


def adapter_arrays(model: Qwen2VL) -> dict[str, dict[str, np.ndarray]]:
    """{projection name: {'lora_a' [layers, in, r], 'lora_b' [layers, r, out], 'magnitude'}},
    float32, on every process (a collective when the adapters span several processes)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        *_, projection, key = (str(part) for part in path)
        out.setdefault(projection, {})[key] = hf_io.to_host(variable.value).astype(np.float32)
    return out


def has_adapters(model: Qwen2VL) -> bool:
    """Whether the model carries LoRA/DoRA adapters (no data is read)."""
    return bool(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))


def save_peft_adapter(
    model: Qwen2VL,
    adapter: lora.AdapterConfig,
    out_dir: str | os.PathLike | None,
    *,
    base_model: str = "",
) -> None:
    """Writes the model's adapters into `out_dir` as a PEFT LoRA/DoRA adapter.

    Writes adapter_config.json and adapter_model.safetensors (callers that need the folder to
    appear whole wrap this in `g2e.atomic.replace_directory`). Collective: with several
    processes every process calls it, and the processes other than 0 pass out_dir=None (they
    take part in the gather and write nothing).

    Raises:
      ValueError: the model carries no adapters.
    """
    if not has_adapters(model):
        raise ValueError("export: the model has no adapters to write in PEFT format")
    arrays = adapter_arrays(model)
    if out_dir is None:
        return
    tensors = {}
    prefix = "base_model.model.model.language_model.layers"
    for projection, state in sorted(arrays.items()):
        block = _BLOCK_OF[projection]
        for layer in range(state["lora_a"].shape[0]):
            name = f"{prefix}.{layer}.{block}.{projection}"
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(state["lora_a"][layer].T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(state["lora_b"][layer].T)
            if "magnitude" in state:
                tensors[f"{name}.lora_magnitude_vector"] = state["magnitude"][layer]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model or None,
        "r": adapter.r,
        "lora_alpha": adapter.alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": sorted(arrays),
        "use_dora": adapter.kind == "dora",
        "init_lora_weights": adapter.init,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "modules_to_save": None,
        "inference_mode": True,
        "auto_mapping": base_model_class(model),
    }
    # PEFT matches target_modules by name suffix, and Qwen2.5-VL's vision blocks have MLP
    # projections named like the decoder's; g2e adapts only the decoder, so PEFT must not add
    # (freshly initialised) adapters there.
    if model.config.model_type == QWEN2_5_VL and set(arrays) & _VISION_MLP:
        config["exclude_modules"] = _VISION_MODULES

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / PEFT_WEIGHTS), metadata={"format": "pt"})
    (out_dir / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def base_model_class(model: Qwen2VL) -> dict[str, str]:
    """PEFT's auto_mapping of the base model: its transformers class, by its model type
    (Qwen2VLForConditionalGeneration or Qwen2_5_VLForConditionalGeneration)."""
    model_type = model.config.model_type
    return {
        "base_model_class": model.config.to_hf()["architectures"][0],
        "parent_library": f"transformers.models.{model_type}.modeling_{model_type}",
    }


def read_peft_config(adapter_dir: str | os.PathLike) -> lora.AdapterConfig:
    """The AdapterConfig of a PEFT adapter directory.

    Raises:
      FileNotFoundError: adapter_config.json or adapter_model.safetensors is missing.
      ValueError: not a LoRA/DoRA adapter of the language model's projections (names the key).
    """
    directory = pathlib.Path(adapter_dir)
    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory / name} is missing; --config.adapter_dir must be "
                "a PEFT adapter directory (adapter_config.json + "
                "adapter_model.safetensors)"
            )
    config = json.loads((directory / PEFT_CONFIG).read_text())
    where = directory / PEFT_CONFIG
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{where}: peft_type is {config.get('peft_type')!r}; only LORA "
            "(with or without DoRA) adapters are supported"
        )
    if config.get("use_rslora"):
        raise ValueError(f"{where}: use_rslora=true is not supported (scaling alpha/sqrt(r))")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    unknown = [t for t in targets or () if t not in lora.KNOWN_TARGETS]
    if not targets or unknown:
        raise ValueError(
            f"{where}: target_modules {targets} must be projections of the language "
            f"model, from {lora.KNOWN_TARGETS}"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{where}: {key} is not supported; use one rank and alpha")
    return lora.AdapterConfig(
        kind="dora" if config.get("use_dora") else "lora",
        r=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout", 0.0)),
        targets=tuple(sorted(targets)),
    )


def load_peft_adapter(model: Qwen2VL, adapter_dir: str | os.PathLike) -> None:
    """Sets the model's adapter parameters from a PEFT adapter directory (in place).

    The model must have been built with `read_peft_config(adapter_dir)`.

    Raises:
      KeyError: a tensor the model needs is not in the file (names it).
      ValueError: a tensor has the wrong shape, or the file has tensors the model cannot take.
    """
    path = pathlib.Path(adapter_dir) / PEFT_WEIGHTS
    tensors = load_file(str(path))
    found: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, array in tensors.items():
        match = _PEFT_NAME.match(name)
        if match is None:
            raise ValueError(
                f"{path}: tensor {name!r} is not a LoRA/DoRA weight of a language-"
                "model projection; g2e cannot apply it"
            )
        layer, _, projection, kind = match.groups()
        value = array.T if kind in ("lora_A", "lora_B") else array.reshape(-1)
        found.setdefault((projection, _OUR_KEY[kind]), {})[int(layer)] = value
    for path_parts, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        *_, projection, key = (str(part) for part in path_parts)
        layers = found.pop((projection, key), None)
        expected = variable.value.shape
        if layers is None or sorted(layers) != list(range(expected[0])):
            raise KeyError(
                f"{path}: missing {projection}.{key} for some of the {expected[0]} "
                "layers; the adapter does not match this model"
            )
        stacked = np.stack([layers[i] for i in range(expected[0])])
        if stacked.shape != expected:
            raise ValueError(
                f"{path}: {projection}.{key} has shape {stacked.shape[1:]} per layer,"
                f" the model needs {expected[1:]}"
            )
        variable.value = jax.device_put(
            stacked.astype(variable.value.dtype), variable.value.sharding
        )
    if found:
        raise ValueError(f"{path}: tensors for {sorted(found)} have no place in the model")
