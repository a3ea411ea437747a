"""Test helper: a tiny Qwen2-VL checkpoint and a `mine` configuration for it, small enough for
a CPU, in-process or as command-line flags."""

from __future__ import annotations

import pathlib

import ml_collections

from g2e import configuration
from tests import assets

# Every batch has length 192 and no image or 128 patches (images of the mini-MMEB's sizes):
# two compiled shapes per program.
SETTINGS = {
    "model.dtype": "float32",
    "model.param_dtype": "float32",
    "model.remat": "none",
    "data.image_resolution": "processor",
    "data.max_length": 192,
    "data.length_buckets": (192,),
    "data.patch_buckets": (0, 128),
    "data.train_split": "original",
    "mine.top_k": 3,
    "mine.pool_mult": 3,
    "mine.batch_size": 1,  # per device: 8 a step on 8 devices
    "mine.judge_batch_size": 2,
    "mine.block_size": 32,
}


def write_checkpoint(out_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A complete tiny checkpoint (tokenizer, configs, float32 weights) in `out_dir`, written
    by transformers (seconds; initialising the g2e model eagerly on 8 CPU devices takes ~40 s)."""
    return assets.tiny_checkpoint(out_dir, seed=seed)[1]


def mine_settings(model_dir, data_dir, workdir, **overrides) -> dict:
    """Dotted config keys -> values of a `mine` run over the data set in `data_dir`."""
    return {
        **SETTINGS,
        "model_dir": str(model_dir),
        "workdir": str(workdir),
        "stages": "mine",
        "data.train_dir": str(pathlib.Path(data_dir) / "train"),
        "data.train_image_root": str(data_dir),
        **overrides,
    }


def config_of(settings: dict) -> ml_collections.ConfigDict:
    config = configuration.base_config()
    for key, value in settings.items():
        *parents, name = key.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        section[name] = value
    return config


def flags_of(settings: dict) -> list[str]:
    """The settings as --config.KEY=VALUE flags of `python -m g2e.main`."""

    def text(value):
        return f"({','.join(map(str, value))},)" if isinstance(value, tuple) else str(value)

    return [f"--config.{key}={text(value)}" for key, value in settings.items()]
