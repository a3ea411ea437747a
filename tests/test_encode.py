"""`Embedder.encode`, sentence-transformers' way in: the embed command's vectors line by line,
whatever form an input takes (embed-command dicts, strings, paths, PIL images, pairs), one
input -> [D], a list -> [N, D]; prompt names map to g2e's roles; `prompt` is put before the
text; normalize_embeddings=False gives the hidden states before the L2 normalisation."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from g2e import Embedder
from tests import assets
from tests.test_embed_command import GOOD_LINES, run_embed, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(the embed command's output for GOOD_LINES, the run directory, an Embedder of the same
    checkpoint, the checkpoint directory)."""
    directory = tmp_path_factory.mktemp("encode_run")
    (directory / "images").mkdir()
    assets.noise_image(84, 168, seed=1).save(directory / "images" / "wide.png")
    assets.noise_image(140, 84, seed=2).save(directory / "tall.jpg", quality=95)
    _, checkpoint = assets.tiny_checkpoint(tmp_path_factory.mktemp("encode_ckpt"), seed=3)
    write_jsonl(directory / "lines.jsonl", GOOD_LINES)
    result = run_embed(directory, checkpoint, "lines")
    assert result.returncode == 0, result.stderr[-3000:]
    command = np.load(directory / "out" / "lines.npy")
    # One row per device in a step (8 simulated devices): the test's inputs are few.
    embedder = Embedder.from_pretrained(checkpoint, **{"eval.batch_size": 1})
    return command, directory, embedder, checkpoint


def test_encode_equals_the_embed_command_line_by_line(setup, monkeypatch):
    command, directory, embedder, _ = setup
    monkeypatch.chdir(directory)  # image paths are relative to the run directory
    lines = [json.loads(line) for line in (directory / "lines.jsonl").read_text().splitlines()]
    vectors = embedder.encode(lines)  # each line's own role
    assert vectors.dtype == np.float32 and vectors.shape == command.shape
    np.testing.assert_allclose(vectors, command, atol=1e-6, rtol=0)
    for index, line in enumerate(lines):  # one input -> one vector
        vector = embedder.encode(line, show_progress_bar=False)
        assert vector.shape == (command.shape[1],)
        np.testing.assert_allclose(vector, command[index], atol=1e-6, rtol=0, err_msg=line)


def _as_python_input(text: str, image: str | None, form: str):
    """One GOOD_LINES entry in one of encode's forms (image as a Path or a PIL image)."""
    if image is None:
        return text
    picture = pathlib.Path(image) if form == "path" else Image.open(image)
    return (text, picture) if text else picture


@pytest.mark.parametrize("form", ["path", "pil"])
def test_every_input_form_gives_the_command_vectors(setup, monkeypatch, form):
    command, directory, embedder, _ = setup
    monkeypatch.chdir(directory)
    for prompt_name, role in (("query", "query"), ("document", "candidate")):
        rows = [i for i, line in enumerate(GOOD_LINES) if line[2] == role]
        inputs = [_as_python_input(*GOOD_LINES[i][:2], form) for i in rows]
        vectors = embedder.encode(inputs, prompt_name=prompt_name, batch_size=16)
        np.testing.assert_allclose(vectors, command[rows], atol=1e-6, rtol=0, err_msg=role)
        as_list = embedder.encode(inputs, role=role, convert_to_numpy=False)
        assert isinstance(as_list, list) and len(as_list) == len(rows)
        np.testing.assert_allclose(np.stack(as_list), command[rows], atol=1e-6, rtol=0)


def test_prompt_is_put_before_the_text(setup):
    _, _, embedder, _ = setup
    instruction = "Find me an everyday image that matches the caption: "
    np.testing.assert_allclose(
        embedder.encode(["a red circle"], prompt=instruction),
        embedder.encode([instruction + "a red circle"]),
        atol=1e-6,
        rtol=0,
    )


def test_unnormalised_embeddings_are_the_hidden_states_before_normalisation(setup):
    _, _, embedder, _ = setup
    texts = ["a red circle", "a photo of a dog", "two blue squares"]
    normalised = embedder.encode(texts)
    raw = embedder.encode(texts, normalize_embeddings=False)
    norms = np.linalg.norm(raw, axis=-1)
    assert not np.allclose(norms, 1.0, atol=1e-3), norms  # really before the normalisation
    np.testing.assert_allclose(raw / norms[:, None], normalised, atol=1e-5, rtol=0)


def test_bad_inputs_are_named(setup):
    _, _, embedder, _ = setup
    with pytest.raises(TypeError, match="input 1 is a int"):
        embedder.encode(["a text", 3])
    with pytest.raises(ValueError, match=r"unknown keys \['caption'\]"):
        embedder.encode({"caption": "a dog"})
    with pytest.raises(ValueError, match="prompt_name 'search_query'"):
        embedder.encode("a dog", prompt_name="search_query")
    with pytest.raises(ValueError, match="disagree"):
        embedder.encode("a dog", prompt_name="query", role="candidate")


def test_video_frames_reach_the_embedder(setup):
    """A dict's `video` (frames in order) is embedded as EmbedItem.video is."""
    from g2e.data.preprocess import EmbedItem

    _, _, embedder, _ = setup
    frames = [assets.noise_image(56, 84, seed=s) for s in range(4)]
    vector = embedder.encode({"text": "a moving square", "video": frames})
    direct = embedder.embed_items([EmbedItem("a moving square", None, "query", video=frames)])
    assert np.isfinite(vector).all()
    np.testing.assert_allclose(vector, direct[0], atol=1e-6, rtol=0)
    # The frames matter: the text alone is another vector.
    assert np.abs(vector - embedder.encode("a moving square")).max() > 1e-3
