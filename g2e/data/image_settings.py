"""The Qwen2-VL image processor's settings, read from a checkpoint without transformers.

g2e keeps only what the host needs of the image processor (docs/method.md §3): the patch,
merge and temporal sizes, the min/max pixel bounds of its resize and the resampling filter.
Rescaling and normalising happen on the device (the vision tower's `pixel_table`) and
g2e.data.patches cuts the patches, so transformers' `Qwen2VLImageProcessorPil` is not needed
at run time; importing it would import torch (its base modules import transformers'
modeling code).

The bounds are resolved as transformers 5's `Qwen2VLImageProcessorPil` resolves them:
  1. `min_pixels` / `max_pixels` given to `from_dir` / `from_dict` (the data.min_pixels /
     data.max_pixels overrides);
  2. the file's top-level `min_pixels` / `max_pixels` (the Qwen2-VL and Qwen2.5-VL hub files);
  3. its `size.shortest_edge` / `size.longest_edge` (what transformers writes today);
  4. with no `size` at all, the class defaults 56*56 and 28*28*1280.
A `size` written by transformers 4 as `{"min_pixels", "max_pixels"}` alone is read as those
bounds (transformers 5 keeps that dict but then cannot resize with it). A null value counts as
absent, as in transformers. `smart_resize` is transformers' function, rewritten with the same
rounding and the same error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any

from PIL import Image

FILE_NAME = "preprocessor_config.json"

# Qwen2VLImageProcessorPil's class defaults.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """(height, width) as Qwen2-VL's image processor resizes an image: both multiples of
    `factor`, the area within [min_pixels, max_pixels], the aspect ratio kept as well as
    rounding allows. Raises ValueError for an aspect ratio over 200 (transformers' message)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            "absolute aspect ratio must be smaller than 200, got "
            f"{max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _bound(
    settings: dict[str, Any], override: int | None, key: str, size_keys: tuple[str, str]
) -> int | None:
    """One pixel bound: the override, the top-level key, then `size`'s keys in order
    (None when none is set)."""
    size = settings.get("size")
    candidates = [override, settings.get(key)]
    if isinstance(size, dict):
        candidates += [size.get(name) for name in size_keys]
    return next((int(value) for value in candidates if value is not None), None)


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """What g2e uses of a checkpoint's preprocessor_config.json (see the module docstring).

    `resample` is a PIL filter number (3, bicubic, unless the file names another).
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    resample: int = int(Image.Resampling.BICUBIC)

    @property
    def factor(self) -> int:
        """The side every resized image is a multiple of (28 pixels: patch 14 x merge 2)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(
        cls,
        settings: dict[str, Any],
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        source: str = FILE_NAME,
    ) -> ImageSettings:
        """Settings from a preprocessor_config.json dict; `min_pixels` / `max_pixels` (None:
        keep the file's) override its bounds. Raises ValueError, naming `source` and the key,
        for a `size` that is not a dict or leaves a bound unset."""
        size = settings.get("size")
        if size is not None and not isinstance(size, dict):
            raise ValueError(f"{source}: size must be a dict of pixel bounds, got {size!r}")
        bounds = {}
        for key, override, size_keys, default in (
            ("min_pixels", min_pixels, ("shortest_edge", "min_pixels"), DEFAULT_MIN_PIXELS),
            ("max_pixels", max_pixels, ("longest_edge", "max_pixels"), DEFAULT_MAX_PIXELS),
        ):
            bound = _bound(settings, override, key, size_keys)
            if bound is None and size is not None:
                raise ValueError(
                    f"{source}: size={size} sets no {size_keys[0]} and there is no top-level "
                    f"{key}; add {key} to the file or pass data.{key}"
                )
            bounds[key] = default if bound is None else bound

        def read(key: str) -> int:
            value = settings.get(key)
            return int(getattr(cls, key) if value is None else value)

        return cls(
            patch_size=read("patch_size"),
            temporal_patch_size=read("temporal_patch_size"),
            merge_size=read("merge_size"),
            resample=read("resample"),
            **bounds,
        )

    @classmethod
    def from_dir(
        cls,
        checkpoint_dir: str | os.PathLike,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> ImageSettings:
        """Settings from `checkpoint_dir`/preprocessor_config.json (see `from_dict`).

        Raises FileNotFoundError when the file is missing, ValueError when it is not JSON.
        """
        path = pathlib.Path(checkpoint_dir) / FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing; model_dir must be a Qwen2-VL checkpoint directory"
            )
        try:
            settings = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        return cls.from_dict(
            settings, min_pixels=min_pixels, max_pixels=max_pixels, source=str(path)
        )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an image of `height` x `width` after the processor's resize."""
        return smart_resize(
            height,
            width,
            factor=self.factor,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
        )
