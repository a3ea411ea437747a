"""Host-side (numpy) position ids for Qwen2-VL: text M-RoPE ids and vision patch layout.

Letters: the legend of `g2e.models`.

`rope_index` reproduces transformers' `Qwen2VLModel.get_rope_index` (transformers 5.x)
exactly. That version keys on the image tokens themselves (its `mm_token_type_ids` is 1 where
`input_ids == image_token_id`), not on `<|vision_start|>`, so sequences without vision-start
tokens — g2e's prompts — get the same ids as the released model. Per example, over the real
(attention_mask == 1) tokens only:
  * a run of text tokens continues a 1-D counter on all three axes;
  * a run of image tokens is one image with grid (t, h, w) in patches: its merged tokens get
    (temporal, row, col) = (start + i_t, start + i_h, start + i_w) over the (t, h/2, w/2) grid,
    and the counter then advances by max(h, w) / 2 (not by the token count);
  * padding positions are 0 (transformers 5 initialises the ids with zeros).

`vision_layout` gives, for one example's images concatenated in patch order as the HF image
processor emits them, the (row, col) rotary position of each patch in 2x2 merge-window order
(transformers' `get_vision_position_ids`) and the attention segment of each patch (one segment
per image frame, as HF's `cu_seqlens`; 0 for padding). `vision_window_ids` gives Qwen2.5-VL's
attention windows as segment ids over the same patch order (see its docstring for why the
patches are not reordered as transformers does).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

GridTHW = tuple[int, int, int]


def _runs(flags: np.ndarray) -> list[tuple[bool, int, int]]:
    """Splits a 1-D bool array into maximal runs: [(value, start, end)]."""
    if flags.size == 0:
        return []
    edges = np.flatnonzero(flags[1:] != flags[:-1]) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [flags.size]])
    return [(bool(flags[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def _image_position_ids(start: int, grid_thw: GridTHW, spatial_merge_size: int) -> np.ndarray:
    """[3, t*h*w/m^2] (temporal, row, col) ids of one image's merged tokens, offset by start."""
    t, h, w = grid_thw
    ids = np.meshgrid(
        np.arange(t),
        np.arange(h // spatial_merge_size),
        np.arange(w // spatial_merge_size),
        indexing="ij",
    )
    return np.stack([axis.reshape(-1) for axis in ids]) + start


def rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    image_grid_thw: Sequence[Sequence[GridTHW]],
    *,
    image_token_id: int,
    spatial_merge_size: int = 2,
) -> np.ndarray:
    """M-RoPE position ids, equal to transformers' `Qwen2VLModel.get_rope_index`.

    Args:
      input_ids: int [B, L], left- or right-padded; each image's `<|image_pad|>` tokens are
        expanded to t*h*w / spatial_merge_size**2 tokens.
      attention_mask: [B, L], 1 on real tokens.
      image_grid_thw: per example, the (t, h, w) patch grid of each of its images, in order.
      image_token_id: id of `<|image_pad|>`.
      spatial_merge_size: side of the patch merge window (2 for Qwen2-VL).

    Returns:
      int32 [3, B, L] (temporal, height, width) position ids; 0 on padding.

    Raises:
      ValueError: if shapes disagree, or an example's image-token runs do not match its grids
        (count of images or tokens per image).
    """
    input_ids = np.asarray(input_ids)
    attention_mask = np.asarray(attention_mask)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"rope_index: input_ids {input_ids.shape} and attention_mask "
            f"{attention_mask.shape} must both be [B, L]."
        )
    if len(image_grid_thw) != input_ids.shape[0]:
        raise ValueError(
            f"rope_index: image_grid_thw has {len(image_grid_thw)} examples, "
            f"input_ids has {input_ids.shape[0]}; pass one list of grids per example."
        )
    batch, length = input_ids.shape
    position_ids = np.zeros((3, batch, length), np.int32)
    for b in range(batch):
        real = attention_mask[b].astype(bool)
        grids = [tuple(int(x) for x in g) for g in image_grid_thw[b]]
        pieces = _example_position_ids(
            b, input_ids[b][real] == image_token_id, grids, spatial_merge_size
        )
        if pieces:
            position_ids[:, b, real] = np.concatenate(pieces, axis=1)
    return position_ids


def _example_position_ids(
    example: int, is_image: np.ndarray, grids: list[GridTHW], spatial_merge_size: int
) -> list[np.ndarray]:
    """[3, n] position pieces of one example's real tokens, text runs and image runs in order."""
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


def rope_deltas(position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """int32 [B]: max real position + 1 - number of real tokens (HF's `mrope_position_deltas`).

    Decoding token n (0-based, counting real tokens) after the prompt uses position n + delta
    on all three axes. All-padding rows get 0.
    """
    mask = np.asarray(attention_mask).astype(bool)
    masked = np.where(mask[None], position_ids, -1).max(axis=(0, 2))
    deltas = masked + 1 - mask.sum(axis=1)
    return np.where(mask.any(axis=1), deltas, 0).astype(np.int32)


def vision_positions(grid_thw: GridTHW, spatial_merge_size: int = 2) -> np.ndarray:
    """int32 [t*h*w, 2] (row, col) of each patch of one image in the processor's patch order.

    The HF image processor emits patches window by window (each merge window's m*m patches
    consecutive, windows in row-major order), repeated per temporal frame. Read-only: one
    array per grid is kept (a batch's images mostly share a few grids).
    """
    return _vision_positions(tuple(int(x) for x in grid_thw), spatial_merge_size)


@functools.lru_cache(maxsize=1024)
def _vision_positions(grid_thw: tuple[int, int, int], spatial_merge_size: int) -> np.ndarray:
    t, h, w = grid_thw
    m = spatial_merge_size
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // m, m, w // m, m)
    rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    out = np.tile(np.stack([rows, cols], axis=-1), (t, 1)).astype(np.int32)
    out.setflags(write=False)
    return out


def _check_grids(
    caller: str, grid_thws: Sequence[GridTHW], num_patches: int, spatial_merge_size: int
) -> None:
    """Raises ValueError if a grid does not divide into merge windows or the patches exceed P."""
    for grid in grid_thws:
        if int(grid[1]) % spatial_merge_size or int(grid[2]) % spatial_merge_size:
            raise ValueError(
                f"{caller}: grid {grid} is not divisible by the merge size "
                f"{spatial_merge_size}; resize images to multiples of 28 pixels."
            )
    total = sum(int(g[0]) * int(g[1]) * int(g[2]) for g in grid_thws)
    if total > num_patches:
        raise ValueError(
            f"{caller}: images {list(grid_thws)} have {total} patches, more "
            f"than num_patches={num_patches}; use a larger patch bucket."
        )


def vision_layout(
    grid_thws: Sequence[GridTHW],
    num_patches: int,
    spatial_merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Patch positions and attention segments of one example's images, padded to num_patches.

    Args:
      grid_thws: (t, h, w) patch grid of each image, in the order their patches are concatenated.
      num_patches: P, the padded patch count (a multiple of spatial_merge_size**2).
      spatial_merge_size: side of the merge window.

    Returns:
      positions: int32 [P, 2] (row, col) rotary positions; 0 on padding.
      segment_ids: int32 [P]; 1, 2, ... for each image frame in order, 0 on padding.

    Raises:
      ValueError: if a grid is not divisible by the merge window or the patches exceed P.
    """
    _check_grids("vision_layout", grid_thws, num_patches, spatial_merge_size)
    positions = np.zeros((num_patches, 2), np.int32)
    segment_ids = np.zeros((num_patches,), np.int32)
    offset, segment = 0, 0
    for grid in grid_thws:
        t, h, w = (int(x) for x in grid)
        count = t * h * w
        positions[offset : offset + count] = vision_positions((t, h, w), spatial_merge_size)
        frame_segments = segment + 1 + np.repeat(np.arange(t), h * w)
        segment_ids[offset : offset + count] = frame_segments
        offset += count
        segment += t
    return positions, segment_ids


def vision_window_ids(
    grid_thws: Sequence[GridTHW],
    num_patches: int,
    window_merged: int,
    spatial_merge_size: int = 2,
) -> np.ndarray:
    """Qwen2.5-VL attention windows of one example's patches, as segment ids, padded to P.

    Per image frame, the (h/m, w/m) grid of merged units is cut from the top-left into windows
    of window_merged x window_merged units; where the grid does not divide, the windows on the
    bottom and right edges are smaller (transformers' `get_vision_window_index`).

    transformers gathers each window's units together before the blocks and undoes that order
    after the merger. g2e keeps the processor's patch order instead: attention under a segment
    mask does not depend on the order of the tokens, rotary positions travel with their patch,
    and a merged unit's m*m patches are consecutive in both orders, so the result is the same
    and the device needs neither the permutation nor its inverse (image_token_index and
    pixel_values stay exactly as for Qwen2-VL).

    Args:
      grid_thws: (t, h, w) patch grid of each image, in the order their patches are concatenated.
      num_patches: P, the padded patch count.
      window_merged: window side in merged units (`VisionConfig.window_merged`, i.e.
        window_size // spatial_merge_size // patch_size: 4 for Qwen2.5-VL's 112 pixels).
      spatial_merge_size: side of the merge window.

    Returns:
      int32 [P]: 1, 2, ... one id per window (distinct across frames and images), 0 on padding.

    Raises:
      ValueError: as `vision_layout`, or if window_merged < 1.
    """
    if window_merged < 1:
        raise ValueError(f"vision_window_ids: window_merged={window_merged} must be >= 1.")
    _check_grids("vision_window_ids", grid_thws, num_patches, spatial_merge_size)
    window_ids = np.zeros((num_patches,), np.int32)
    side = window_merged * spatial_merge_size  # window side in patches
    offset, first_id = 0, 1
    for grid in grid_thws:
        t, h, w = (int(x) for x in grid)
        rows, cols = vision_positions((t, h, w), spatial_merge_size).T
        windows_across = -(-w // side)
        windows_per_frame = -(-h // side) * windows_across
        frame = np.repeat(np.arange(t), h * w)
        local = (rows // side) * windows_across + cols // side
        window_ids[offset : offset + t * h * w] = first_id + frame * windows_per_frame + local
        offset += t * h * w
        first_id += t * windows_per_frame
    return window_ids
