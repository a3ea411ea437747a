"""The Embedder: padding side, batch composition and the mesh do not change an embedding.

One tiny checkpoint (tests/assets.py) serves the module. The buckets are few on purpose — one
length bucket, patch buckets (0, 128, 256) — so every run below reuses a handful of compiled
programs, while still mixing text-only items, images of different sizes and short/long texts
in one batch.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from g2e import distributed
from g2e.data.batching import fine_bucket, pack_rows, pack_vision
from g2e.data.preprocess import EmbedItem, Processor
from g2e.embedding import Embedder, rows_per_step
from g2e.models import hf_io, sharding
from tests import assets

RULES = sharding.DEFAULT_RULES
LENGTH_BUCKETS = (256,)
PATCH_BUCKETS = (0, 128, 256)
LONG_TEXT = (
    "a red circle and a blue square next to a small green triangle on the left of a "
    "tall tree near the water, with a man holding a cup and a dog sitting in front of "
    "the house under a bright sky; many people are walking on the street."
)


def make_items() -> list[EmbedItem]:
    """Text-only and image items of different sizes, queries and candidates, short and long."""
    return [
        EmbedItem("a red circle", None, "query"),
        EmbedItem(
            "<|image_1|>\nRepresent the given image with the following question: "
            "What shape is in the image?",
            assets.noise_image(56, 56, seed=1),
            "query",
        ),
        EmbedItem(LONG_TEXT, None, "candidate"),
        # Image without a placeholder: the image goes first.
        EmbedItem("a blue square", assets.noise_image(84, 112, seed=2), "candidate"),
        EmbedItem("", assets.noise_image(224, 196, seed=3), "candidate"),  # 224 patches
        EmbedItem("Find me an everyday image that matches the caption: a dog", None, "query"),
        EmbedItem(LONG_TEXT, assets.noise_image(168, 140, seed=4), "query"),  # 120 patches
    ]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return assets.tiny_checkpoint(tmp_path_factory.mktemp("embedding_ckpt"), seed=3)


@pytest.fixture(scope="module")
def model(checkpoint):
    return hf_io.load_model(checkpoint[1])


def processor(directory, padding_side: str = "right") -> Processor:
    return Processor.from_dir(
        directory,
        max_length=256,
        padding_side=padding_side,
        length_buckets=LENGTH_BUCKETS,
        patch_buckets=PATCH_BUCKETS,
    )


@pytest.fixture(scope="module")
def alone(checkpoint, model):
    """Each item embedded by itself (batch of one real row plus dummy rows), right padding."""
    embedder = Embedder(model, processor(checkpoint[1]), mesh=None, batch_size=2, progress=False)
    return np.concatenate([embedder([item]) for item in make_items()])


def test_alone_matches_transformers(checkpoint, alone):
    """The fixture every other test compares against is itself right (the docs/method.md §1 prompt)."""
    torch_model, directory = checkpoint
    for index, item in enumerate(make_items()):
        reference = assets.reference_embedding(torch_model, directory, item)
        np.testing.assert_allclose(
            alone[index], reference, atol=1e-4, rtol=0, err_msg=f"item {index}"
        )


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_mixed_batch_and_padding_side_do_not_change_embeddings(
    checkpoint, model, alone, padding_side
):
    proc = processor(checkpoint[1], padding_side)
    embedder = Embedder(model, proc, mesh=None, batch_size=8, progress=False)
    mixed = embedder(make_items())
    # Everything went through one step: text-only rows next to image rows, short next to long.
    assert proc.padding_report()["shapes"] == [(8, 256, 256)]
    assert mixed.dtype == np.float32 and mixed.shape == alone.shape
    np.testing.assert_allclose(mixed, alone, atol=1e-5, rtol=0)


def test_unit_norm_and_distinct(alone):
    np.testing.assert_allclose(np.linalg.norm(alone, axis=1), 1.0, atol=1e-5)
    # Distinct rows, so the order tests below could tell a swap.
    similarity = alone @ alone.T
    assert np.max(similarity - np.eye(len(alone)) * 2) < 0.999


def test_input_order_kept_across_buckets(checkpoint, model, alone):
    """Items are grouped by (patches, length) into steps; results still come back in order."""
    items = make_items()
    order = [6, 0, 4, 2, 1, 5, 3]  # Images and texts interleaved: grouping must reorder them.
    proc = processor(checkpoint[1])
    embedder = Embedder(model, proc, mesh=None, batch_size=2, progress=False)
    out = embedder([items[i] for i in order])
    # The run really was split into steps of different patch buckets.
    assert {shape[2] for shape in proc.padding_report()["shapes"]} == {0, 128, 256}
    np.testing.assert_allclose(out, alone[order], atol=1e-5, rtol=0)


def test_packed_rows_give_each_input_the_embedding_it_has_alone(checkpoint, model, alone):
    """data.pack_length: inputs packed into shared rows, each seeing only itself, with its own
    positions and images, embed as they do alone; and the rows hold far less padding."""
    items = make_items()
    order = [6, 0, 4, 2, 1, 5, 3, 0]
    proc = processor(checkpoint[1])
    embedder = Embedder(model, proc, mesh=None, batch_size=2, progress=False, pack_length=256)
    out = embedder([items[i] for i in order])
    np.testing.assert_allclose(out, alone[order], atol=1e-5, rtol=0)
    packed = proc.padding_report()
    assert all(shape[0] <= 2 and shape[1] == 256 for shape in packed["shapes"])
    assert packed["batches"] < 4  # 8 inputs in fewer than 4 steps of 2 rows: rows were shared
    one_per_row = processor(checkpoint[1])
    Embedder(model, one_per_row, mesh=None, batch_size=2, progress=False)(items)
    assert packed["token_padding_fraction"] < one_per_row.padding_report()["token_padding_fraction"]


def test_a_packed_step_has_only_the_rows_it_needs(checkpoint, model, alone):
    """Seven inputs pack into one step of the few rows they fill, not the batch's 16 rows of
    dummies, their images in vision rows of their own; the embeddings are unchanged."""
    items = make_items()
    proc = processor(checkpoint[1])
    embedder = Embedder(model, proc, mesh=None, batch_size=16, progress=False, pack_length=256)
    np.testing.assert_allclose(embedder(items), alone, atol=1e-5, rtol=0)
    encoded = [proc.encode(item) for item in items]
    needed = len(pack_rows(encoded, length=256))
    (step,) = embedder._plan(list(enumerate(encoded)))
    assert step.shape[3] == fine_bucket(needed, 1) < 16
    assert step.shape[4] == len(pack_vision(encoded, step.shape[1]))


@pytest.mark.parametrize(
    "mesh_shape, pack_length",
    [((8, 1, 1), 0), ((2, 2, 2), 0), ((2, 2, 2), 256)],
    ids=["data8", "data2fsdp2tp2", "data2fsdp2tp2-packed"],
)
def test_mesh_equals_single_device(checkpoint, alone, mesh_shape, pack_length):
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 simulated CPU devices"
    data, fsdp, tensor = mesh_shape
    mesh = distributed.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor))
    sharded = hf_io.load_model(checkpoint[1], mesh=mesh, rules=RULES)
    embedding = sharded.language_model.embed_tokens.value
    assert len(embedding.sharding.device_set) == 8
    embedder = Embedder(
        sharded,
        processor(checkpoint[1], "left"),
        mesh=mesh,
        rules=RULES,
        batch_size=8,
        progress=False,
        pack_length=pack_length,
    )
    out = embedder(make_items())
    np.testing.assert_allclose(out, alone, atol=1e-5, rtol=0)


def test_worker_processes_do_not_change_embeddings(checkpoint, model, alone):
    """Items encoded in 1 or 2 worker processes come back in order and bit-equal to the
    in-process run; however small the call, nothing is encoded in the main process, and one
    pool serves every call of a runner (of a stage)."""
    runs = []
    for count in (0, 1, 2):
        embedder = Embedder(
            model, processor(checkpoint[1]), mesh=None, batch_size=2, progress=False, workers=count
        )
        before = embedder.host_snapshot()
        runs.append(embedder(make_items()))
        executor = embedder.pool._executor
        runs[-1] = np.concatenate([runs[-1], embedder(make_items()[:2])])
        assert embedder.pool._executor is executor  # the same worker processes, both calls
        host = embedder.host_report(before)
        total = len(make_items()) + 2
        if count:
            assert (host["items_in_main"], host["items_in_workers"]) == (0, total), host
        else:
            assert (host["items_in_main"], host["items_in_workers"]) == (total, 0), host
        embedder.close()
    np.testing.assert_array_equal(runs[1], runs[0])
    np.testing.assert_array_equal(runs[2], runs[0])
    np.testing.assert_allclose(runs[0][: len(make_items())], alone, atol=1e-5, rtol=0)


def test_a_long_input_streams_through_a_bounded_window(checkpoint, model, alone):
    """300 inputs with a window of 2 batches of 4: at most 8 prepared inputs are held at
    once, and every result lands in its input's row."""
    items = make_items()
    order = np.random.default_rng(0).integers(0, len(items), size=300)
    embedder = Embedder(
        model, processor(checkpoint[1]), mesh=None, batch_size=4, progress=False, window=2
    )
    out = embedder([items[i] for i in order])
    assert 0 < embedder.peak_prepared <= 8
    np.testing.assert_allclose(out, alone[order], atol=1e-5, rtol=0)


def test_a_packed_window_holds_the_inputs_that_fill_its_rows(checkpoint, model, alone):
    """Packed, a window of 2 batches of 4 rows of 256 tokens holds inputs until their tokens
    fill those 8 rows (2,048 tokens): more inputs than 8, at most one more than fit."""
    items = make_items()
    order = np.random.default_rng(0).integers(0, len(items), size=100)
    proc = processor(checkpoint[1])
    lengths = [proc.encode(items[i]).length for i in order]
    embedder = Embedder(
        model, proc, mesh=None, batch_size=4, progress=False, window=2, pack_length=256
    )
    out = embedder([items[i] for i in order])
    assert 8 < embedder.peak_prepared <= 2048 // min(lengths) + 1
    np.testing.assert_allclose(out, alone[order], atol=1e-5, rtol=0)


def test_batch_sizes_are_per_device():
    """eval.batch_size / mine.batch_size count rows per device: a step of this process has
    that many rows for each of its devices on the batch axes."""
    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"))
    assert sharding.batch_devices(mesh, RULES, per_process=True) == 8
    assert rows_per_step(4, mesh, RULES) == 32
    assert rows_per_step(4, None, RULES) == 4


@pytest.mark.parametrize("pack_length", [0, 256], ids=["rows", "packed"])
def test_video_steps_are_their_own_and_an_agreed_frame_width_changes_nothing(
    checkpoint, model, alone, tmp_path, monkeypatch, pack_length
):
    """A video's patches are two frames wide: it gets steps of its own, so image steps keep one
    frame; and a step padded to the two frames another process's step needs (frames agreed
    across processes, simulated) embeds its images exactly as one frame wide."""
    frames = [assets.noise_image(56, 56, seed=10 + i) for i in range(4)]
    video = EmbedItem("a clip of noise", None, "candidate", video=frames)
    items = [*make_items(), video]
    proc = processor(checkpoint[1])
    embedder = Embedder(
        model, proc, mesh=None, batch_size=16, progress=False, pack_length=pack_length
    )
    video_alone = embedder([video])
    steps = embedder._plan(list(enumerate(proc.encode(item) for item in items)))
    widths = {
        tuple(sorted(i for row in step.indices for i in row)): step.shape[-1] for step in steps
    }
    assert widths[(7,)] == 2 and all(w == 1 for k, w in widths.items() if k != (7,)), widths
    np.testing.assert_allclose(
        embedder(items), np.concatenate([alone, video_alone]), atol=1e-5, rtol=0
    )

    # Another process's steps need two frames: every agreed step is two frames wide.
    real = distributed.max_across_processes

    def with_a_video_elsewhere(values):
        values = list(real(values))
        if len(values) > 2:  # the shapes, not (step count, any inputs)
            width = len(steps[0].shape)
            values[width - 1 :: width] = [2] * (len(values) // width)
        return tuple(values)

    monkeypatch.setattr(distributed, "max_across_processes", with_a_video_elsewhere)
    agreed = Embedder(
        model,
        processor(checkpoint[1]),
        mesh=None,
        batch_size=16,
        progress=False,
        pack_length=pack_length,
    )
    sent, dispatch = [], agreed._dispatch
    monkeypatch.setattr(
        agreed,
        "_dispatch",
        lambda batch: sent.append(batch["pixel_values"].shape[-1]) or dispatch(batch),
    )
    np.testing.assert_allclose(agreed(make_items()), alone, atol=1e-5, rtol=0)
    assert set(sent) == {2 * 588}, sent
