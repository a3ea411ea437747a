"""Video inputs: frames from a list, a folder or a video file, sampled to a fixed count.

A video reaches g2e in one of three forms (`EmbedItem.video`, the embed command's `"video"`):
  * a list of frames in order: paths (relative to the image root, as image paths are) or PIL
    images;
  * a folder of frame images, taken in natural sort order (`frame2.jpg` before `frame10.jpg`);
  * a video file, decoded with PyAV (the `av` package) when it is installed.

`load_clip` samples `count` frames uniformly, `np.linspace(0, n - 1, count).astype(int)` as
VLM2Vec samples its video frames (a clip shorter than `count` repeats frames), decodes only the
sampled ones, and pads an odd count by repeating the last frame (transformers' video processor
pads to a multiple of temporal_patch_size the same way). Each frame is loaded with the image
rules of g2e.data.images (bad files raise BadInput naming the file).

`Clip.sampled_fps` is the frame rate of the sampled frames, which Qwen2.5-VL's time-aligned
position ids need (seconds per temporal group = temporal_patch_size / sampled_fps): for a file,
count / n * the stream's rate, as transformers' `VideoMetadata.sampled_fps` computes it; for
frames given without a rate, transformers' default of 24.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

from g2e.data import images as images_lib
from g2e.data.errors import BadInput
from g2e.data.patches import patchify

# transformers' VideoMetadata.sampled_fps when a video comes without a frame rate.
DEFAULT_FPS = 24.0
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

VideoSource = str | os.PathLike | Sequence[str | os.PathLike | Image.Image]


@dataclasses.dataclass
class Clip:
    """Sampled RGB frames of one video (an even count), their rate and a name for errors."""

    frames: list[Image.Image]
    sampled_fps: float
    name: str


def sample_indices(total: int, count: int) -> np.ndarray:
    """The `count` frame indices of `total` frames: uniform, first and last included."""
    if total < 1:
        raise ValueError("sample_indices: a video needs at least one frame")
    return np.linspace(0, total - 1, count).astype(int)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_files(folder: str | os.PathLike) -> list[str]:
    """The frame images of `folder` (by suffix), in natural sort order."""
    names = [n for n in os.listdir(folder) if n.lower().endswith(FRAME_SUFFIXES)]
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _decode_file(path: str, count: int) -> tuple[list[Image.Image], float]:
    """The sampled frames of a video file and their rate, decoded with PyAV."""
    try:
        import av  # noqa: PLC0415 (optional: only video files need it)
    except ImportError:
        raise BadInput(
            "cannot decode video file: PyAV is not installed",
            file=path,
            hint="pip install av, or pass the video as a folder or list of frame images",
        ) from None
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 0) or DEFAULT_FPS
            total = stream.frames or sum(1 for _ in container.decode(stream))
            if total < 1:
                raise ValueError("no frames")
            wanted = sample_indices(total, count)
            container.seek(0)
            decoded = {}
            keep = set(wanted.tolist())
            for index, frame in enumerate(container.decode(stream)):
                if index in keep:
                    decoded[index] = frame.to_image()
                if index >= wanted[-1]:
                    break
    except BadInput:
        raise
    except Exception as error:  # av raises its own errors; a missing stream is an IndexError.
        raise BadInput(
            "cannot decode video file",
            file=path,
            detail=f"{type(error).__name__}: {error}",
            hint="re-encode the video or pass it as a folder or list of frame images",
        ) from error
    # A stream may hold fewer frames than its header says: repeat the last one decoded.
    frames = [decoded[i if i in decoded else max(decoded)] for i in wanted]
    return frames, len(wanted) / total * rate


def load_clip(
    source: VideoSource,
    *,
    count: int,
    image_root: str | os.PathLike | None = None,
) -> Clip:
    """`count` frames of a video (padded to an even count) as RGB PIL images.

    Args:
      source: frames in order (paths or PIL images), a folder of frames, or a video file;
        paths are relative to `image_root` when one is given.
      count: frames to sample (data.video_frames).
      image_root: the folder relative paths are taken from.
    Raises:
      BadInput: a missing or empty folder or file, an undecodable frame or video (naming it).
    """
    if isinstance(source, (str, os.PathLike)):
        path = images_lib.resolve_path(source, image_root)
        if path.is_dir():
            files = frame_files(path)
            if not files:
                raise BadInput(
                    "video folder holds no frame images",
                    file=str(path),
                    hint=f"put frames ({', '.join(FRAME_SUFFIXES)}) in it",
                )
            return _clip([files[i] for i in sample_indices(len(files), count)], str(path))
        if not path.is_file():
            raise BadInput("missing video", file=str(path), hint="check the path and image root")
        frames, fps = _decode_file(str(path), count)
        return _clip(frames, str(path), fps)
    sources = list(source)
    if not sources:
        raise BadInput("video has no frames", hint="give the video at least one frame")
    picked = [sources[i] for i in sample_indices(len(sources), count)]
    name = "" if isinstance(sources[0], Image.Image) else os.fspath(sources[0])
    return _clip(picked, name, image_root=image_root)


def _clip(
    frames: Sequence,
    name: str,
    fps: float = DEFAULT_FPS,
    *,
    image_root: str | os.PathLike | None = None,
) -> Clip:
    """A Clip of frames (paths and PIL images loaded with the image rules), padded to an even
    count."""
    loaded = [images_lib.load_image(f, image_root=image_root) for f in frames]
    if len(loaded) % 2:
        loaded.append(loaded[-1])
    return Clip(loaded, fps, name)


def clip_patches(
    clip: Clip, *, patch: int, merge: int, temporal: int, tokens_per_second: float
) -> tuple[np.ndarray, tuple[int, int, int], float]:
    """uint8 patches [p, C] (two frames each), grid (t, h, w) and M-RoPE time interval of a
    clip whose frames all have one processor size (`Processor.load_video`).

    The interval is tokens_per_second x seconds per temporal group (temporal / sampled_fps),
    in float32 as transformers computes it, for Qwen2.5-VL; 1 when tokens_per_second is 0
    (Qwen2-VL, whose temporal ids step by 1).
    """
    frames = np.stack([np.asarray(f, np.uint8) for f in clip.frames])  # [T, H, W, 3]
    patches, grid = patchify(frames, patch=patch, merge=merge, temporal=temporal)
    interval = 1.0
    if tokens_per_second:
        seconds = np.float32(temporal / clip.sampled_fps)
        interval = float(np.float32(tokens_per_second) * seconds)
    return patches, grid, interval
