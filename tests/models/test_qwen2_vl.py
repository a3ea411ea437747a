"""End-to-end parity of g2e's Qwen2VL with transformers' PyTorch Qwen2VLForConditionalGeneration.

Checkpoints are written by transformers from random configs (normal(0, 0.05) weights) and read
back with g2e.models.hf_io.load_model; batches are built on the host with g2e.models.positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from g2e.models import hf_io, positions
from tests.models import checkpoints

# Cases: per example, pieces that are ints (that many text tokens) or (t, h, w) image grids.
CASES = {
    "text_only": ([[9], [13]], "right"),
    "one_image": ([[5, (1, 4, 6), 7]], "right"),
    "two_images_of_different_sizes": ([[4, (1, 8, 4), 3, (1, 6, 10), 5]], "right"),
    "mixed_batch_left_padded": ([[3, (1, 4, 4), 6], [11], [2, (1, 2, 6), 1, (1, 4, 2), 3]], "left"),
}


def make_batch(config, examples, side, rng, *, length_pad=2, patch_pad=8):
    """Builds g2e's host batch and transformers' inputs for the same examples.

    Returns:
        (batch dict of numpy arrays, hf kwargs of torch tensors).
    """
    image_id = config.image_token_id
    seqs, grids, pixels = [], [], []
    for pieces in examples:
        ids, example_grids, example_pixels = [], [], []
        for piece in pieces:
            if isinstance(piece, int):
                ids += rng.integers(0, image_id - 10, piece).tolist()
            else:
                t, h, w = piece
                example_grids.append(piece)
                ids += [image_id] * (t * h * w // 4)
                example_pixels.append(rng.normal(size=(t * h * w, config.vision.patch_dim)))
        seqs.append(ids)
        grids.append(example_grids)
        pixels.append(example_pixels)
    batch_size = len(examples)
    length = max(len(s) for s in seqs) + length_pad
    num_patches = max(sum(p.shape[0] for p in ex) for ex in pixels)
    num_patches = num_patches + patch_pad if num_patches else 0
    pad_id = config.bos_token_id
    input_ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    pixel_values = np.zeros((batch_size, num_patches, config.vision.patch_dim), np.float32)
    segment_ids = np.zeros((batch_size, num_patches), np.int32)
    vision_pos = np.zeros((batch_size, num_patches, 2), np.int32)
    for b, ids in enumerate(seqs):
        where = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[b, where] = ids
        mask[b, where] = 1
        if pixels[b]:
            flat = np.concatenate(pixels[b])
            pixel_values[b, : len(flat)] = flat
            vision_pos[b], segment_ids[b] = positions.vision_layout(grids[b], num_patches)
    is_image = input_ids == image_id
    image_token_index = np.where(is_image, np.cumsum(is_image, axis=1) - 1, 0).astype(np.int32)
    last_index = (length - 1 if side == "left" else mask.sum(1) - 1) * np.ones(batch_size)
    batch = dict(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions.rope_index(input_ids, mask, grids, image_token_id=image_id),
        pixel_values=pixel_values,
        vision_segment_ids=segment_ids,
        vision_positions=vision_pos,
        image_token_index=image_token_index,
        last_index=last_index.astype(np.int32),
    )
    flat_grids = [g for example in grids for g in example]
    hf = dict(
        input_ids=torch.from_numpy(input_ids.astype(np.int64)),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
        mm_token_type_ids=torch.from_numpy(is_image.astype(np.int64)),
    )
    if flat_grids:
        hf["pixel_values"] = torch.from_numpy(
            np.concatenate([p for ex in pixels for p in ex]).astype(np.float32)
        )
        hf["image_grid_thw"] = torch.tensor(flat_grids)
    return batch, hf


def hf_reference(hf_model, hf_inputs):
    """transformers' position ids [3, B, L], last hidden states and full logits."""
    with torch.no_grad():
        position_ids, _ = hf_model.model.get_rope_index(
            hf_inputs["input_ids"],
            mm_token_type_ids=hf_inputs["mm_token_type_ids"],
            image_grid_thw=hf_inputs.get("image_grid_thw"),
            attention_mask=hf_inputs["attention_mask"],
        )
        out = hf_model(**hf_inputs, position_ids=position_ids, output_hidden_states=True)
    return position_ids.numpy(), out.hidden_states[-1].numpy(), out.logits.numpy()


@jax.jit
def forward(model, batch):
    hidden = model(batch)
    return hidden, model.logits_at(hidden, batch["last_index"]), model.embed(batch)


def check_parity(model, hf_model, batch, hf_inputs, atol):
    hf_positions, hf_hidden, hf_logits = hf_reference(hf_model, hf_inputs)
    np.testing.assert_array_equal(batch["position_ids"], hf_positions)
    hidden, logits, embeddings = jax.device_get(forward(model, batch))
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(hidden[real], hf_hidden[real], atol=atol, rtol=0)
    rows = np.arange(len(real))
    np.testing.assert_allclose(logits, hf_logits[rows, batch["last_index"]], atol=atol, rtol=0)
    pooled = hf_hidden[rows, batch["last_index"]]
    print(
        f"parity max |g2e - transformers|: hidden "
        f"{np.abs(hidden[real] - hf_hidden[real]).max():.2e}, logits "
        f"{np.abs(logits - hf_logits[rows, batch['last_index']]).max():.2e}"
    )
    np.testing.assert_allclose(
        embeddings, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True), atol=atol, rtol=0
    )
    assert logits.shape == (len(real), model.config.text.vocab_size)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf_model, path = checkpoints.make_hf_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1)
    return hf_model, hf_io.load_model(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_parity(tiny, case):
    hf_model, model = tiny
    examples, side = CASES[case]
    batch, hf_inputs = make_batch(model.config, examples, side, np.random.default_rng(0))
    check_parity(model, hf_model, batch, hf_inputs, atol=1e-4)


def test_tied_head_parity(tmp_path):
    hf_model, path = checkpoints.make_hf_checkpoint(tmp_path, tie_word_embeddings=True, seed=2)
    model = hf_io.load_model(path)
    assert model.lm_head is None
    batch, hf_inputs = make_batch(model.config, *CASES["one_image"], np.random.default_rng(1))
    check_parity(model, hf_model, batch, hf_inputs, atol=1e-4)


@jax.jit
def logits_at_positions(model, batch, chosen):
    return model.logits_at(model(batch), chosen)


def check_logits_at_several_positions(model, hf_model, batch, hf_inputs):
    """`model.logits_at(hidden, positions [B, Q])` equals transformers' logits at those
    positions: the first real token, an image token where the row has one, the last real token
    and one position in between, per row (left padding shifts them all)."""
    _, _, hf_logits = hf_reference(hf_model, hf_inputs)
    mask = batch["attention_mask"].astype(bool)
    is_image = batch["input_ids"] == model.config.image_token_id
    chosen = []
    for row in range(len(mask)):
        real = np.flatnonzero(mask[row])
        image = np.flatnonzero(is_image[row])
        middle = real[len(real) // 2]
        chosen.append([real[-1], real[0], image[-1] if image.size else middle, middle])
    chosen = np.asarray(chosen, np.int32)  # [B, Q], in no particular order
    logits = jax.device_get(logits_at_positions(model, batch, jnp.asarray(chosen)))
    expected = np.take_along_axis(hf_logits, chosen[..., None], axis=1)
    assert logits.shape == expected.shape == (*chosen.shape, model.config.text.vocab_size)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    # The rows differ by far more than the tolerance, so a shifted position would show.
    assert np.abs(expected[:, 0] - expected[:, 1]).max(-1).min() > 1e-2


def test_logits_at_several_positions(tiny):
    hf_model, model = tiny
    examples, side = CASES["mixed_batch_left_padded"]
    batch, hf_inputs = make_batch(model.config, examples, side, np.random.default_rng(2))
    check_logits_at_several_positions(model, hf_model, batch, hf_inputs)


@pytest.mark.slow
def test_2b_widths_parity(tmp_path):
    """Qwen2-VL-2B widths, 2 layers each (reduced vocab: the real one only slows the test)."""
    hf_model, path = checkpoints.make_hf_checkpoint(tmp_path, widths="2b", seed=3)
    model = hf_io.load_model(path)
    examples = [[3, (1, 4, 6), 6], [2, (1, 4, 4), 3, (1, 2, 4), 4]]
    batch, hf_inputs = make_batch(model.config, examples, "left", np.random.default_rng(3))
    check_parity(model, hf_model, batch, hf_inputs, atol=1e-4)
