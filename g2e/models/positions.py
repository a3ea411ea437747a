"""Host-side (numpy) position ids for Qwen2-VL: text M-RoPE ids and vision patch layout.

Letters: the legend of `g2e.models`.

`rope_index` reproduces transformers' `get_rope_index` of Qwen2-VL and Qwen2.5-VL
(transformers 5.x) exactly. That version keys on the vision tokens themselves (its
`mm_token_type_ids`: 1 where `input_ids == image_token_id`, 2 where `== video_token_id`), not on
`<|vision_start|>`, so sequences without vision-start tokens — g2e's prompts — get the same ids
as the released model. Per example, over the real (attention_mask == 1) tokens only:
  * a run of text tokens continues a 1-D counter on all three axes;
  * a run of image (or video) tokens is one input with grid (t, h, w) in patches: its merged
    tokens get (temporal, row, col) = (start + floor(i_t * interval), start + i_h,
    start + i_w) over the (t, h/2, w/2) grid, and the counter then advances by max(h, w) / 2
    (not by the token count, nor by t). interval is 1, except for Qwen2.5-VL videos:
    tokens_per_second * seconds per temporal group (time-aligned ids);
  * padding positions are 0 (transformers 5 initialises the ids with zeros).
transformers loops over the rows; g2e computes the whole batch with array operations (the
host builds ids for 2,048-row steps), and raises the errors the per-row loop raised.

`vision_layout` gives, for one example's images concatenated in patch order as the HF image
processor emits them, the (row, col) rotary position of each patch in 2x2 merge-window order
(transformers' `get_vision_position_ids`) and the attention segment of each patch (one segment
per image and per temporal group of a video, as HF's `cu_seqlens`; 0 for padding). `vision_window_ids` gives Qwen2.5-VL's
attention windows as segment ids over the same patch order (see its docstring for why the
patches are not reordered as transformers does).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

GridTHW = tuple[int, int, int]


def rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    image_grid_thw: Sequence[Sequence[GridTHW]],
    *,
    image_token_id: int,
    video_token_id: int | None = None,
    time_intervals: Sequence[Sequence[float]] | None = None,
    spatial_merge_size: int = 2,
) -> np.ndarray:
    """M-RoPE position ids, equal to transformers' `get_rope_index` (Qwen2-VL and Qwen2.5-VL).

    Computed for the whole batch at once (no loop over rows): the real tokens are flattened
    row after row, cut into runs of one kind (text, image, video) where the row or the kind
    changes, and each run's start position is a cumulative sum of the advances before it in
    its row.

    Args:
      input_ids: int [B, L], left- or right-padded; each image's `<|image_pad|>` (each
        video's `<|video_pad|>`) tokens are expanded to t*h*w / spatial_merge_size**2 tokens.
      attention_mask: [B, L], 1 on real tokens.
      image_grid_thw: per example, the (t, h, w) patch grid of each of its visual inputs
        (images and videos alike), in the order of their token runs.
      image_token_id: id of `<|image_pad|>`.
      video_token_id: id of `<|video_pad|>` (None: no video tokens).
      time_intervals: per example, per visual input (as `image_grid_thw`), the step of the
        temporal id between two temporal patch groups before it is floored: 1 for images
        and Qwen2-VL videos, tokens_per_second * seconds per group for Qwen2.5-VL videos
        (float32, as transformers computes it). None: 1 everywhere.
      spatial_merge_size: side of the patch merge window (2 for Qwen2-VL).

    Returns:
      int32 [3, B, L] (temporal, height, width) position ids; 0 on padding.

    Raises:
      ValueError: if shapes disagree, or an example's vision-token runs do not match its grids
        (count of inputs or tokens per input).
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
    real = np.flatnonzero(attention_mask)  # flat indices of the real tokens, row after row
    tokens = input_ids.reshape(-1)[real]
    kinds = (tokens == image_token_id).astype(np.int8)
    if video_token_id is not None:
        kinds[tokens == video_token_id] = 2
    runs = _Runs.of(real // length, kinds)
    m = spatial_merge_size
    merged, steps = _vision_grids(runs, image_grid_thw, time_intervals, m)
    vision = runs.kind > 0
    # Text runs advance the counter by their length, vision runs by max(h, w) / m.
    advance = np.where(vision, merged[:, 1:].max(axis=1), runs.length)
    before = np.cumsum(advance) - advance
    run_start = before - before[runs.first_of_row]
    # Each token's place in its run: text counts on from the run's start on all three axes;
    # a vision token reads its (t, h, w) ids from its grid's table, offset by the run's start.
    run = runs.of_token
    offset = np.arange(tokens.size, dtype=np.int64) - runs.start[run]
    ids = np.broadcast_to((offset + run_start[run]).astype(np.int32), (3, tokens.size)).copy()
    in_vision = np.flatnonzero(vision[run])
    if in_vision.size:
        table, base = _vision_tables(merged, steps, vision)
        vision_run = run[in_vision]
        ids[:, in_vision] = table[:, base[vision_run] + offset[in_vision]] + run_start[vision_run]
    position_ids.reshape(3, -1)[:, real] = ids
    return position_ids


@dataclasses.dataclass
class _Runs:
    """Maximal runs of one kind (0 text, 1 image, 2 video) over the flattened real tokens."""

    kind: np.ndarray  # [runs]
    row: np.ndarray  # [runs] the example each run is in
    start: np.ndarray  # [runs] first token (flat index)
    length: np.ndarray  # [runs]
    first_of_row: np.ndarray  # [runs] index of the first run of the same example
    of_token: np.ndarray  # [tokens] the run of each token

    @classmethod
    def of(cls, rows: np.ndarray, kinds: np.ndarray) -> _Runs:
        new = np.ones(kinds.size, bool)
        new[1:] = (rows[1:] != rows[:-1]) | (kinds[1:] != kinds[:-1])
        start = np.flatnonzero(new)
        length = np.diff(np.append(start, kinds.size))
        row = rows[start]
        row_begins = np.ones(row.size, bool)
        row_begins[1:] = row[1:] != row[:-1]
        first_of_row = np.maximum.accumulate(np.where(row_begins, np.arange(row.size), 0))
        return cls(kinds[start], row, start, length, first_of_row, np.cumsum(new) - 1)


def _vision_tables(
    merged: np.ndarray, steps: np.ndarray, vision: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The (t, h, w) ids of every distinct (grid, time interval) among the vision runs, laid
    end to end [3, n], and per run where its grid's ids begin (0 for text runs)."""
    keys = np.concatenate([merged, steps.view(np.int32)[:, None].astype(np.int64)], axis=1)
    distinct, which = np.unique(keys[vision], axis=0, return_inverse=True)
    tables, starts, begin = [], [], 0
    for t, h, w, bits in distinct.tolist():
        step = np.array(bits, np.int32).view(np.float32)
        grid = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        temporal = (grid[0].astype(np.float32) * step).astype(np.int64)
        tables.append(np.stack([temporal.reshape(-1), grid[1].reshape(-1), grid[2].reshape(-1)]))
        starts.append(begin)
        begin += t * h * w
    base = np.zeros(len(merged), np.int64)
    base[vision] = np.asarray(starts, np.int64)[which.reshape(-1)]
    return np.concatenate(tables, axis=1), base


def _vision_grids(
    runs: _Runs,
    grids: Sequence[Sequence[GridTHW]],
    intervals: Sequence[Sequence[float]] | None,
    m: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per run, the merged grid (t, h/m, w/m) [runs, 3] (1, 1, 1 for text) and the float32
    time interval [runs] (1 for text and images unless given).

    Raises ValueError as the per-row loop did: for the first example whose vision runs do not
    match its grids, in number (checked first) or in the tokens of one run.
    """
    vision_runs = np.flatnonzero(runs.kind > 0)
    counts = np.bincount(runs.row[vision_runs], minlength=len(grids))
    given = np.array([len(g) for g in grids], np.int64)
    row_ok = counts == given
    steps_given = intervals if intervals is not None else [()] * len(grids)
    flat, flat_steps = [], []
    for example, ok in enumerate(row_ok.tolist()):
        if ok and given[example]:
            flat += [tuple(int(x) for x in g) for g in grids[example]]
            flat_steps += list(steps_given[example]) or [1.0] * int(given[example])
    merged = np.ones((len(runs.kind), 3), np.int64)
    steps = np.ones(len(runs.kind), np.float32)
    matched = vision_runs[row_ok[runs.row[vision_runs]]]
    full = np.asarray(flat, np.int64).reshape(-1, 3)
    merged[matched] = full // np.array([1, m, m])
    steps[matched] = np.asarray(flat_steps, np.float32)
    # Runs of rows already refused: let them pass the token check below.
    unmatched = np.setdiff1d(vision_runs, matched)
    merged[unmatched, 2] = runs.length[unmatched]
    _raise_first_mismatch(runs, merged, counts, given, matched, full, m)
    return merged, steps


def _raise_first_mismatch(runs, merged, counts, given, matched, full, m) -> None:
    """Raises the per-row loop's ValueError for the lowest example with a mismatch: too many
    or too few grids (`counts` runs vs `given` grids per example), else the first run whose
    token count is not its grid's (`matched`: the vision runs of good rows, `full` their
    grids)."""
    expected = merged.prod(axis=1)
    bad_runs = np.flatnonzero((runs.kind > 0) & (runs.length != expected))
    bad_rows = np.flatnonzero(counts != given)
    first_bad_run_row = int(runs.row[bad_runs[0]]) if bad_runs.size else len(given)
    if bad_rows.size and bad_rows[0] < first_bad_run_row:
        example = int(bad_rows[0])
        raise ValueError(
            f"rope_index: example {example} has {counts[example]} runs of image tokens but "
            f"{given[example]} image grids; images must be separated by text and each image "
            "given one (t, h, w) grid."
        )
    if bad_runs.size:
        run = int(bad_runs[0])
        index = int(np.searchsorted(matched, run))
        number = int(np.sum(runs.row[matched[:index]] == runs.row[run]))
        raise ValueError(
            f"rope_index: example {int(runs.row[run])}, image {number} with grid "
            f"{tuple(int(x) for x in full[index])} needs {expected[run]} image tokens but the "
            f"sequence has {runs.length[run]}; expand each <|image_pad|> to t*h*w/{m * m} "
            "tokens."
        )


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
