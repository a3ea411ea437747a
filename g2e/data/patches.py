"""uint8 vision patches in the layout of transformers' Qwen2-VL image and video processors.

A patch of Qwen2-VL is temporal_patch_size (2) frames of 14 x 14 pixels in 3 channels,
flattened channel, frame, row, column (C = 3 x 2 x 14 x 14 = 1176 values). The host keeps
pixels as uint8 and leaves rescaling and normalising to the device (g2e.models.vision). An
image's two frames are equal, so it travels one frame wide (588 values) and a video's temporal
groups two frames wide; `widen_frames` duplicates an image's frame where a batch holds video.
"""

from __future__ import annotations

import numpy as np


def patchify(
    frames: np.ndarray, *, patch: int, merge: int, temporal: int
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 patches and the (t, h, w) grid of RGB frames [T, H, W, 3] (H, W multiples of
    patch * merge), in the HF processors' patch order (merge windows' patches consecutive,
    temporal groups one after another) and layout (channel, frame, row, col).

    One frame (an image): [h * w, 3 * patch**2], one frame per patch (the device duplicates
    it: g2e.models.vision). T frames (a video, T a multiple of `temporal`): [T / temporal *
    h * w, 3 * temporal * patch**2], grid (T / temporal, h, w).
    """
    count, height, width, _ = frames.shape
    grid_h, grid_w = height // patch, width // patch
    group = 1 if count == 1 else temporal
    if count % group:
        raise ValueError(f"patchify: {count} frames do not split into groups of {group}")
    blocks = frames.reshape(
        count // group, group, grid_h // merge, merge, patch, grid_w // merge, merge, patch, 3
    ).transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    patches = blocks.reshape(count // group * grid_h * grid_w, -1)
    return np.ascontiguousarray(patches), (count // group, grid_h, grid_w)


def widen_frames(pixel_values: np.ndarray, width: int) -> np.ndarray:
    """uint8 patches [p, width]: one-frame patches [p, width / 2] with their frame duplicated
    (layout channel, frame, row, col, as the HF processors flatten a patch), or unchanged
    patches already `width` wide."""
    if pixel_values.shape[-1] == width:
        return pixel_values
    one = pixel_values.reshape(len(pixel_values), 3, 1, pixel_values.shape[-1] // 3)
    return np.repeat(one, width // pixel_values.shape[-1], axis=2).reshape(len(one), width)
