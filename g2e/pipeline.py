"""The stages of the recipe, each a function of the shared `Pipeline` (config, workdir, models).

`g2e.main` runs `run_<stage>(pipeline)` for each configured stage. A stage reads its inputs
from the config and from earlier stages' outputs under the workdir, writes its own outputs
under `<workdir>/<stage>/`, and returns a small JSON-ready summary for its DONE.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
from typing import Any

import ml_collections
import numpy as np

from g2e import configuration, distributed
from g2e.data import prompts
from g2e.data.preprocess import Processor

# Where the train stage leaves the fine-tuned weights for `eval` and `export`.
TRAINED_ADAPTER = "train/adapter"
TRAINED_MODEL = "train/hf"


class Pipeline:
    """What the stages share: the config, the workdir, the mesh and the loaded models."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path):
        self.config = config
        self.workdir = workdir
        self._mesh = None
        self.model_key = None
        self._model = None

    @property
    def mesh(self):
        if self._mesh is None:
            self._mesh = distributed.make_mesh(self.config.mesh)
            logging.info("mesh: %s", dict(self._mesh.shape))
        return self._mesh

    @property
    def rules(self) -> tuple:
        return tuple((name, axes if axes is None or isinstance(axes, str) else tuple(axes))
                     for name, axes in self.config.sharding_rules)

    def trained_paths(self) -> tuple[str, str]:
        """(model_dir, adapter_dir) of the fine-tuned model the train stage wrote."""
        adapter = self.workdir / TRAINED_ADAPTER
        if adapter.is_dir():
            return self.config.model_dir, str(adapter)
        full = self.workdir / TRAINED_MODEL
        if full.is_dir():
            return str(full), ""
        raise FileNotFoundError(f"{adapter} (or {full}) is missing: run the train stage first "
                                "(--config.stages=train)")

    def forget_model(self) -> None:
        """Drops the cached model (its weights changed in place, or memory is needed)."""
        self._model = self.model_key = None

    def model(self, *, trained: bool, adapter=None):
        """The base model (+ config.adapter_dir) or the fine-tuned one; cached between stages.

        `adapter` (an AdapterConfig) adds fresh trainable adapters instead (train stage).
        """
        from g2e import export
        from g2e.models import hf_io

        if trained:
            model_dir, adapter_dir = self.trained_paths()
        else:
            model_dir, adapter_dir = self.config.model_dir, self.config.adapter_dir
        if adapter is not None and adapter_dir:
            raise ValueError("--config.adapter_dir cannot be trained further here; merge it "
                             "first with --config.stages=export and train from export/hf")
        key = (model_dir, adapter_dir, adapter)
        if key == self.model_key:
            return self._model
        self._model = None  # Free the previous model before loading the next.
        model_config = self.config.model
        adapter_config = export.read_peft_config(adapter_dir) if adapter_dir else adapter
        model = hf_io.load_model(
            model_dir, dtype=model_config.dtype, param_dtype=model_config.param_dtype,
            remat=model_config.remat, attention=model_config.attention, adapter=adapter_config,
            mesh=self.mesh, rules=self.rules, seed=self.config.seed)
        if adapter_dir:
            export.load_peft_adapter(model, adapter_dir)
        self._model, self.model_key = model, key
        return model

    def processor(self, *, prompt: prompts.PromptOptions | None = None, train: bool = False,
                  image_root: str | None = None, resolution: str | None = None) -> Processor:
        data = self.config.data
        if prompt is None:
            prompt = prompts.PromptOptions(system=self.config.prompt.system,
                                           suffix=self.config.prompt.suffix)
        return Processor.from_dir(
            self.config.model_dir,
            max_length=data.train_max_length if train else data.max_length,
            image_resolution=resolution or (data.train_image_resolution if train
                                            else data.image_resolution),
            min_pixels=data.min_pixels or None, max_pixels=data.max_pixels or None,
            prompt=prompt, length_buckets=tuple(data.length_buckets),
            patch_buckets=tuple(data.patch_buckets), on_bad_input=data.on_bad_input,
            image_root=image_root)

    def fingerprint(self, *parts: Any) -> str:
        """Names a model + prompt + preprocessing, so caches from another setting are not used."""
        text = json.dumps([str(p) for p in parts] + [self.config.data.image_resolution,
                                                     self.config.data.max_length])
        return hashlib.sha1(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ evaluation


def _evaluate(pipeline: Pipeline, stage: str, *, trained: bool,
              prompt: prompts.PromptOptions | None = None) -> dict[str, Any]:
    from g2e import evaluation
    from g2e.embedding import Embedder

    config = pipeline.config
    model = pipeline.model(trained=trained)
    processor = pipeline.processor(prompt=prompt)
    embedder = Embedder(model, processor, mesh=pipeline.mesh, rules=pipeline.rules,
                        batch_size=config.eval.batch_size, progress=False)
    results = evaluation.evaluate_mmeb(
        embedder, data=config.data,
        out_dir=str(pipeline.workdir / stage), subsets=config.data.eval_subsets,
        on_bad_input=config.data.on_bad_input, batch_size=8 * embedder.batch_size,
        fingerprint=pipeline.fingerprint(pipeline.model_key, processor.prompt),
        model_name=stage, write_outputs=distributed.is_primary())
    logging.info("%s: overall %s (IND %s, OOD %s); padding %s", stage, results["overall"],
                 results["IND"], results["OOD"], processor.padding_report())
    return {"overall": results["overall"]}


def run_eval_plain(pipeline: Pipeline):
    """Zero-shot MMEB with the plain prompt: no system turn, no suffix (the paper's baseline)."""
    return _evaluate(pipeline, "eval_plain", trained=False,
                     prompt=prompts.PromptOptions(system=False, suffix=False))


def run_eval_zero_shot(pipeline: Pipeline):
    """Zero-shot MMEB with the configured (by default hierarchical) prompt."""
    return _evaluate(pipeline, "eval_zero_shot", trained=False)


def run_eval(pipeline: Pipeline):
    """MMEB with the fine-tuned model."""
    return _evaluate(pipeline, "eval", trained=True)


# ------------------------------------------------------------------------------ the rest


def train_subsets(config: ml_collections.ConfigDict) -> list[str]:
    """data.train_subsets, or every subset of the configured source (parquet or tfds)."""
    from g2e.data import rows

    return configuration.split_list(config.data.train_subsets) or rows.list_train_subsets(
        config.data)


def run_mine(pipeline: Pipeline):
    from g2e import mining_stage

    return mining_stage.mine(pipeline)


def run_train(pipeline: Pipeline):
    from g2e import training_stage

    return training_stage.train(pipeline)


def run_export(pipeline: Pipeline):
    """Writes <workdir>/export/hf (adapters merged) and <workdir>/export/peft."""
    from g2e import export

    config = pipeline.config
    trained = (pipeline.workdir / TRAINED_ADAPTER).is_dir() or (
        pipeline.workdir / TRAINED_MODEL).is_dir()
    model = pipeline.model(trained=trained)
    model_dir, adapter_dir = pipeline.trained_paths() if trained else (
        config.model_dir, config.adapter_dir)
    adapter = export.read_peft_config(adapter_dir) if adapter_dir else None
    results_file = pipeline.workdir / ("eval" if trained else "eval_zero_shot") / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else None
    written = {}
    if distributed.is_primary():
        written = export.export_model(
            model, base_dir=model_dir, out_dir=pipeline.workdir / "export", adapter=adapter,
            dtype=config.export.dtype, max_shard_bytes=config.export.max_shard_mb << 20,
            results=results)
        logging.info("export: Hugging Face model in %s%s", written["hf"],
                     f", PEFT adapter in {written['peft']}" if written["peft"] else "")
    pipeline.forget_model()  # The model was merged in place.
    return written


def run_report(pipeline: Pipeline):
    """One table of every evaluation that ran: <workdir>/report.md and report.json."""
    from g2e import report

    return report.write_report(pipeline.workdir)


def run_prepare_demo(pipeline: Pipeline):
    from g2e import demo

    # The primary alone writes (the processes share the workdir, and prepare replaces
    # directories); the others wait, then read its files.
    summary = {}
    if distributed.is_primary():
        summary = demo.prepare(pipeline.config, pipeline.workdir / "prepare_demo")
    distributed.barrier("prepare_demo")
    return summary


def point_at_demo(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Points model_dir and the data keys at what prepare_demo writes (before it runs)."""
    from g2e import demo

    paths = demo.demo_paths(workdir / "prepare_demo")
    config.model_dir = str(paths.model_dir)
    config.data.train_dir = str(paths.train_dir)
    config.data.train_image_root = str(paths.image_root)
    config.data.eval_dir = str(paths.eval_dir)
    config.data.eval_image_root = str(paths.image_root)


def run_embed(pipeline: Pipeline):
    """The embed command: JSONL of {text, image, role} -> float32 [N, D] .npy in input order."""
    from g2e.embedding import Embedder, read_jsonl_items

    config = pipeline.config
    items, _ = read_jsonl_items(config.input, config.data.on_bad_input)
    model = pipeline.model(trained=False)
    # Image paths are taken as given: relative ones from the working directory.
    processor = pipeline.processor(resolution=config.get("image_resolution") or "processor")
    embedder = Embedder(model, processor, mesh=pipeline.mesh, rules=pipeline.rules,
                        batch_size=config.eval.batch_size)
    present = [i for i, item in enumerate(items) if item is not None]
    out = np.full((len(items), model.config.text.hidden_size), np.nan, np.float32)
    if present:
        out[present] = embedder([items[i] for i in present])
    skipped = int(np.isnan(out).any(axis=1).sum())
    if distributed.is_primary():
        pathlib.Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        np.save(config.output, out)
        logging.info("embed: wrote %s %s%s", config.output, out.shape,
                     f"; {skipped} bad line(s) skipped as NaN rows: "
                     f"{processor.report.summary()}" if skipped else "")
    return {"rows": len(items), "skipped": skipped}
