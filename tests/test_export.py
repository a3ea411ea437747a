"""Export round trip: transformers loads the export; embeddings match g2e's; the PEFT adapter
export reloads (in PEFT, and in g2e through --config.adapter_dir) with the same embeddings.

The adapted model carries a DoRA adapter with random, non-zero values (B != 0, magnitudes off
the column norms), so an export that dropped or mis-merged the adapter would show.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from g2e import export
from g2e.data.preprocess import EmbedItem, Processor
from g2e.embedding import Embedder
from g2e.models import hf_io, lora
from g2e.models import peft as peft_io
from tests import assets

REPO = pathlib.Path(__file__).resolve().parents[1]
# Targets sorted as read_peft_config returns them: same config, so reloads reuse compilations.
ADAPTER = lora.AdapterConfig(kind="dora", r=4, alpha=8, dropout=0.0,
                             targets=tuple(sorted(lora.DEFAULT_TARGETS)))
ITEMS = [
    EmbedItem("a red circle and a blue square", None, "query"),
    EmbedItem("<|image_1|>\nRepresent the given image with the following question: What shape "
              "is in the image?", assets.noise_image(84, 112, seed=1), "query"),
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
    processor = Processor.from_dir(directory, max_length=256, length_buckets=(256,),
                                   patch_buckets=(0, 64))
    return Embedder(model, processor, mesh=None, batch_size=4, progress=False)(ITEMS)


def torch_embeddings(model, directory) -> np.ndarray:
    return np.stack([assets.reference_embedding(model, directory, item) for item in ITEMS])


def load_torch(directory) -> transformers.Qwen2VLForConditionalGeneration:
    return transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint dir, export dir, base embeddings, adapted embeddings, merged embeddings)."""
    _, directory = assets.tiny_checkpoint(tmp_path_factory.mktemp("export_ckpt"), seed=11)
    base = embed(hf_io.load_model(directory), directory)
    model = hf_io.load_model(directory, adapter=ADAPTER)
    randomize_adapter(model, seed=0)
    adapted = embed(model, directory)
    out_dir = tmp_path_factory.mktemp("export_out")
    written = export.export_model(model, base_dir=directory, out_dir=out_dir, adapter=ADAPTER,
                                  dtype="float32")
    assert written == {"hf": str(out_dir / "hf"), "peft": str(out_dir / "peft")}
    merged = embed(model, directory)  # export merged the adapter into the model in place
    return directory, out_dir, base, adapted, merged


def test_adapter_matters_and_merge_keeps_embeddings(exported):
    _, _, base, adapted, merged = exported
    assert np.abs(adapted - base).max() > 1e-2
    np.testing.assert_allclose(merged, adapted, atol=1e-5, rtol=0)


def test_transformers_loads_export_with_same_embeddings(exported):
    _, out_dir, _, adapted, _ = exported
    hf_dir = out_dir / "hf"
    for name in ("config.json", "model.safetensors.index.json", "tokenizer.json",
                 "preprocessor_config.json", "generation_config.json", "README.md"):
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


def test_export_stage_through_main(exported, tmp_path):
    directory, out_dir, _, adapted, _ = exported
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "g2e.main", f"--config={REPO / 'configs' / 'embed.py'}",
               "--config.stages=export", f"--config.model_dir={directory}",
               f"--config.adapter_dir={out_dir / 'peft'}", "--config.workdir=work",
               "--config.export.dtype=float32"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    hf_dir = tmp_path / "work" / "export" / "hf"
    assert (tmp_path / "work" / "export" / "DONE.json").is_file()
    assert (tmp_path / "work" / "export" / "peft" / "adapter_model.safetensors").is_file()
    np.testing.assert_allclose(torch_embeddings(load_torch(hf_dir), hf_dir), adapted,
                               atol=1e-4, rtol=0)
