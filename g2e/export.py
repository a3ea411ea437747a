"""The `export` stage: the adapter-merged Hugging Face directory and the adapter in PEFT format.

`export_model` writes `<out>/hf` (sharded safetensors + index, config.json, generation config,
the base checkpoint's tokenizer and preprocessor files, a model card) and, when the model
carries adapters, `<out>/peft` (g2e.models.peft: loadable by PEFT on top of the base model).
Each directory is written under a temporary name and renamed into place (g2e.atomic), so a
partial export never looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import ml_dtypes
import numpy as np

from g2e import atomic, distributed
from g2e.models import hf_io, lora, peft
from g2e.models.qwen2_vl import Qwen2VL
from g2e.pipeline import Pipeline


def run(pipeline: Pipeline) -> dict[str, str]:
    """Writes <workdir>/export/hf (adapters merged) and <workdir>/export/peft."""
    config = pipeline.config
    trained = pipeline.has_trained_model()
    model = pipeline.model(trained=trained)
    model_dir, adapter_dir = pipeline.model_paths(trained=trained)
    adapter = peft.read_peft_config(adapter_dir) if adapter_dir else None
    results_file = pipeline.workdir / ("eval" if trained else "eval_zero_shot") / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else None
    written = {}
    if distributed.is_primary():
        written = export_model(
            model, base_dir=model_dir, out_dir=pipeline.workdir / "export", adapter=adapter,
            dtype=config.export.dtype, max_shard_bytes=config.export.max_shard_mb << 20,
            results=results)
        logging.info("export: Hugging Face model in %s%s", written["hf"],
                     f", PEFT adapter in {written['peft']}" if written["peft"] else "")
    pipeline.forget_model()  # The model was merged in place.
    return written


def model_card(results: dict[str, Any] | None, *, base_model: str) -> str:
    """A short README.md for the export: what it is, how to embed with it, its MMEB scores."""
    lines = [
        "---", "library_name: transformers", "pipeline_tag: feature-extraction", "---", "",
        "# g2e embedder (Qwen2-VL)", "",
        f"Qwen2-VL fine-tuned as a universal multimodal embedding model with g2e (base: "
        f"`{base_model}`). Embedding = the last-layer hidden state of the last prompt token "
        "(the newline after `assistant`), L2-normalised, with the hierarchical prompt:", "",
        "```", "<|im_start|>system", "Given an image, summarize the provided image in one word. "
        "Given only text, describe the text in one word.<|im_end|>", "<|im_start|>user",
        "{instruction}[\\nRepresent the given text/image in one word.]<|im_end|>",
        "<|im_start|>assistant", "```", "",
    ]
    if results:
        lines += ["## MMEB", "", "| Classification | VQA | Retrieval | Grounding | IND | OOD | "
                  "Overall |", "|---|---|---|---|---|---|---|"]
        meta = results.get("meta_tasks", {})

        def cell(value):
            value = value.get("precision_at_1") if isinstance(value, dict) else value
            return "-" if value is None else f"{value:.1f}"

        row = [cell(meta.get(name)) for name in ("Classification", "VQA", "Retrieval",
                                                 "Grounding")]
        row += [cell(results.get(key)) for key in ("IND", "OOD", "overall")]
        lines += ["| " + " | ".join(row) + " |", ""]
    return "\n".join(lines) + "\n"


def export_model(model: Qwen2VL, *, base_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 adapter: lora.AdapterConfig | None, dtype: str = "bfloat16",
                 max_shard_bytes: int = 2 << 30, results: dict[str, Any] | None = None
                 ) -> dict[str, str]:
    """Writes <out_dir>/peft (if the model has adapters) then <out_dir>/hf (adapters merged).

    Merging happens in place: afterwards `model` is the plain, merged model.

    Returns:
      {'hf': path, 'peft': path or ''}.
    """
    out_dir = pathlib.Path(out_dir)
    base_dir = pathlib.Path(base_dir)
    written = {"hf": str(out_dir / "hf"), "peft": ""}
    if adapter is not None and peft.adapter_arrays(model):
        atomic.replace_directory(out_dir / "peft", lambda tmp: peft.save_peft_adapter(
            model, adapter, tmp, base_model=str(base_dir)))
        written["peft"] = str(out_dir / "peft")
        merged = lora.merge_adapters(model)
        logging.info("export: merged %d adapted projections into the base weights", merged)
    disk_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32,
                  "float16": np.float16}[dtype]

    def write(tmp: pathlib.Path):
        hf_io.save_hf(model, tmp, max_shard_bytes=max_shard_bytes, dtype=disk_dtype)
        hf_io.copy_assets(base_dir, tmp)
        if not (tmp / "generation_config.json").is_file():
            generation = {"bos_token_id": model.config.bos_token_id,
                          "eos_token_id": model.config.eos_token_id}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(results, base_model=str(base_dir)))

    atomic.replace_directory(out_dir / "hf", write)
    return written
