"""Packed batches keep their patches in vision rows of their own (g2e.data.batching): text rows
are filled by tokens alone, merged_token_index finds each vision token's patches, also after
widening, and the padding share counts the vision rows."""

import numpy as np
import pytest

from g2e.data.batching import Batcher, Encoded, fine_bucket, pack_rows, pack_vision

IMAGE, PAD, TEXT = 7, 0, 11


def encoded(tokens: int, grid: tuple[int, int] | None, seed: int) -> Encoded:
    """An example of `tokens` text tokens and, with `grid` (h, w) patches, one image whose
    merged tokens come after the first text token; patch values are distinct per example."""
    rng = np.random.default_rng(seed)
    merged = 0 if grid is None else grid[0] * grid[1] // 4
    ids = np.full(tokens + merged, TEXT + seed, np.int32)
    ids[1 : 1 + merged] = IMAGE
    patches = 0 if grid is None else grid[0] * grid[1]
    return Encoded(
        input_ids=ids,
        pixel_values=rng.integers(0, 256, (patches, 588), dtype=np.uint8),
        image_grid_thw=[] if grid is None else [(1, *grid)],
    )


def batcher() -> Batcher:
    return Batcher(
        pad_token_id=PAD,
        image_token_id=IMAGE,
        merge_size=2,
        patch_bytes=588,
        length_buckets=(64, 128, 256),
        patch_buckets=(0, 64, 128),
    )


def patches_of_vision_tokens(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """For every vision token of every text row, in order, the 4 patches its merged token covers."""
    rows, patches = batch["pixel_values"].shape[:2]
    flat = batch["pixel_values"].reshape(rows * patches // 4, 4, -1)
    where = batch["input_ids"] == IMAGE
    return [flat[i] for i in batch["merged_token_index"][where]]


@pytest.fixture
def examples() -> list[Encoded]:
    # Image examples of 16 merged tokens (64 patches) or 12 (48), and two text-only ones.
    grids = [(8, 8), (6, 8), (8, 8), (6, 8), (8, 8), None, None]
    return [encoded(20, grid, seed) for seed, grid in enumerate(grids)]


def test_text_rows_fill_with_tokens_whatever_the_patches(examples):
    """Seven examples of 20-36 tokens fit one text row of 256 although their images (288
    patches) fill three vision rows of 128: the rows are not bounded by patches."""
    rows = pack_rows(examples, length=256)
    assert len(rows) == 1
    vision = pack_vision(examples, 128)
    assert sorted(i for row in vision for i in row) == [0, 1, 2, 3, 4]
    assert len(vision) == 3 and all(
        sum(examples[i].num_patches for i in row) <= 128 for row in vision
    )
    b = batcher()
    batch = b.pack(
        [[examples[i] for i in rows[0]]], pad_to_batch=1, length=256, num_patches=128, segments=8
    )
    assert batch["input_ids"].shape == (1, 256) and batch["pixel_values"].shape == (3, 128, 588)
    report = b.padding_report(skipped=0)
    real = sum(e.length for e in examples)
    assert report["token_padding_fraction"] == pytest.approx(1 - real / 256)
    assert report["patch_padding_fraction"] == pytest.approx(1 - 288 / (3 * 128))


def test_each_vision_token_names_its_own_patches_also_after_widening(examples):
    """merged_token_index points every vision token at the 4 patches its image put there, in
    the order the image processor lays them; widening to more text rows, wider vision rows and
    more of them keeps it so (vision row v's tokens move to v * P' / 4)."""
    rows = [[examples[i] for i in row] for row in pack_rows(examples, length=64)]
    b = batcher()
    batch = b.pack(rows, pad_to_batch=8, length=64, num_patches=128, segments=4, vision_rows=4)
    expected = []
    for row in rows:
        for item in row:
            blocks = item.pixel_values.reshape(-1, 4, 588)
            expected += list(blocks)  # its merged tokens, in text order
    # Text rows in order, each row's segments in order: as the batch lays them out.
    got = patches_of_vision_tokens(batch)
    assert len(got) == len(expected) == 72
    np.testing.assert_array_equal(np.stack(got), np.stack(expected))
    wide = b.widen_packed(batch, rows=16, num_patches=256, segments=8, vision_rows=6)
    assert wide["pixel_values"].shape == (6, 256, 588) and wide["input_ids"].shape == (16, 64)
    np.testing.assert_array_equal(np.stack(patches_of_vision_tokens(wide)), np.stack(expected))
    # The vision layout follows its patches: each image is one attention segment of its size.
    seg = wide["vision_segment_ids"]
    sizes = [int((row == s).sum()) for row in seg for s in np.unique(row[row > 0])]
    assert sorted(sizes) == sorted(e.num_patches for e in examples if e.num_patches)


def test_vision_shape_is_the_fewest_rows_of_the_given_size(examples):
    """Rows of the configured size unless the largest image needs a larger bucket (with `fit`,
    the multiple of that bucket with the fewest slots); with no image, no patches and one row
    per device."""
    b = batcher()
    assert b.vision_shape(examples, 128) == (128, 3)
    assert b.vision_shape(examples, 256) == (256, 2)
    assert b.vision_shape(examples, 32) == (64, 5)  # a 64-patch image needs rows of 64
    assert b.vision_shape(examples, 0) == (64, 5)  # 0: as wide as the largest image's bucket
    # fit (training): of 64, 128, 192 and 256 patches a row, the fewest slots (64 x 5).
    assert b.vision_shape(examples, 256, fit=True) == (64, 5)
    three = [encoded(20, (6, 6), seed) for seed in range(3)]  # 108 patches
    assert b.vision_shape(three, 256, fit=True) == (128, 1)  # not 3 rows of 64
    assert b.vision_shape(three, 256) == (256, 1)
    assert b.vision_shape(examples, 256, multiple=4) == (256, 4)
    assert b.vision_shape(examples[5:], 256) == (0, 1)
    assert b.vision_shape(examples[5:], 256, multiple=2) == (0, 2)


def test_fine_bucket_wastes_at_most_a_quarter():
    for multiple in (1, 2, 8):
        for count in range(1, 300):
            rows = fine_bucket(count, multiple)
            assert rows >= count and rows % multiple == 0
            assert rows - count < max(rows / 4, multiple) + 1e-9
    assert len({fine_bucket(n, 1) for n in range(1, 129)}) <= 4 * 7 + 1


def test_each_process_indexes_its_own_vision_rows_in_the_global_batch(examples):
    """put_batch lays the processes' rows one after another: process 1's vision tokens must
    name its own patches in the concatenated vision rows, not process 0's."""
    b = batcher()
    shares = [examples[:3], examples[3:]]
    local = [
        b.for_process(
            b.pack([share], pad_to_batch=1, length=256, num_patches=128, segments=4, vision_rows=2),
            process,
        )
        for process, share in enumerate(shares)
    ]
    merged = {key: np.concatenate([batch[key] for batch in local]) for key in local[0]}
    expected = [block for e in examples for block in e.pixel_values.reshape(-1, 4, 588)]
    np.testing.assert_array_equal(np.stack(patches_of_vision_tokens(merged)), np.stack(expected))
