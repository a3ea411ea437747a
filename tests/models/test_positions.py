"""g2e.models.positions against transformers' Qwen2-VL position code (exact equality)."""

import numpy as np
import pytest
import torch
import transformers
from transformers import vision_utils

from g2e.models import positions
from tests.models import checkpoints

IMAGE = checkpoints.TINY_VOCAB - 4
PAD = checkpoints.TINY_VOCAB - 8


@pytest.fixture(scope="module")
def hf_model():
    config = transformers.Qwen2VLConfig(**checkpoints.hf_config_dict("tiny", num_layers=1))
    return transformers.Qwen2VLModel(config).eval()


def _example(rng, pieces):
    """pieces: ints (that many text tokens) or (t, h, w) grids (an image's expanded tokens)."""
    ids, grids = [], []
    for piece in pieces:
        if isinstance(piece, int):
            ids += rng.integers(0, IMAGE - 10, piece).tolist()
        else:
            grids.append(piece)
            ids += [IMAGE] * (piece[0] * piece[1] * piece[2] // 4)
    return ids, grids


def _batch(examples, side):
    length = max(len(ids) for ids, _ in examples) + 2
    input_ids = np.full((len(examples), length), PAD, np.int64)
    mask = np.zeros((len(examples), length), np.int64)
    for b, (ids, _) in enumerate(examples):
        where = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[b, where] = ids
        mask[b, where] = 1
    return input_ids, mask, [grids for _, grids in examples]


def _hf_rope_index(model, input_ids, mask, grids):
    flat = [g for example in grids for g in example]
    ids = torch.from_numpy(input_ids)
    hf_ids, hf_deltas = model.get_rope_index(
        ids,
        mm_token_type_ids=(ids == IMAGE).int(),
        image_grid_thw=torch.tensor(flat) if flat else None,
        attention_mask=torch.from_numpy(mask),
    )
    return hf_ids.numpy(), hf_deltas.numpy()[:, 0]


CASES = {
    "text_only": [[7], [12], [3]],
    "one_image": [[5, (1, 4, 6), 9]],
    "two_images": [[4, (1, 8, 4), 3, (1, 6, 10), 6], [2, (1, 4, 4), 1, (1, 2, 2), 2]],
    "mixed": [[6], [3, (1, 10, 4), 5], [2, (1, 4, 6), 4, (1, 8, 8), 3], [(1, 6, 6), 4]],
}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_rope_index_equals_transformers(hf_model, case, side):
    rng = np.random.default_rng(0)
    examples = [_example(rng, pieces) for pieces in CASES[case]]
    input_ids, mask, grids = _batch(examples, side)
    ours = positions.rope_index(input_ids, mask, grids, image_token_id=IMAGE)
    expected, expected_deltas = _hf_rope_index(hf_model, input_ids, mask, grids)
    assert ours.dtype == np.int32 and ours.shape == (3,) + input_ids.shape
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(positions.rope_deltas(ours, mask), expected_deltas)


def test_rope_index_same_real_ids_for_either_padding_side():
    rng = np.random.default_rng(1)
    examples = [_example(rng, pieces) for pieces in CASES["mixed"]]
    by_side = {}
    for side in ("left", "right"):
        input_ids, mask, grids = _batch(examples, side)
        ids = positions.rope_index(input_ids, mask, grids, image_token_id=IMAGE)
        by_side[side] = [ids[:, b, mask[b] == 1] for b in range(len(examples))]
    for left, right in zip(by_side["left"], by_side["right"]):
        np.testing.assert_array_equal(left, right)


def test_rope_index_rejects_token_grid_mismatch():
    rng = np.random.default_rng(2)
    input_ids, mask, grids = _batch([_example(rng, [3, (1, 4, 4), 2])], "right")
    with pytest.raises(ValueError, match="needs 6 image tokens but the sequence has 4"):
        positions.rope_index(input_ids, mask, [[(1, 4, 6)]], image_token_id=IMAGE)
    with pytest.raises(ValueError, match="1 runs of image tokens but 2 image grids"):
        positions.rope_index(input_ids, mask, [[(1, 4, 4), (1, 4, 4)]], image_token_id=IMAGE)


def test_vision_layout_matches_transformers():
    grids = [(1, 4, 6), (1, 8, 4), (2, 2, 2)]
    num_patches = 24 + 32 + 8 + 12
    pos, seg = positions.vision_layout(grids, num_patches)
    expected_pos = vision_utils.get_vision_position_ids(torch.tensor(grids), 2).numpy()
    cu_seqlens = vision_utils.get_vision_cu_seqlens(torch.tensor(grids)).numpy()
    real = int(cu_seqlens[-1])
    assert pos.dtype == np.int32 and seg.dtype == np.int32
    np.testing.assert_array_equal(pos[:real], expected_pos)
    np.testing.assert_array_equal(pos[real:], 0)
    # One segment per HF attention chunk (per image frame), numbered from 1; 0 on padding.
    expected_seg = np.zeros(num_patches, np.int32)
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
        expected_seg[start:end] = i + 1
    np.testing.assert_array_equal(seg, expected_seg)


def test_vision_layout_rejects_overflow_and_odd_grids():
    with pytest.raises(ValueError, match="larger patch bucket"):
        positions.vision_layout([(1, 4, 4), (1, 4, 4)], 24)
    with pytest.raises(ValueError, match="not divisible"):
        positions.vision_layout([(1, 3, 4)], 24)
