"""The `export` stage: the adapter-merged Hugging Face directory and the adapter in PEFT format.

`export_model` writes `<out>/hf` (sharded safetensors + index, config.json, generation config,
the base checkpoint's tokenizer and preprocessor files, a model card) and, when the model
carries adapters, `<out>/peft` (g2e.models.peft: loadable by PEFT on top of the base model).
Both are written by `g2e.saving.save_model`, the save the train stages use too: each directory
under a temporary name, renamed into place, so a partial export never looks complete.

What the export holds: the base checkpoint as stored on disk, every tensor copied bit for bit,
except the adapted kernels, which are merged in float32 from the base's stored values (not
from the model's copy in `param_dtype`); its config.json is the base's, with only the dtype
changed when `export.dtype` names another one. `export.dtype=source` (the default) keeps each
tensor's dtype, so an export without an adapter equals its source. Qwen2-VL and Qwen2.5-VL
export alike: config.json, the PEFT `auto_mapping` and the model card follow the base's model
type.

Several processes: every process runs the stage; all take part in the merges and gathers of
arrays that span hosts, and process 0 writes (`distributed.write_on_primary`).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

from g2e import layout, saving
from g2e.models import hf_io, lora, peft
from g2e.models.config import QWEN2_5_VL
from g2e.models.qwen2_vl import Qwen2VL
from g2e.pipeline import Pipeline

# export.dtype: 'source' keeps every tensor's dtype as the base checkpoint stores it.
DTYPES = ("source", *hf_io.DISK_DTYPES)


def run(pipeline: Pipeline) -> dict[str, str]:
    """Writes <workdir>/export/hf (adapters merged) and <workdir>/export/peft."""
    config = pipeline.config
    trained = pipeline.has_trained_model()
    model = pipeline.model(trained=trained)
    model_dir, adapter_dir = pipeline.model_paths(trained=trained)
    adapter = peft.read_peft_config(adapter_dir) if adapter_dir else None
    # The model card's scores: the evaluation of the model exported, when it ran.
    evaluation = layout.EVAL if trained else layout.EVAL_ZERO_SHOT
    results_file = layout.results_file(pipeline.workdir, evaluation)
    results = json.loads(results_file.read_text()) if results_file.is_file() else None
    written = export_model(
        model,
        base_dir=model_dir,
        out_dir=pipeline.stage_dir(layout.EXPORT),
        adapter=adapter,
        dtype=config.export.dtype,
        max_shard_bytes=config.export.max_shard_mb << 20,
        results=results,
    )
    logging.info(
        "export: Hugging Face model in %s%s",
        written["hf"],
        f", PEFT adapter in {written['peft']}" if written["peft"] else "",
    )
    return written


def model_card(
    results: dict[str, Any] | None, *, base_model: str, model_type: str = "qwen2_vl"
) -> str:
    """A short README.md for the export: what it is, how to embed with it, its MMEB scores."""
    family = "Qwen2.5-VL" if model_type == QWEN2_5_VL else "Qwen2-VL"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: feature-extraction",
        "---",
        "",
        f"# g2e embedder ({family})",
        "",
        f"{family} fine-tuned as a universal multimodal embedding model with g2e (base: "
        f"`{base_model}`). Embedding = the last-layer hidden state of the last prompt token "
        "(the newline after `assistant`), L2-normalised, with the hierarchical prompt:",
        "",
        "```",
        "<|im_start|>system",
        "Given an image, summarize the provided image in one word. "
        "Given only text, describe the text in one word.<|im_end|>",
        "<|im_start|>user",
        "{instruction}[\\nRepresent the given text/image in one word.]<|im_end|>",
        "<|im_start|>assistant",
        "```",
        "",
    ]
    if results:
        lines += [
            "## MMEB",
            "",
            "| Classification | VQA | Retrieval | Grounding | IND | OOD | Overall |",
            "|---|---|---|---|---|---|---|",
        ]
        meta = results.get("meta_tasks", {})

        def cell(value):
            value = value.get("precision_at_1") if isinstance(value, dict) else value
            return "-" if value is None else f"{value:.1f}"

        row = [cell(meta.get(name)) for name in ("Classification", "VQA", "Retrieval", "Grounding")]
        row += [cell(results.get(key)) for key in ("IND", "OOD", "overall")]
        lines += ["| " + " | ".join(row) + " |", ""]
    return "\n".join(lines) + "\n"


def export_model(
    model: Qwen2VL,
    *,
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    adapter: lora.AdapterConfig | None,
    dtype: str = "source",
    max_shard_bytes: int = 2 << 30,
    results: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Writes <out_dir>/peft (if the model has adapters) then <out_dir>/hf (adapters merged).

    Every process calls it (see the module docstring); process 0 writes. The model is left as
    it was.

    Args:
      model: the model loaded from `base_dir`, with its adapters (if any).
      base_dir: the checkpoint the model was loaded from; the export starts from its files.
      out_dir: the export's parent folder.
      adapter: the adapters' configuration, for the PEFT copy; None writes no PEFT copy.
      dtype: one of DTYPES: 'source', or the dtype every floating tensor is written in.
      max_shard_bytes: size cap of one safetensors file.
      results: MMEB results for the model card's table.

    Returns:
      {'hf': path, 'peft': path or ''}.
    """
    out_dir = pathlib.Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"export: dtype {dtype!r} is not one of {DTYPES}")
    written = {"hf": str(out_dir / "hf"), "peft": ""}
    if adapter is not None and peft.has_adapters(model):
        saving.save_model(model, out_dir / "peft", base_dir=base_dir, adapter=adapter)
        written["peft"] = str(out_dir / "peft")
    saving.save_model(
        model,
        out_dir / "hf",
        base_dir=base_dir,
        copy_base=True,
        dtype=None if dtype == "source" else hf_io.DISK_DTYPES[dtype],
        max_shard_bytes=max_shard_bytes,
        model_card=model_card(
            results, base_model=str(base_dir), model_type=model.config.model_type
        ),
    )
    return written
