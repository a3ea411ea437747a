"""Every recipe in configs/ loads and validates; bad keys fail with their name."""

import importlib.util
import pathlib

import pytest

from g2e import configuration
from g2e.main import STAGE_NAMES

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _load(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__doc__.lstrip().split("\n\n")[1].lstrip().startswith("python -m g2e.main")
    return module.get_config(arg) if arg is not None else module.get_config()


@pytest.mark.parametrize("name,arg", [("mmeb", None), ("mmeb", "7b"), ("embed", None),
                                      ("demo", None)])
def test_every_config_loads_and_validates(name, arg):
    config = _load(name, arg)
    config.model_dir = config.model_dir or "/some/model"
    config.data.train_dir = config.data.train_dir or "/some/train"
    config.data.eval_dir = config.data.eval_dir or "/some/eval"
    if name == "embed":
        config.input, config.output = "in.jsonl", "out.npy"
    configuration.validate(config, STAGE_NAMES)


def test_mmeb_7b_shards_over_fsdp():
    assert _load("mmeb", "7b").mesh.fsdp == -1


@pytest.mark.parametrize("key,value,message", [
    ("stages", "eval,train,bogus", "--config.stages: unknown stage 'bogus'"),
    ("model.remat", "some", "--config.model.remat"),
    ("data.on_bad_input", "ignore", "--config.data.on_bad_input"),
    ("train.query_chunk", 7, "--config.train.query_chunk"),
    ("data.image_resolution", "huge", "--config.data.image_resolution"),
    ("stages", "eval_sugarcrepe", "--config.data.sugarcrepe_dir"),
    ("data.workers", -2, "--config.data.workers"),
    ("embedding_cache.dtype", "int8", "--config.embedding_cache.dtype"),
])
def test_bad_keys_are_named(key, value, message):
    config = _load("mmeb")
    config.model_dir, config.data.train_dir, config.data.eval_dir = "/m", "/t", "/e"
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
        node = node[parent]
    node[leaf] = value
    with pytest.raises(configuration.ConfigError, match=message.replace(".", r"\.")):
        configuration.validate(config, STAGE_NAMES)


def test_missing_model_dir_is_named():
    config = _load("mmeb")
    with pytest.raises(configuration.ConfigError, match=r"--config\.model_dir"):
        configuration.validate(config, STAGE_NAMES)
