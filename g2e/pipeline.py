"""What the stages share: the config, the workdir, the mesh, the loaded model and processors.

`g2e.main` builds one `Pipeline` and hands it to every stage it runs (`stage(pipeline) ->
summary`). A stage reads its inputs from the config and from earlier stages' outputs under the
workdir, writes its own outputs under `<workdir>/<stage>/`, and returns a small JSON-ready
summary for its DONE.json. This module knows no stage; stages know it. Where a stage writes is
`stage_dir` (g2e.layout), never a folder name spelled by its reader.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
from typing import Any

import jax
import ml_collections

from g2e import distributed, hub, layout
from g2e.data import prompts
from g2e.data import workers as data_workers
from g2e.data.preprocess import Processor
from g2e.models import attention, hf_io, lora, peft, sharding
from g2e.models.qwen2_vl import Qwen2VL


class Pipeline:
    """What the stages share: the config, the workdir, the mesh and the loaded models."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: pathlib.Path,
        mesh: jax.sharding.Mesh | None = None,
    ):
        self.config = config
        self.workdir = workdir
        self._mesh = mesh  # default: made from config.mesh on first use
        self.model_key = None
        self._model = None
        self._local_dirs: dict[tuple[str, str], str] = {}  # (key, value) -> local directory

    @property
    def mesh(self) -> jax.sharding.Mesh:
        if self._mesh is None:
            self._mesh = distributed.make_mesh(self.config.mesh)
            logging.info("mesh: %s", dict(self._mesh.shape))
        return self._mesh

    @property
    def rules(self) -> tuple:
        """The logical-axis rule table (config.sharding_rules) as tuples."""
        return tuple(
            (name, axes if axes is None or isinstance(axes, str) else tuple(axes))
            for name, axes in self.config.sharding_rules
        )

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """The mesh axes the batch is split over (the 'batch' sharding rule)."""
        return sharding.batch_axes(self.rules, self.mesh.axis_names)

    @property
    def workers(self) -> int:
        """Host worker processes (data.workers; -1: one per usable core)."""
        workers = int(self.config.data.workers)
        return data_workers.usable_cores() if workers == -1 else workers

    def stage_dir(self, stage: str) -> pathlib.Path:
        """The folder stage `stage` writes under (<workdir>/<stage>/)."""
        return layout.stage_dir(self.workdir, stage)

    def trained_paths(self, run: str = layout.TRAIN) -> tuple[pathlib.Path, pathlib.Path]:
        """(adapter dir, full fine-tuned dir) the training stage `run` writes one of."""
        folder = self.stage_dir(run)
        return folder / layout.TRAINED_ADAPTER, folder / layout.TRAINED_MODEL

    def has_trained_model(self, run: str = layout.TRAIN) -> bool:
        """Whether the training stage `run` left a fine-tuned model (adapter or full)."""
        return any(path.is_dir() for path in self.trained_paths(run))

    def model_paths(self, *, trained: bool, run: str = layout.TRAIN) -> tuple[str, str]:
        """(model_dir, adapter_dir or '') of the base model or of the one the training stage
        `run` fine-tuned.

        Raises:
          FileNotFoundError: `trained` but the training stage has not written its model.
        """
        model_dir = self.local_dir("model_dir")
        if not trained:
            return model_dir, self.local_dir("adapter_dir")
        adapter, full = self.trained_paths(run)
        if adapter.is_dir():
            return model_dir, str(adapter)
        if full.is_dir():
            return str(full), ""
        raise FileNotFoundError(
            f"{adapter} (or {full}) is missing: run the {run} stage first (--config.stages={run})"
        )

    def local_dir(self, key: str) -> str:
        """config.<key> (model_dir or adapter_dir) as a local directory: itself, or the
        snapshot of the Hugging Face Hub id it names (g2e.hub.local_dir; fetched once)."""
        value = str(self.config[key])
        if (key, value) not in self._local_dirs:
            self._local_dirs[key, value] = hub.local_dir(value, key)
        return self._local_dirs[key, value]

    def forget_model(self) -> None:
        """Drops the cached model (its weights changed in place, or memory is needed)."""
        self._model = self.model_key = None

    def model(
        self,
        *,
        trained: bool,
        adapter: lora.AdapterConfig | None = None,
        run: str = layout.TRAIN,
        merged: bool = False,
    ) -> Qwen2VL:
        """The base model (+ config.adapter_dir) or the one the training stage `run`
        fine-tuned; cached between stages.

        `adapter` adds fresh trainable adapters instead (training stages). `merged` folds a
        loaded adapter into the base kernels (evaluation: the model then has the zero-shot
        model's structure, so it runs the same compiled programs, and DoRA's column norms
        are not recomputed on every call); export keeps it apart, to write it as PEFT.
        """
        model_dir, adapter_dir = self.model_paths(trained=trained, run=run)
        if adapter is not None and adapter_dir:
            raise ValueError(
                "--config.adapter_dir cannot be trained further here; merge it "
                "first with --config.stages=export and train from export/hf"
            )
        key = (model_dir, adapter_dir, adapter, merged and bool(adapter_dir))
        if key == self.model_key:
            return self._model
        self._model = None  # Free the previous model before loading the next.
        model_config = self.config.model
        adapter_config = peft.read_peft_config(adapter_dir) if adapter_dir else adapter
        model = hf_io.load_model(
            model_dir,
            dtype=model_config.dtype,
            param_dtype=model_config.param_dtype,
            remat=model_config.remat,
            attention=attention.Kernel(
                model_config.attention, model_config.splash_block_q, model_config.splash_block_kv
            ),
            adapter=adapter_config,
            mesh=self.mesh,
            rules=self.rules,
            seed=self.config.seed,
        )
        if adapter_dir:
            peft.load_peft_adapter(model, adapter_dir)
        if adapter_dir and merged:
            count = lora.merge_adapters(model)
            logging.info("model: %d adapted projections of %s merged", count, adapter_dir)
        self._model, self.model_key = model, key
        return model

    def processor(
        self,
        *,
        prompt: prompts.PromptOptions | None = None,
        train: bool = False,
        image_root: str | None = None,
        resolution: str | None = None,
    ) -> Processor:
        """A Processor with the data config's settings (the training ones when `train`)."""
        data = self.config.data
        if prompt is None:
            prompt = prompts.PromptOptions(
                system=self.config.prompt.system, suffix=self.config.prompt.suffix
            )
        return Processor.from_dir(
            self.local_dir("model_dir"),
            max_length=data.train_max_length if train else data.max_length,
            image_resolution=resolution
            or (data.train_image_resolution if train else data.image_resolution),
            min_pixels=data.min_pixels or None,
            max_pixels=data.max_pixels or None,
            prompt=prompt,
            length_buckets=tuple(data.length_buckets),
            patch_buckets=tuple(data.patch_buckets),
            on_bad_input=data.on_bad_input,
            image_root=image_root,
            jpeg_draft=data.jpeg_draft,
            video_frames=data.video_frames,
        )

    def embedding_cache_options(self) -> dict[str, Any]:
        """The EmbeddingCache options of the config (embedding_cache.shard_size, .dtype)."""
        return dict(
            shard_size=int(self.config.embedding_cache.shard_size),
            dtype=self.config.embedding_cache.dtype,
        )

    def fingerprint(self, *parts: Any) -> str:
        """Names a model + prompt + preprocessing, so caches from another setting are not used."""
        text = json.dumps(
            [str(p) for p in parts]
            + [self.config.data.image_resolution, self.config.data.max_length]
        )
        return hashlib.sha1(text.encode()).hexdigest()[:16]
