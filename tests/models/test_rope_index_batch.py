"""`positions.rope_index` (whole batch at once, numpy) against the per-row loop it replaced.

`loop_rope_index` below is g2e's former implementation, kept verbatim as the reference: on
random image batches, left- and right-padded, both give the same ids, and on random broken
batches (a grid too many or too few, a run of the wrong length) the same ValueError message.
Video runs and time intervals are checked against transformers in test_video.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from g2e.models import positions

IMAGE, PAD = 500, 0


def _runs(flags):
    if flags.size == 0:
        return []
    edges = np.flatnonzero(flags[1:] != flags[:-1]) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [flags.size]])
    return [(bool(flags[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def _image_position_ids(start, grid_thw, spatial_merge_size):
    t, h, w = grid_thw
    ids = np.meshgrid(
        np.arange(t),
        np.arange(h // spatial_merge_size),
        np.arange(w // spatial_merge_size),
        indexing="ij",
    )
    return np.stack([axis.reshape(-1) for axis in ids]) + start


def _example_position_ids(example, is_image, grids, spatial_merge_size):
    image_runs = [(s, e) for flag, s, e in _runs(is_image) if flag]
    if len(image_runs) != len(grids):
        raise ValueError(
            f"rope_index: example {example} has {len(image_runs)} runs of image tokens but "
            f"{len(grids)} image grids; images must be separated by text and each image "
            "given one (t, h, w) grid."
        )
    pieces, current, next_grid = [], 0, 0
    for flag, start, end in _runs(is_image):
        if not flag:
            pieces.append(np.broadcast_to(np.arange(end - start) + current, (3, end - start)))
            current += end - start
            continue
        grid = grids[next_grid]
        next_grid += 1
        t, h, w = grid
        expected = t * h * w // spatial_merge_size**2
        if end - start != expected:
            raise ValueError(
                f"rope_index: example {example}, image {next_grid - 1} with grid {grid} needs "
                f"{expected} image tokens but the sequence has {end - start}; expand each "
                "<|image_pad|> to t*h*w/4 tokens."
            )
        pieces.append(_image_position_ids(current, grid, spatial_merge_size))
        current += max(h, w) // spatial_merge_size
    return pieces


def loop_rope_index(input_ids, attention_mask, image_grid_thw, *, image_token_id, m=2):
    """The former per-row implementation (reference)."""
    batch, length = input_ids.shape
    position_ids = np.zeros((3, batch, length), np.int32)
    for b in range(batch):
        real = attention_mask[b].astype(bool)
        grids = [tuple(int(x) for x in g) for g in image_grid_thw[b]]
        pieces = _example_position_ids(b, input_ids[b][real] == image_token_id, grids, m)
        if pieces:
            position_ids[:, b, real] = np.concatenate(pieces, axis=1)
    return position_ids


def random_batch(rng, rows, *, length=None, side="right"):
    """input_ids, attention_mask and grids of `rows` random examples (0-3 images, 0-40 text
    tokens between them; some rows all padding)."""
    examples = []
    for _ in range(rows):
        ids, grids = [], []
        for _ in range(int(rng.integers(0, 4))):
            ids += rng.integers(1, IMAGE, int(rng.integers(1, 8))).tolist()
            grid = (
                int(rng.integers(1, 3)),
                2 * int(rng.integers(1, 5)),
                2 * int(rng.integers(1, 5)),
            )
            grids.append(grid)
            ids += [IMAGE] * (grid[0] * grid[1] * grid[2] // 4)
        ids += rng.integers(1, IMAGE, int(rng.integers(0, 40))).tolist()
        examples.append((ids, grids))
    length = length or max(1, max(len(ids) for ids, _ in examples))
    input_ids = np.full((rows, length), PAD, np.int64)
    mask = np.zeros((rows, length), np.int64)
    for b, (ids, _) in enumerate(examples):
        where = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[b, where] = ids
        mask[b, where] = 1
    return input_ids, mask, [grids for _, grids in examples]


@pytest.mark.parametrize("side", ["left", "right"])
def test_equals_the_loop_on_random_batches(side):
    rng = np.random.default_rng(0)
    for _ in range(30):
        input_ids, mask, grids = random_batch(rng, int(rng.integers(1, 12)), side=side)
        expected = loop_rope_index(input_ids, mask, grids, image_token_id=IMAGE)
        got = positions.rope_index(input_ids, mask, grids, image_token_id=IMAGE)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, expected)


def _outcome(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except ValueError as error:
        return str(error)


def test_same_errors_as_the_loop_on_broken_batches():
    """Each batch is broken in one or two rows (a grid dropped, added or resized): the error
    names the same example, image and counts."""
    rng = np.random.default_rng(1)
    errors = 0
    for _ in range(60):
        input_ids, mask, grids = random_batch(rng, 6)
        for row in rng.choice(6, size=int(rng.integers(1, 3)), replace=False):
            row_grids = list(grids[row])
            change = rng.integers(0, 3)
            if change == 0 and row_grids:
                row_grids.pop(int(rng.integers(0, len(row_grids))))
            elif change == 1:
                row_grids.append((1, 2, 2))
            elif row_grids:
                i = int(rng.integers(0, len(row_grids)))
                t, h, w = row_grids[i]
                row_grids[i] = (t, h + 2, w)
            grids[row] = row_grids
        expected = _outcome(loop_rope_index, input_ids, mask, grids, image_token_id=IMAGE)
        got = _outcome(positions.rope_index, input_ids, mask, grids, image_token_id=IMAGE)
        if isinstance(expected, str):
            errors += 1
            assert got == expected
        else:
            np.testing.assert_array_equal(got, expected)
    assert errors > 30  # the broken batches really are refused, most of them
