"""Writing a fine-tuned model: the one save that the train stages and the export share.

A model is written either as its adapter alone, in PEFT format (g2e.models.peft: loadable by
PEFT on top of the base checkpoint), or as a whole Hugging Face checkpoint (g2e.models.hf_io:
sharded safetensors + index, config.json, the base's tokenizer and preprocessor files, a
generation config), adapters merged in float32. Each directory is written under a temporary
name and renamed into place by process 0 (`distributed.write_on_primary`), so a partial save
never looks complete; every process calls the save, since the weights may span hosts and all
of them take part in the merges and gathers.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from g2e import distributed
from g2e.models import hf_io, lora, peft
from g2e.models.qwen2_vl import Qwen2VL


def save_model(
    model: Qwen2VL,
    out_dir: str | os.PathLike,
    *,
    base_dir: str | os.PathLike,
    adapter: lora.AdapterConfig | None = None,
    copy_base: bool = False,
    dtype: Any = None,
    max_shard_bytes: int = 2 << 30,
    model_card: str | None = None,
) -> pathlib.Path:
    """Writes `model` to `out_dir` (collective: every process calls it; process 0 writes).

    Args:
      model: the fine-tuned model, with its adapters (if any).
      out_dir: the directory to write (replaced when it exists).
      base_dir: the checkpoint the model was loaded from (the PEFT base model; the source of
        the tokenizer and preprocessor files).
      adapter: given, `out_dir` holds the adapter alone, in PEFT format; None, a whole Hugging
        Face checkpoint with any adapters merged.
      copy_base: Hugging Face checkpoint only: every tensor is base_dir's as stored and the
        adapted kernels are merged from base_dir's values (an export); False writes the
        model's own parameters (after full fine-tuning).
      dtype: floating tensors' dtype on disk (None: each tensor's own).
      max_shard_bytes: size cap of one safetensors file.
      model_card: the README.md of a Hugging Face checkpoint (None: no README).

    Returns:
      out_dir.
    """
    out_dir, base_model = pathlib.Path(out_dir), os.fspath(base_dir)
    if adapter is not None:
        distributed.write_on_primary(
            out_dir, lambda tmp: peft.save_peft_adapter(model, adapter, tmp, base_model=base_model)
        )
        return out_dir
    base_dir = pathlib.Path(base_dir)

    def write(tmp: pathlib.Path | None) -> None:
        hf_io.save_hf(
            model,
            tmp,
            source_dir=base_dir if copy_base else None,
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
        )
        if tmp is None:
            return
        hf_io.copy_assets(base_dir, tmp)
        if not (tmp / "generation_config.json").is_file():
            generation = {
                "bos_token_id": model.config.bos_token_id,
                "eos_token_id": model.config.eos_token_id,
            }
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if model_card is not None:
            (tmp / "README.md").write_text(model_card)

    distributed.write_on_primary(out_dir, write)
    return out_dir
