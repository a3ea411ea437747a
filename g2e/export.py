"""The `export` stage: the adapter-merged Hugging Face directory and the adapter in PEFT format.

`export_model` writes `<out>/hf` (sharded safetensors + index, config.json, generation config,
the base checkpoint's tokenizer and preprocessor files, a model card) and, when the model
carries adapters, `<out>/peft` (g2e.models.peft: loadable by PEFT on top of the base model).
Both are written by `g2e.saving.save_model`, the save the train stages use too: each directory
under a temporary name, renamed into place, so a partial export never looks complete. The
card (g2e.model_card) gives the prompts, the recipe, the training data and the run's latest
evaluation table. `export.push_to_hub=ORG/NAME` then uploads `<out>/hf` to that Hub
repository (g2e.hub.push_folder), from process 0.

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

import logging
import os
import pathlib

from g2e import distributed, hub, layout, model_card, saving
from g2e.models import hf_io, lora, peft
from g2e.models.qwen2_vl import Qwen2VL
from g2e.pipeline import Pipeline

# export.dtype: 'source' keeps every tensor's dtype as the base checkpoint stores it.
DTYPES = ("source", *hf_io.DISK_DTYPES)


def run(pipeline: Pipeline) -> dict[str, str]:
    """Writes <workdir>/export/hf (adapters merged, with its model card) and
    <workdir>/export/peft; uploads export/hf to export.push_to_hub when it names a Hub id."""
    config = pipeline.config
    trained = pipeline.has_trained_model()
    model = pipeline.model(trained=trained)
    model_dir, adapter_dir = pipeline.model_paths(trained=trained)
    adapter = peft.read_peft_config(adapter_dir) if adapter_dir else None
    card = model_card.model_card(
        base_model=config.model_dir,  # as the user named it: a Hub id stays one
        model_type=model.config.model_type,
        config=config,
        trained=trained,
        evaluation=model_card.latest_evaluation(pipeline.workdir),
    )
    written = export_model(
        model,
        base_dir=model_dir,
        out_dir=pipeline.stage_dir(layout.EXPORT),
        adapter=adapter,
        dtype=config.export.dtype,
        max_shard_bytes=config.export.max_shard_mb << 20,
        card=card,
    )
    logging.info(
        "export: Hugging Face model in %s%s",
        written["hf"],
        f", PEFT adapter in {written['peft']}" if written["peft"] else "",
    )
    if config.export.push_to_hub and distributed.is_primary():
        url = hub.push_folder(
            written["hf"], config.export.push_to_hub, message="g2e export (model and card)"
        )
        logging.info("export: uploaded %s to %s", written["hf"], url)
        written["pushed"] = url
    return written


def export_model(
    model: Qwen2VL,
    *,
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    adapter: lora.AdapterConfig | None,
    dtype: str = "source",
    max_shard_bytes: int = 2 << 30,
    card: str | None = None,
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
      card: the README.md to write (g2e.model_card); None: the card of the base alone.

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
        model_card=card
        if card is not None
        else model_card.model_card(base_model=str(base_dir), model_type=model.config.model_type),
    )
    return written
