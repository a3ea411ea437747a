"""The `train` stage: contrastive LoRA/DoRA fine-tuning on the mined clusters (SPEC §3).

Reads every training subset's rows and, when `train.use_clusters`, the mine stage's clusters
(`<workdir>/mine/<subset>.clusters.json`); rows that no cluster covers join as single rows, so
no training pair is lost. Trains with `g2e.training.model_training.train_model` (checkpoints
and metrics under `<workdir>/train/`, resumed automatically), then writes the result for the
later stages: the adapter in PEFT format at `<workdir>/train/adapter`, or, for full
fine-tuning, a Hugging Face checkpoint at `<workdir>/train/hf`.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np

from g2e import distributed, export, mining
from g2e.data import mmeb
from g2e.data import rows as rows_lib
from g2e.data.errors import BadInputReport
from g2e.models import hf_io, lora
from g2e.training import model_training


class Preempted(SystemExit):
    """Training stopped on SIGTERM / a preemption notice after saving a checkpoint."""


def adapter_config(config) -> lora.AdapterConfig | None:
    adapter = config.train.adapter
    if adapter.kind == "none":
        return None
    return lora.AdapterConfig(kind=adapter.kind, r=adapter.r, alpha=adapter.alpha,
                              dropout=adapter.dropout, targets=tuple(adapter.targets))


def training_rows(pipeline) -> tuple[Sequence[mmeb.TrainRow], list[list[int]]]:
    """All training rows (subsets concatenated, read lazily from a TFDS copy) and the clusters
    over them."""
    from g2e.stages import train_subsets

    config = pipeline.config
    parts: list[Sequence[mmeb.TrainRow]] = []
    offset = 0
    clusters: list[list[int]] = []
    bad = BadInputReport(config.data.on_bad_input)
    for subset in train_subsets(config):
        subset_rows = rows_lib.train_rows(config.data, subset, bad)
        path = pipeline.workdir / "mine" / f"{subset}.clusters.json"
        covered = np.zeros(len(subset_rows), bool)
        if config.train.use_clusters and path.is_file():
            mined = mining.read_clusters(str(path), subset=subset, num_rows=len(subset_rows))
            for cluster in mined.clusters:
                clusters.append([offset + i for i in cluster])
                covered[cluster] = True
        elif config.train.use_clusters:
            logging.warning("train: %s has no clusters (%s); its rows train as single rows",
                            subset, path)
        clusters += [[offset + int(i)] for i in np.flatnonzero(~covered)]
        parts.append(subset_rows)
        offset += len(subset_rows)
    if bad.total:
        logging.warning("train: %s", bad.summary())
    return rows_lib.ConcatRows(parts), clusters


def train(pipeline) -> dict[str, Any]:
    """Runs the stage; returns the summary for DONE.json. Raises Preempted when stopped early."""
    config = pipeline.config
    adapter = adapter_config(config)
    model = pipeline.model(trained=False, adapter=adapter)
    rows, clusters = training_rows(pipeline)
    logging.info("train: %d rows in %d clusters (%d of several rows)", len(rows), len(clusters),
                 sum(len(c) > 1 for c in clusters))
    processor = pipeline.processor(train=True)
    out = pipeline.workdir / "train"
    result = model_training.train_model(config, model, rows, clusters, processor,
                                        pipeline.mesh, str(out))
    if result.stopped_early:
        raise Preempted(f"train: stopped at step {result.step} after saving a checkpoint; "
                        "rerun the same command to resume")
    if distributed.is_primary():
        if adapter is not None:
            export.save_peft_adapter(model, adapter, out / "adapter",
                                     base_model=config.model_dir)
        else:
            hf_io.save_hf(model, out / "hf")
            for name in export.ASSET_FILES:
                source = pathlib.Path(config.model_dir) / name
                if source.is_file():
                    shutil.copy2(source, out / "hf" / name)
    pipeline.forget_model()  # Later stages load the trained model from what was written.
    return {"steps": result.step, "final_loss": result.last_metrics.get("loss"),
            "rows": len(rows), "clusters": len(clusters)}
