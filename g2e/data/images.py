"""Safe image loading (the bad-input rules) and the image-resolution policies of docs/method.md §3.

`load_image` turns a path (relative to an image root), raw bytes, a lazy `ImageRef` or a PIL
image into an RGB PIL image, or raises `BadInput` naming the file: missing, empty, truncated or
undecodable files, declared sizes past `max_declared_pixels` (decompression bombs, checked from
the header before decoding), paths that leave the image root. Every mode is converted to RGB
the same way on every machine:
  RGB                       as is
  with alpha (RGBA, LA, P with transparency, ...)   composited over white (as transformers'
                            `convert_to_rgb` does)
  16-bit grey (I;16*, I)    value * 255 / 65535, rounded
  float grey (F)            clipped to [0, 255], rounded
  others (L, 1, P, CMYK, YCbCr, LAB, HSV)   PIL's `convert('RGB')`
EXIF orientation is not applied (the reference pipeline does not either).

`apply_policy` pre-resizes an RGB image by policy name before Qwen2-VL's image processor, which
still applies its own min/max pixels afterwards.

`ImageRef` is how rows read from a prepared TFDS copy carry an image: a stable `key` (the
relative path the parquet named) and a way to fetch the bytes, so that passing rows around,
deduplicating them (`image_key`) and iterating a split read no image bytes; `load_image`
fetches them when the image is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from PIL import Image

from g2e.data.errors import BadInput

# PIL's own warning threshold; past it a file is treated as a decompression bomb.
MAX_DECLARED_PIXELS = 89_478_485

# Square sizes of the fixed policies (docs/method.md §3).
SQUARE_POLICIES = {
    "high": 1344,
    "mid_high": 768,
    "mid": 672,
    "mid_low": 448,
    "clip": 336,
    "low": 128,
}
POLICIES = (*SQUARE_POLICIES, "random", "processor")

# The 'random' policy (the release's name; it is deterministic).
RANDOM_MAX_LONG_SIDE = 992
RANDOM_MIN_SHORT_SIDE = 336


class ImageStore(Protocol):
    """Where an ImageRef's bytes live (e.g. tfds_rows.ImageTable)."""

    def read_image(self, image_id: int) -> bytes:
        """The encoded bytes of image `image_id`."""


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """A lazy reference to an encoded image held by `store` under `image_id`.

    `key` names the image stably (the relative path the source parquet named); it is what
    `image_key` returns and what errors name. Two references are equal when their keys are.
    Pickling a reference pickles its store, which should pickle small (reopen on demand).
    """

    key: str
    store: ImageStore = dataclasses.field(compare=False, repr=False)
    image_id: int = dataclasses.field(compare=False)

    def read(self) -> bytes:
        """The encoded image bytes (one read from the store per call)."""
        return self.store.read_image(self.image_id)


ImageSource = bytes | str | os.PathLike | ImageRef | Image.Image
# draft(width, height) -> the (width, height) the image will be resized to, or None.
DraftFn = Callable[[int, int], tuple[int, int] | None]


def resolve_path(path: str | os.PathLike, image_root: str | os.PathLike | None) -> pathlib.Path:
    """Joins `path` to `image_root`, refusing paths that leave the root.

    The check is lexical (after normalising `..`), so an image root that is itself a symlink,
    or holds symlinked folders, keeps working.

    Raises:
      BadInput: the path is absolute or climbs out of the root.
    """
    if image_root is None:
        return pathlib.Path(path)
    root = os.path.normpath(os.path.abspath(image_root))
    joined = os.path.normpath(os.path.join(root, os.fspath(path)))
    if os.path.commonpath([root, joined]) != root:
        raise BadInput(
            "image path escapes the image root",
            file=os.fspath(path),
            detail=f"root {root}",
            hint="image paths must be relative to the image root, without '..'",
        )
    return pathlib.Path(joined)


def _open(
    data: bytes, name: str, max_declared_pixels: int, draft: DraftFn | None = None
) -> Image.Image:
    """Decodes image bytes fully, with the size checked before decoding (see load_image)."""
    if not data:
        raise BadInput(
            "empty image file",
            detail="0 bytes",
            file=name,
            hint="re-download the image or drop the row",
        )
    try:
        with warnings.catch_warnings():
            # PIL warns (and past 2x raises) on huge images; our own limit below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise BadInput(
            "image declares too many pixels (decompression bomb)",
            file=name,
            detail=str(error),
            hint="drop the row or shrink the image",
        ) from error
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise BadInput(
            "cannot decode image",
            file=name,
            detail=f"{type(error).__name__}: {error}",
            hint="re-download the image or drop the row",
        ) from error
    width, height = image.size
    if width * height > max_declared_pixels:
        raise BadInput(
            "image declares too many pixels (decompression bomb)",
            file=name,
            detail=f"{width}x{height} > {max_declared_pixels} pixels",
            hint="drop the row or shrink the image",
        )
    if width < 1 or height < 1:
        raise BadInput("image has no pixels", file=name, detail=f"{width}x{height}")
    target = draft(width, height) if draft is not None and image.format == "JPEG" else None
    if target is not None:
        # The DCT decodes at 1/2, 1/4 or 1/8 scale directly, never below the target size.
        image.draft("RGB", target)
    try:
        image.load()
    except Exception as error:
        raise BadInput(
            "truncated or corrupt image",
            file=name,
            detail=f"{type(error).__name__}: {error}",
            hint="re-download the image or drop the row",
        ) from error
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB, deterministically (rules in the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.int64)
        grey = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(grey.astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255)
        return Image.fromarray(grey.astype(np.uint8), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(
    source: ImageSource,
    *,
    image_root: str | os.PathLike | None = None,
    max_declared_pixels: int = MAX_DECLARED_PIXELS,
    draft: DraftFn | None = None,
) -> Image.Image:
    """Loads an image from a path, bytes, an ImageRef or a PIL image and returns it as RGB.

    Args:
      source: a path (relative to `image_root` when one is given), encoded image bytes, an
        ImageRef (its bytes are read now), or a PIL image.
      image_root: the folder image paths are relative to (MMEB: the folder holding `images/`).
      max_declared_pixels: width*height above which a file is refused before decoding.
      draft: for a JPEG file, the size it will be resized to, from its declared size; the
        decoder then reduces it by 2, 4 or 8 while decoding, as far as stays at or above that
        size (far less work for a large photo or page; the pixels differ slightly from a full
        decode followed by the same resize).
    Raises:
      BadInput: see the module docstring; `file` names the path, the ImageRef's key, or
        '<bytes>'.
    """
    if isinstance(source, Image.Image):
        width, height = source.size
        if width * height > max_declared_pixels or width < 1 or height < 1:
            raise BadInput(
                "image size out of range", file="<PIL image>", detail=f"{width}x{height}"
            )
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return to_rgb(_open(bytes(source), "<bytes>", max_declared_pixels, draft))
    if isinstance(source, ImageRef):
        return to_rgb(_open(source.read(), source.key, max_declared_pixels, draft))
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"image must be bytes, a path, an ImageRef or a PIL image, got {type(source).__name__}"
        )
    if not os.fspath(source):
        raise BadInput("empty image path", hint="give the row an image path or no image")
    path = resolve_path(source, image_root)
    if not path.is_file():
        hint = (
            "check data.*_image_root points at the folder holding images/"
            if image_root is not None
            else f"a relative path is taken from the working directory ({os.getcwd()})"
        )
        raise BadInput("missing image", file=str(path), hint=hint)
    return to_rgb(_open(path.read_bytes(), str(path), max_declared_pixels, draft))


def random_policy_size(width: int, height: int) -> tuple[int, int]:
    """Target (width, height) of the 'random' policy.

    If one side exceeds twice the other, the short side is raised to half the long side; then
    the image is scaled so its long side is at most 992, unless that leaves the short side under
    336, in which case it is scaled so the short side is 336 (that rule wins).
    """
    w, h = float(width), float(height)
    if w > 2 * h:
        h = w / 2
    elif h > 2 * w:
        w = h / 2
    scale = min(1.0, RANDOM_MAX_LONG_SIDE / max(w, h))
    if min(w, h) * scale < RANDOM_MIN_SHORT_SIDE:
        scale = RANDOM_MIN_SHORT_SIDE / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def policy_size(policy: str, width: int, height: int) -> tuple[int, int] | None:
    """The (width, height) policy `policy` resizes a width x height image to; None for
    'processor' (no pre-resize)."""
    if policy == "processor":
        return None
    if policy in SQUARE_POLICIES:
        return SQUARE_POLICIES[policy], SQUARE_POLICIES[policy]
    if policy == "random":
        return random_policy_size(width, height)
    raise ValueError(f"image_resolution must be one of {POLICIES}, got {policy!r}")


def apply_policy(
    image: Image.Image, policy: str, size: tuple[int, int] | None = None
) -> Image.Image:
    """Pre-resizes an RGB image by policy (docs/method.md §3); 'processor' returns it unchanged.

    The square policies stretch to N x N with BICUBIC (PIL's default, as the release uses);
    'random' uses LANCZOS. `size` is the policy's target when the image was decoded smaller
    than its file declared (a JPEG draft): the target of the declared size.
    """
    target = size or policy_size(policy, *image.size)
    if target is None or target == image.size:
        return image
    method = Image.Resampling.LANCZOS if policy == "random" else Image.Resampling.BICUBIC
    return image.resize(target, method)


def check_aspect_ratio(image: Image.Image, name: str = "") -> None:
    """Qwen2-VL's resize refuses aspect ratios over 200; report that as bad input."""
    width, height = image.size
    ratio = max(width, height) / min(width, height)
    if ratio > 200:
        raise BadInput(
            "image aspect ratio over 200",
            file=name,
            detail=f"{width}x{height}",
            hint="drop the row or crop the image",
        )


def image_key(image: Any) -> str:
    """A stable string naming an image for deduplication: its path, or a hash of its bytes.

    Takes None (text only) -> "", a path (str / PathLike) -> the path as given, an ImageRef ->
    its key (no bytes are read), bytes -> a sha1 of the bytes, a PIL image -> a sha1 of its
    mode, size and pixels.
    """
    if image is None:
        return ""
    if isinstance(image, ImageRef):
        return image.key
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "sha1:" + hashlib.sha1(bytes(image)).hexdigest()
    if hasattr(image, "tobytes") and hasattr(image, "mode"):
        digest = hashlib.sha1(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
        return "pil:" + digest.hexdigest()
    return str(image)
