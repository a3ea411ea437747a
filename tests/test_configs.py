"""Every recipe in configs/ loads and validates; bad keys fail with their name."""

import importlib.util
import pathlib

import pytest

from g2e import configuration
from g2e.main import STAGE_NAMES, STAGES

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _load(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__doc__.lstrip().split("\n\n")[1].lstrip().startswith("python -m g2e.main")
    return module.get_config(arg) if arg is not None else module.get_config()


@pytest.mark.parametrize(
    "name,arg",
    [
        ("mmeb", None),
        ("mmeb", "7b"),
        ("mmeb", "release"),
        ("mmeb", "release-7b"),
        ("mmeb", "qwen25-3b"),
        ("mmeb", "qwen25-7b"),
        ("embed", None),
        ("demo", None),
    ],
)
def test_every_config_loads_and_validates(name, arg):
    config = _load(name, arg)
    config.model_dir = config.model_dir or "/some/model"
    config.data.train_dir = config.data.train_dir or "/some/train"
    config.data.eval_dir = config.data.eval_dir or "/some/eval"
    config.data.mmeb_v2_dir = config.data.mmeb_v2_dir or "/some/mmeb_v2"
    if name == "embed":
        config.input, config.output = "in.jsonl", "out.npy"
    configuration.validate(config, STAGE_NAMES)


def test_mmeb_7b_shards_over_fsdp():
    for variant in ("7b", "release-7b", "qwen25-7b"):
        assert _load("mmeb", variant).mesh.fsdp == -1


def test_qwen25_variants_are_the_recipe_with_their_own_workdir():
    recipe = _load("mmeb").to_dict()
    assert {**_load("mmeb", "qwen25-3b").to_dict(), "workdir": recipe["workdir"]} == recipe
    assert _load("mmeb", "qwen25-7b").to_dict() == {
        **_load("mmeb", "7b").to_dict(),
        "workdir": "workdir/mmeb-qwen25-7b",
    }


def test_unknown_variant_names_the_known_ones():
    with pytest.raises(ValueError, match="configs/mmeb.py:qwen25-3b"):
        _load("mmeb", "qwen3")


def test_release_variant_differs_from_the_recipe_in_the_documented_keys_only():
    recipe, release = _load("mmeb").to_dict(), _load("mmeb", "release").to_dict()
    # The release: no generative judge, identical positives scored as negatives, every row of
    # every subset mined, only clustered rows trained. g2e caps subsets at 50k rows (VLM2Vec's
    # convention) and trains unclustered rows as single rows. Both: 2048 pairs per step.
    assert (recipe["mine"]["judge"], release["mine"]["judge"]) == (True, False)
    assert recipe["train"]["mask_identical_positives"]
    assert not release["train"]["mask_identical_positives"]
    assert (recipe["data"]["max_rows_per_subset"], release["data"]["max_rows_per_subset"]) == (
        50000,
        0,
    )
    assert recipe["train"]["keep_unclustered_rows"]
    assert not release["train"]["keep_unclustered_rows"]
    for config in (recipe, release):
        assert config["train"]["global_batch"] == 2048
        assert config["data"]["row_sample_seed"] == -1
    differing = {
        (section, key)
        for section, values in recipe.items()
        if isinstance(values, dict)
        for key in values
        if values[key] != release[section][key]
    }
    assert differing == {
        ("mine", "judge"),
        ("train", "mask_identical_positives"),
        ("data", "max_rows_per_subset"),
        ("train", "keep_unclustered_rows"),
    }
    assert recipe["workdir"] != release["workdir"]
    assert _load("mmeb", "release-7b").to_dict() == {
        **release,
        "workdir": "workdir/mmeb-release-7b",
        "mesh": _load("mmeb", "7b").to_dict()["mesh"],
    }


def test_config_docstrings_are_the_command_and_a_pointer_to_the_docs():
    for name in ("mmeb", "demo", "embed"):
        spec = importlib.util.spec_from_file_location(name, CONFIG_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert len(module.__doc__.strip().splitlines()) <= 12, name
    recipe = (CONFIG_DIR.parent / "docs" / "recipe.md").read_text()
    assert "VLM2Vec's convention" in recipe and "keep_unclustered_rows" in recipe


def test_embed_config_sets_the_one_image_resolution_key():
    config = _load("embed")
    assert config.data.image_resolution == "processor"
    assert "image_resolution" not in config


def test_stage_table_names_each_stage_once_in_recipe_order():
    assert len(set(STAGE_NAMES)) == len(STAGE_NAMES)
    demo = configuration.split_list(_load("demo").stages)
    assert [name for name in STAGE_NAMES if name in demo] == demo
    for name in ("train_plain_random", "eval_plain_random"):
        assert name in demo
    assert demo.index("train_plain_random") > demo.index("train_random")
    assert demo.index("eval_plain_random") > demo.index("eval_random")
    assert {stage.name for stage in STAGES if stage.always_runs} == {"embed"}


def test_the_demo_is_pointed_at_its_data_before_validation(tmp_path):
    from g2e.demo import prepare

    config = _load("demo")
    with pytest.raises(configuration.ConfigError, match=r"--config\.model_dir"):
        configuration.validate(config, STAGE_NAMES)
    prepare.point_at_demo(config, tmp_path)
    configuration.validate(config, STAGE_NAMES)
    assert config.model_dir.startswith(str(tmp_path / "prepare_demo"))


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("stages", "eval,train,bogus", "--config.stages: unknown stage 'bogus'"),
        ("model.remat", "some", "--config.model.remat"),
        ("data.on_bad_input", "ignore", "--config.data.on_bad_input"),
        ("train.query_chunk", 7, "--config.train.query_chunk"),
        ("train.global_batch", 2040, "--config.train.global_batch"),
        ("train.backprop", "some", "--config.train.backprop"),
        ("data.max_rows_per_subset", -1, "--config.data.max_rows_per_subset"),
        ("data.heldout_rows", -1, "--config.data.heldout_rows"),
        ("train.heldout_every", 0, "--config.train.heldout_every"),
        ("data.image_resolution", "huge", "--config.data.image_resolution"),
        ("stages", "eval_sugarcrepe", "--config.data.sugarcrepe_dir"),
        ("data.workers", -2, "--config.data.workers"),
        ("embedding_cache.dtype", "int8", "--config.embedding_cache.dtype"),
        ("data.pack_length", 1024, "--config.data.pack_length"),
    ],
)
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
