"""The committed demo generator (g2e/demo/assets/generator): its weights are the manifest's, it
was made for today's scenes, prompts and lessons, and it sees colours on fresh images."""

import dataclasses

import numpy as np
import pytest

from g2e.demo import lessons, pretrain, probes, scenes
from g2e.models import hf_io


def test_the_committed_asset_is_current_and_its_weights_are_the_manifests():
    manifest = pretrain.check_asset()
    assert manifest["preset"] == "full" and not probes.failed_gates(manifest["probes"])


def test_a_stale_asset_is_refused_with_the_command_that_remakes_it(monkeypatch):
    monkeypatch.setattr(scenes, "SIZE_RANGE", (0.2, 0.3))
    with pytest.raises(ValueError, match="stale.*python -m g2e.demo.pretrain --out g2e/demo/asse"):
        pretrain.check_asset()
    monkeypatch.undo()
    monkeypatch.setattr(pretrain, "PRESETS", {**pretrain.PRESETS})
    pretrain.PRESETS["full"] = dataclasses.replace(pretrain.PRESETS["full"], lr=1e-3)
    with pytest.raises(ValueError, match="stale"):
        pretrain.check_asset()


def test_the_committed_asset_names_the_colour_of_fresh_images():
    model = hf_io.load_model(pretrain.ASSET_DIR)
    processor = pretrain.processor_for(pretrain.ASSET_DIR)
    programs = probes.Programs(model, processor)
    # Fresh draws: a stream neither pretraining nor its gate used.
    rng = np.random.default_rng([20261207, 64])
    assert probes.accuracy(programs, lessons.colour_lesson, rng, 64) >= 0.9
