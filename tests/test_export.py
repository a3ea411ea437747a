"""Export round trip: transformers loads the export; embeddings match g2e's; the PEFT adapter
export reloads (in PEFT, and in g2e through --config.adapter_dir) with the same embeddings.
The export is the source checkpoint as stored (bit for bit without an adapter, whatever
param_dtype the model was held in), merges in float32 from the source's values, does not depend
on the device layout, and follows the source's model type (Qwen2.5-VL too).

The adapted model carries a DoRA adapter with random, non-zero values (B != 0, magnitudes off
the column norms), so an export that dropped or mis-merged the adapter would show.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import ml_collections
import ml_dtypes
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from g2e import configuration, distributed, export, main
from g2e.data.preprocess import EmbedItem, Processor
from g2e.demo import tiny
from g2e.embedding import Embedder
from g2e.models import hf_io, lora
from g2e.models import peft as peft_io
from g2e.models.config import QWEN2_5_VL
from tests import assets
from tests.models.checkpoints import randomize

REPO = pathlib.Path(__file__).resolve().parents[1]
# Targets sorted as read_peft_config returns them: same config, so reloads reuse compilations.
ADAPTER = lora.AdapterConfig(
    kind="dora", r=4, alpha=8, dropout=0.0, targets=tuple(sorted(lora.DEFAULT_TARGETS))
)
ITEMS = [
    EmbedItem("a red circle and a blue square", None, "query"),
    EmbedItem(
        "<|image_1|>\nRepresent the given image with the following question: What shape "
        "is in the image?",
        assets.noise_image(84, 112, seed=1),
        "query",
    ),
    EmbedItem("Find me an everyday image", assets.noise_image(112, 56, seed=2), "candidate"),
]


def randomize_adapter(model, seed: int) -> None:
    """Sets every adapter parameter to random values (in place): A, B ~ N(0, 0.1), magnitude
    = its initial column norm * (1 + N(0, 0.1))."""
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        value = np.asarray(jax.device_get(variable.value), np.float32)
        noise = rng.normal(0.0, 0.1, value.shape).astype(np.float32)
        new = value * (1.0 + noise) if str(path[-1]) == "magnitude" else noise
        variable.value = jax.device_put(new, variable.value.sharding)


def embed(model, directory) -> np.ndarray:
    processor = Processor.from_dir(
        directory, max_length=256, length_buckets=(256,), patch_buckets=(0, 64)
    )
    return Embedder(model, processor, mesh=None, batch_size=4, progress=False)(ITEMS)


def tensors(directory) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory, by name (safetensors' own reader)."""
    out = {}
    for path in sorted(pathlib.Path(directory).glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def torch_embeddings(model, directory) -> np.ndarray:
    return np.stack([assets.reference_embedding(model, directory, item) for item in ITEMS])


def load_torch(directory) -> transformers.Qwen2VLForConditionalGeneration:
    return transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint dir, export dir, base embeddings, adapted embeddings, merged embeddings)."""
    _, directory = assets.tiny_checkpoint(tmp_path_factory.mktemp("export_ckpt"), seed=11)
    base = embed(hf_io.load_model(directory), directory)
    model = hf_io.load_model(directory, adapter=ADAPTER)
    randomize_adapter(model, seed=0)
    adapted = embed(model, directory)
    out_dir = tmp_path_factory.mktemp("export_out")
    written = export.export_model(
        model, base_dir=directory, out_dir=out_dir, adapter=ADAPTER, max_shard_bytes=100_000
    )
    assert written == {"hf": str(out_dir / "hf"), "peft": str(out_dir / "peft")}
    assert peft_io.has_adapters(model)  # the export left the model as it was
    merged = embed(hf_io.load_model(out_dir / "hf"), directory)
    return directory, out_dir, base, adapted, merged


def test_adapter_matters_and_merge_keeps_embeddings(exported):
    _, _, base, adapted, merged = exported
    assert np.abs(adapted - base).max() > 1e-2
    np.testing.assert_allclose(merged, adapted, atol=1e-5, rtol=0)


def hand_merge(
    kernel_hf: np.ndarray, adapter: dict[str, np.ndarray], layer: int, config: lora.AdapterConfig
) -> np.ndarray:
    """DoRA merged in float32 with numpy, in HF layout [out, in]: (W + s A B) m / ||W + s A B||."""
    weight = kernel_hf.astype(np.float32).T
    merged = weight + config.scaling * (adapter["lora_a"][layer] @ adapter["lora_b"][layer])
    merged = merged * (adapter["magnitude"][layer] / np.linalg.norm(merged, axis=0))
    return merged.T


def test_export_without_adapter_is_the_source_bit_for_bit(exported, tmp_path):
    """A float32 source held in bfloat16: the export copies the source, not the bf16 copy."""
    directory = exported[0]
    model = hf_io.load_model(directory, dtype="bfloat16", param_dtype="bfloat16")
    assert model.language_model.embed_tokens.value.dtype == ml_dtypes.bfloat16
    export.export_model(model, base_dir=directory, out_dir=tmp_path / "same", adapter=None)
    source, written = tensors(directory), tensors(tmp_path / "same" / "hf")
    assert sorted(written) == sorted(source)
    for name, array in source.items():
        assert written[name].dtype == array.dtype == np.float32, name
        assert written[name].tobytes() == array.tobytes(), name
    source_config = json.loads((directory / "config.json").read_text())
    assert json.loads((tmp_path / "same" / "hf" / "config.json").read_text()) == source_config
    assert not (tmp_path / "same" / "peft").exists()

    # Another dtype changes the tensors' dtype and the config's dtype field, nothing else.
    export.export_model(
        model, base_dir=directory, out_dir=tmp_path / "bf16", adapter=None, dtype="bfloat16"
    )
    written = tensors(tmp_path / "bf16" / "hf")
    for name, array in source.items():
        assert written[name].tobytes() == array.astype(ml_dtypes.bfloat16).tobytes(), name
    config = json.loads((tmp_path / "bf16" / "hf" / "config.json").read_text())
    assert config.pop("dtype") == "bfloat16" and source_config.pop("dtype") == "float32"
    assert config == source_config


def test_merge_is_float32_from_the_source(exported, tmp_path):
    """Adapters on a bf16-held model merge from the float32 source, as a numpy merge does."""
    directory = exported[0]
    model = hf_io.load_model(directory, dtype="bfloat16", param_dtype="bfloat16", adapter=ADAPTER)
    randomize_adapter(model, seed=3)
    adapter = peft_io.adapter_arrays(model)
    export.export_model(model, base_dir=directory, out_dir=tmp_path, adapter=ADAPTER)
    source, written = tensors(directory), tensors(tmp_path / "hf")
    assert sorted(written) == sorted(source)
    merged_names = set()
    for projection in ADAPTER.targets:
        block = "mlp" if projection == "down_proj" else "self_attn"
        for layer in range(model.config.text.num_layers):
            name = f"model.layers.{layer}.{block}.{projection}.weight"
            merged_names.add(name)
            expected = hand_merge(source[name], adapter[projection], layer, ADAPTER)
            np.testing.assert_allclose(written[name], expected, rtol=2e-6, atol=2e-7, err_msg=name)
            # The same merge from the model's bf16 copy of the kernel is visibly different.
            from_copy = hand_merge(
                source[name].astype(ml_dtypes.bfloat16), adapter[projection], layer, ADAPTER
            )
            assert (
                np.abs(from_copy - expected).max() > 100 * np.abs(written[name] - expected).max()
            ), name
    for name in set(source) - merged_names:
        assert written[name].tobytes() == source[name].tobytes(), name


def test_transformers_loads_export_with_same_embeddings(exported):
    _, out_dir, _, adapted, _ = exported
    hf_dir = out_dir / "hf"
    for name in (
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "preprocessor_config.json",
        "generation_config.json",
        "README.md",
    ):
        assert (hf_dir / name).is_file(), name
    model = load_torch(hf_dir)
    np.testing.assert_allclose(torch_embeddings(model, hf_dir), adapted, atol=1e-4, rtol=0)


def test_peft_loads_adapter_with_same_embeddings(exported):
    directory, out_dir, _, adapted, _ = exported
    model = peft.PeftModel.from_pretrained(load_torch(directory), out_dir / "peft").eval()
    assert model.peft_config["default"].use_dora
    np.testing.assert_allclose(torch_embeddings(model, directory), adapted, atol=1e-4, rtol=0)


def test_adapter_dir_reload_in_g2e(exported):
    """What Pipeline.model does for --config.adapter_dir."""
    directory, out_dir, _, adapted, _ = exported
    adapter = peft_io.read_peft_config(out_dir / "peft")
    assert (adapter.kind, adapter.r, adapter.alpha) == ("dora", 4, 8.0)
    assert adapter == ADAPTER
    model = hf_io.load_model(directory, adapter=adapter, seed=1)
    peft_io.load_peft_adapter(model, out_dir / "peft")
    np.testing.assert_allclose(embed(model, directory), adapted, atol=1e-5, rtol=0)


def test_failed_export_leaves_no_hf_directory(exported, tmp_path, monkeypatch):
    directory, out_dir, _, _, _ = exported
    before = {p.name: p.stat().st_mtime_ns for p in (out_dir / "hf").iterdir()}

    def save_then_fail(model, out, **kwargs):
        (pathlib.Path(out) / "config.json").write_text("{}")  # Something half written.
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "save_hf", save_then_fail)
    model = hf_io.load_model(directory)
    with pytest.raises(OSError, match="disk full"):
        export.export_model(model, base_dir=directory, out_dir=tmp_path / "fresh", adapter=None)
    assert not (tmp_path / "fresh" / "hf").exists()
    assert not [p for p in (tmp_path / "fresh").iterdir() if p.name.startswith(".hf")]
    # A failed re-export leaves the earlier, complete export as it was.
    with pytest.raises(OSError, match="disk full"):
        export.export_model(model, base_dir=directory, out_dir=out_dir, adapter=None)
    assert {p.name: p.stat().st_mtime_ns for p in (out_dir / "hf").iterdir()} == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["hf", "peft"]


def test_export_does_not_depend_on_how_the_model_is_sharded(exported, tmp_path):
    """The same adapter on 8 devices, sharded fsdp=8 or data x fsdp x tensor = 2 x 2 x 2: the
    same bytes (each merged column is computed whole on one device, in blocks of the same size
    whatever the layout; what two processes x 4 devices must match too). Against the export
    on one device the merged kernels agree to float32 rounding, the rest bit for bit."""
    directory, out_dir = exported[0], exported[1]
    written = []
    for layout in (dict(data=1, fsdp=-1, tensor=1), dict(data=2, fsdp=2, tensor=-1)):
        mesh = distributed.make_mesh(ml_collections.ConfigDict(layout))
        model = hf_io.load_model(directory, adapter=ADAPTER, mesh=mesh)
        peft_io.load_peft_adapter(model, out_dir / "peft")
        assert (
            len(model.language_model.layers.self_attn.q_proj.lora_b.value.sharding.device_set) == 8
        )
        target = tmp_path / "_".join(map(str, mesh.devices.shape))
        export.export_model(
            model, base_dir=directory, out_dir=target, adapter=ADAPTER, max_shard_bytes=100_000
        )
        written.append(
            {
                f"{folder}/{p.name}": p.read_bytes()
                for folder in ("hf", "peft")
                for p in (target / folder).iterdir()
            }
        )
    assert sorted(written[0]) == sorted(written[1])
    for name, data in written[0].items():
        assert written[1][name] == data, name
    one_device, sharded = tensors(out_dir / "hf"), tensors(tmp_path / "1_8_1" / "hf")
    assert sorted(sharded) == sorted(one_device)
    for name, array in one_device.items():
        np.testing.assert_allclose(sharded[name], array, rtol=1e-6, atol=1e-7, err_msg=name)
    assert (
        written[0]["peft/adapter_model.safetensors"]
        == (out_dir / "peft" / "adapter_model.safetensors").read_bytes()
    )


def test_export_stage_through_main_reuses_the_compilation_cache(exported, tmp_path):
    """The export stage through g2e.main, twice: the second run (forced) writes the same
    export and compiles nothing new: every program comes from the persistent cache that the
    first run filled under the workdir."""
    directory, out_dir, _, adapted, _ = exported
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu"
    )
    command = [
        sys.executable,
        "-m",
        "g2e.main",
        f"--config={REPO / 'configs' / 'embed.py'}",
        "--config.stages=export",
        f"--config.model_dir={directory}",
        f"--config.adapter_dir={out_dir / 'peft'}",
        "--config.workdir=work",
        "--config.compilation_cache.min_compile_time_secs=0",
    ]
    cache = tmp_path / "work" / "compilation_cache"
    hf_dir = tmp_path / "work" / "export" / "hf"
    runs = []
    for extra in ([], ["--config.force=export"]):
        result = subprocess.run(
            command + extra, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        entries = sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []
        runs.append((entries, {p.name: p.read_bytes() for p in hf_dir.iterdir()}))
    (first_entries, first_export), (second_entries, second_export) = runs
    assert [name for name in first_entries if name.endswith("-cache")], first_entries
    assert second_entries == first_entries  # nothing compiled again
    assert second_export == first_export
    assert (tmp_path / "work" / "export" / "DONE.json").is_file()
    assert (tmp_path / "work" / "export" / "peft" / "adapter_model.safetensors").is_file()
    np.testing.assert_allclose(
        torch_embeddings(load_torch(hf_dir), hf_dir), adapted, atol=1e-4, rtol=0
    )


def test_export_and_cache_keys_are_validated():
    config = configuration.base_config()
    config.model_dir = "/some/model"
    config.stages = "export"
    assert config.export.dtype == "source" and config.compilation_cache.enabled
    configuration.validate(config, main.STAGE_NAMES)
    for key, value, message in [
        ("export.dtype", "int8", "--config.export.dtype: is 'int8'; use one of source, "),
        (
            "compilation_cache.min_compile_time_secs",
            -1.0,
            "--config.compilation_cache.min_compile_time_secs: is -1.0",
        ),
        (
            "compilation_cache.min_entry_size_bytes",
            -2,
            "--config.compilation_cache.min_entry_size_bytes: is -2",
        ),
    ]:
        bad = configuration.base_config()
        bad.model_dir, bad.stages = "/some/model", "export"
        section, name = key.split(".")
        bad[section][name] = value
        with pytest.raises(configuration.ConfigError, match=re.escape(message)):
            configuration.validate(bad, main.STAGE_NAMES)


# ----------------------------------------------------------------------------- Qwen2.5-VL


@pytest.fixture(scope="module")
def qwen25_checkpoint(tmp_path_factory):
    """A tiny Qwen2.5-VL checkpoint with its tokenizer: (torch model, directory)."""
    directory = tmp_path_factory.mktemp("qwen25_ckpt")
    config = transformers.Qwen2_5_VLConfig(
        **tiny.write_assets(directory, texts=assets.TEXTS, vocab_size=600, model_type=QWEN2_5_VL)
    )
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = "eager"
    torch.manual_seed(5)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).float().eval()
    randomize(model, 5)
    model.save_pretrained(directory)
    return model, directory


@torch.no_grad()
def last_hidden(model, input_ids: np.ndarray) -> np.ndarray:
    ids = torch.tensor(input_ids)
    outputs = model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=torch.zeros_like(ids),
        output_hidden_states=True,
    )
    return outputs.hidden_states[-1].double().numpy()


def test_qwen25_export_loads_as_qwen25_in_transformers_and_peft(qwen25_checkpoint, tmp_path):
    base, directory = qwen25_checkpoint
    model = hf_io.load_model(directory, adapter=ADAPTER)
    randomize_adapter(model, seed=7)
    export.export_model(model, base_dir=directory, out_dir=tmp_path, adapter=ADAPTER)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["model_type"] == QWEN2_5_VL
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_config["auto_mapping"] == {
        "base_model_class": "Qwen2_5_VLForConditionalGeneration",
        "parent_library": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    }
    assert "# g2e embedder (Qwen2.5-VL)" in (tmp_path / "hf" / "README.md").read_text()

    merged, info = transformers.AutoModelForImageTextToText.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert type(merged) is transformers.Qwen2_5_VLForConditionalGeneration
    assert not info["missing_keys"] and not info["unexpected_keys"]
    input_ids = np.array([[5, 17, 33, 2, 9, 41, 77]])
    plain = last_hidden(base, input_ids)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    adapted_modules = [name for name, _ in adapted.named_modules() if name.endswith(".lora_A")]
    assert len(adapted_modules) == 2 * len(ADAPTER.targets)  # 2 layers; none in the vision tower
    assert not [name for name in adapted_modules if "visual" in name]
    expected = last_hidden(adapted, input_ids)
    assert np.abs(expected - plain).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(last_hidden(merged.eval(), input_ids), expected, atol=1e-4, rtol=0)
