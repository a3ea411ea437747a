"""Host-side preprocessing: items -> token ids + image and video patches -> fixed-shape batches.

`Processor.from_dir(checkpoint_dir, ...)` reads the tokenizer (`load_tokenizer`) and the Qwen2-VL
image processor's settings (g2e.data.image_settings) from a checkpoint directory; neither
imports torch. `encode` builds the prompt (g2e.data.prompts), loads and pre-resizes the
image (g2e.data.images), tokenises, expands each `<|image_pad|>` to the image's merged-patch
count and truncates; the processor's `batcher` (g2e.data.batching: `processor.batcher.collate`)
pads a list of encodings into the fixed-shape batch dict of the design contract.

Video: `EmbedItem.video` is loaded and sampled to `video_frames` frames by g2e.data.videos;
each frame gets the image resolution policy, then all frames the image processor's resize of
the first (one size per clip); `patchify` cuts temporal groups of two frames. The clip's
`<|video_pad|>` expands to its merged-patch count, and an example with a video carries two
frames per patch (its images' frames duplicated: g2e.models.vision explains the widths). For
Qwen2.5-VL each video's time interval (tokens_per_second x seconds per group) goes with the
encoding to the M-RoPE ids.

Truncation keeps the chat template, the system turn, the query suffix and the last (pooled)
token: only the data's own text is cut, from its end, and never an image token.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import transformers
from PIL import Image

from g2e.data import images as images_lib
from g2e.data import prompts, videos
from g2e.data.batching import Batcher, Encoded, default_length_buckets, default_patch_buckets
from g2e.data.errors import BadInput, BadInputReport
from g2e.data.image_settings import ImageSettings
from g2e.data.patches import patchify, widen_frames
from g2e.models.config import Qwen2VLConfig

# A text with more tokens than this many times max_length is bad input, not just truncated.
FAR_OVER_FACTOR = 4


@dataclasses.dataclass(frozen=True)
class EmbedItem:
    """One input to embed: text (with its task instruction) and/or an image and/or a video.

    `image` is encoded bytes, a path (relative to the processor's image root), a PIL image, or
    None ('' counts as None, as MMEB writes it). `role` is 'query' or 'candidate'. `row` only
    serves error messages (which row of `subset` the item came from). `video` is None, frames in
    order (paths relative to the image root, or PIL images), a folder of frames or a video
    file (g2e.data.videos); a list is kept as a tuple.
    """

    text: str
    image: bytes | str | Image.Image | None
    role: str
    subset: str = ""
    row: Any = None
    video: videos.VideoSource | None = None

    def __post_init__(self):
        if self.role not in prompts.ROLES:
            raise ValueError(f"EmbedItem.role must be one of {prompts.ROLES}, got {self.role!r}")
        if isinstance(self.video, list):
            object.__setattr__(self, "video", tuple(self.video))


def query_item(row: Any) -> EmbedItem:
    """The query side of a training row (g2e.data.mmeb.TrainRow): its text and image."""
    return EmbedItem(row.qry_text, row.qry_image or None, "query", row.subset, row.index)


def positive_item(row: Any) -> EmbedItem:
    """The positive side of a training row, embedded as a candidate."""
    return EmbedItem(row.pos_text, row.pos_image or None, "candidate", row.subset, row.index)


def _check_options(max_length: int, image_resolution: str, padding_side: str) -> None:
    """Raises ValueError, naming the option, for a value `Processor` cannot work with."""
    if image_resolution not in images_lib.POLICIES:
        raise ValueError(
            f"data.image_resolution must be one of {images_lib.POLICIES}, got {image_resolution!r}"
        )
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if max_length < 16:
        raise ValueError(f"data.max_length={max_length} cannot hold the chat template")


def _image_token_id(tokenizer: transformers.PreTrainedTokenizerBase, expected: int | None) -> int:
    """The tokenizer's id of `<|image_pad|>`; raises ValueError when config.json's
    `expected` id differs (the tokenizer and the model do not belong together)."""
    image_token_id = tokenizer.convert_tokens_to_ids(prompts.IMAGE_PAD)
    if expected is not None and expected != image_token_id:
        raise ValueError(
            f"config.json image_token_id={expected} but the tokenizer maps "
            f"{prompts.IMAGE_PAD} to {image_token_id}; tokenizer and "
            "model do not belong together"
        )
    return image_token_id


def _video_token_id(tokenizer: transformers.PreTrainedTokenizerBase) -> int | None:
    """The tokenizer's id of `<|video_pad|>`, or None when it has no such token."""
    video_token_id = tokenizer.convert_tokens_to_ids(prompts.VIDEO_PAD)
    if video_token_id is None or video_token_id == tokenizer.unk_token_id:
        return None
    return int(video_token_id)


def _pad_token_id(tokenizer: transformers.PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id; raises ValueError when it has none."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set pad_token in tokenizer_config.json")
    return tokenizer.pad_token_id


def _length_buckets(requested: Sequence[int] | None, max_length: int) -> tuple[int, ...]:
    """The sorted length buckets (`requested`, else the defaults for `max_length`); raises
    ValueError when the largest cannot hold `max_length` tokens."""
    buckets = tuple(sorted(requested or default_length_buckets(max_length)))
    if buckets[-1] < max_length:
        raise ValueError(
            f"largest length bucket {buckets[-1]} is below "
            f"max_length={max_length}; add a bucket of at least max_length"
        )
    return buckets


def load_tokenizer(checkpoint_dir: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, as `AutoTokenizer.from_pretrained` loads it.

    A Qwen2 tokenizer (tokenizer_config.json's `tokenizer_class` is Qwen2Tokenizer or
    Qwen2TokenizerFast, with no remote code) is loaded with `Qwen2Tokenizer` directly: the class
    and call AutoTokenizer ends in for a Qwen2-VL checkpoint, without AutoTokenizer's import of
    transformers' configuration modules, which import torch. Any other checkpoint goes through
    AutoTokenizer.
    """
    config_path = pathlib.Path(checkpoint_dir) / "tokenizer_config.json"
    declared = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if "auto_map" not in declared and declared.get("tokenizer_class") in (
        "Qwen2Tokenizer",
        "Qwen2TokenizerFast",
    ):
        return transformers.Qwen2Tokenizer.from_pretrained(checkpoint_dir)
    return transformers.AutoTokenizer.from_pretrained(checkpoint_dir)


class Processor:
    """Turns `EmbedItem`s into fixed-shape batches for Qwen2-VL (see the module docstring)."""

    def __init__(
        self,
        tokenizer: transformers.PreTrainedTokenizerBase,
        image_settings: ImageSettings,
        *,
        max_length: int,
        image_resolution: str = "processor",
        prompt: prompts.PromptOptions = prompts.PromptOptions(),
        length_buckets: Sequence[int] | None = None,
        patch_buckets: Sequence[int] | None = None,
        on_bad_input: str | BadInputReport = "error",
        padding_side: str = "right",
        image_root: str | os.PathLike | None = None,
        image_token_id: int | None = None,
        jpeg_draft: bool = False,
        window_merged: int = 0,
        video_frames: int = 8,
        video_tokens_per_second: float = 0.0,
    ):
        _check_options(max_length, image_resolution, padding_side)
        if video_frames < 1:
            raise ValueError(f"data.video_frames={video_frames} must be at least 1")
        self.tokenizer = tokenizer
        self.image_settings = image_settings
        self.max_length = max_length
        self.image_resolution = image_resolution
        self.prompt = prompt
        self.padding_side = padding_side
        self.image_root = image_root
        # A report passed in is shared (e.g. with the MMEB readers), so one summary covers both.
        self.report = (
            on_bad_input
            if isinstance(on_bad_input, BadInputReport)
            else BadInputReport(on_bad_input)
        )
        self.merge_size = image_settings.merge_size
        self.jpeg_draft = jpeg_draft
        # Qwen2.5-VL's attention windows, in merged units (0: Qwen2-VL, no windows).
        self.window_merged = window_merged
        self.temporal_patch = image_settings.temporal_patch_size
        self.patch_dim = 3 * self.temporal_patch * image_settings.patch_size**2
        self.image_token_id = _image_token_id(tokenizer, image_token_id)
        self.pad_token_id = _pad_token_id(tokenizer)
        self.video_token_id = _video_token_id(tokenizer)
        self.video_frames = video_frames
        # Qwen2.5-VL's time-aligned video ids (0: Qwen2-VL, whose temporal ids step by 1).
        self.video_tokens_per_second = video_tokens_per_second
        self.batcher = Batcher(
            pad_token_id=self.pad_token_id,
            image_token_id=self.image_token_id,
            merge_size=self.merge_size,
            patch_bytes=self.patch_dim // self.temporal_patch,
            length_buckets=_length_buckets(length_buckets, max_length),
            patch_buckets=self._patch_buckets(patch_buckets),
            padding_side=padding_side,
            window_merged=window_merged,
            video_token_id=self.video_token_id,
        )

    def _patch_buckets(self, requested: Sequence[int] | None) -> tuple[int, ...]:
        """The sorted patch buckets: `requested`, else powers of four up to the image
        processor's largest image; one bucket under a square resolution policy."""
        if self.image_resolution in images_lib.SQUARE_POLICIES:
            # Every image has the same size, so one bucket fits them all (1,024 patches at
            # 448x448): no other program is compiled and no image is padded.
            return (0, self.patches_per_image(self.image_resolution))
        settings = self.image_settings
        max_patches = settings.max_pixels // settings.patch_size**2
        return tuple(sorted(requested or default_patch_buckets(max_patches)))

    @classmethod
    def from_dir(
        cls,
        checkpoint_dir: str | os.PathLike,
        *,
        max_length: int,
        image_resolution: str = "processor",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        prompt: prompts.PromptOptions = prompts.PromptOptions(),
        length_buckets: Sequence[int] | None = None,
        patch_buckets: Sequence[int] | None = None,
        on_bad_input: str | BadInputReport = "error",
        padding_side: str = "right",
        image_root: str | os.PathLike | None = None,
        jpeg_draft: bool = False,
        video_frames: int = 8,
    ) -> Processor:
        """Reads the tokenizer and image-processor settings of a Hugging Face checkpoint directory.

        `min_pixels` / `max_pixels` (None or 0: keep the checkpoint's) override the image
        processor's. `on_bad_input` is 'error', 'skip' or a shared BadInputReport. `jpeg_draft`
        lets JPEG files decode at a reduced scale when the resolution policy shrinks them by
        2x or more (see g2e.data.images.load_image). `video_frames`: frames sampled per video
        (data.video_frames).
        Raises FileNotFoundError when the directory lacks preprocessor_config.json.
        """
        checkpoint_dir = pathlib.Path(checkpoint_dir)
        image_settings = ImageSettings.from_dir(
            checkpoint_dir, min_pixels=min_pixels or None, max_pixels=max_pixels or None
        )
        tokenizer = load_tokenizer(checkpoint_dir)
        image_token_id, window_merged, tokens_per_second = None, 0, 0.0
        if (checkpoint_dir / "config.json").is_file():
            config = Qwen2VLConfig.from_dir(checkpoint_dir)
            image_token_id = config.image_token_id
            if config.vision.is_qwen2_5:
                window_merged = config.vision.window_merged
                tokens_per_second = float(config.vision.tokens_per_second)
        return cls(
            tokenizer,
            image_settings,
            max_length=max_length,
            image_resolution=image_resolution,
            prompt=prompt,
            length_buckets=length_buckets,
            patch_buckets=patch_buckets,
            on_bad_input=on_bad_input,
            padding_side=padding_side,
            image_root=image_root,
            image_token_id=image_token_id,
            jpeg_draft=jpeg_draft,
            window_merged=window_merged,
            video_frames=video_frames,
            video_tokens_per_second=tokens_per_second,
        )

    # ---- images ---------------------------------------------------------------------------

    def patches_per_image(self, policy: str) -> int:
        """The patches of one image under a square resolution policy (e.g. 1,024 at 448^2)."""
        side = images_lib.SQUARE_POLICIES[policy]
        patch = self.image_settings.patch_size
        height, width = self.image_settings.resized_size(side, side)
        return (height // patch) * (width // patch)

    def load_images(
        self,
        sources: Sequence[images_lib.ImageSource],
        *,
        image_root: str | os.PathLike | None = None,
    ) -> list[Image.Image]:
        """Loads each image safely and applies the resolution policy. Raises BadInput."""
        root = self.image_root if image_root is None else image_root
        loaded = []
        for source in sources:
            target: list[tuple[int, int] | None] = [None]

            def draft(width: int, height: int) -> tuple[int, int] | None:
                target[0] = images_lib.policy_size(self.image_resolution, width, height)
                return target[0]

            image = images_lib.load_image(
                source, image_root=root, draft=draft if self.jpeg_draft else None
            )
            image = images_lib.apply_policy(image, self.image_resolution, size=target[0])
            name = (
                source.key
                if isinstance(source, images_lib.ImageRef)
                else (source if isinstance(source, str) else "")
            )
            images_lib.check_aspect_ratio(image, name)
            loaded.append(image)
        return loaded

    def image_features(
        self, loaded: Sequence[Image.Image]
    ) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """uint8 patches [p, C / 2] and grids (t, h, w) of RGB images.

        The image processor's resize (a multiple of 28 pixels within its min/max pixels) on
        the host; rescaling and normalising are left to the device (the vision tower's
        `pixel_table`), so a patch travels as one frame of 588 bytes, not 1176 floats. The
        patch order and layout are the image processor's.
        """
        if not loaded:
            return np.zeros((0, self.patch_dim // self.temporal_patch), np.uint8), []
        patch, merge = self.image_settings.patch_size, self.merge_size
        pieces, grids = [], []
        for image in loaded:
            image = self._resized(image, image.size)
            frame = np.asarray(image, np.uint8)[None]  # [1, H, W, 3]
            patches, grid = patchify(frame, patch=patch, merge=merge, temporal=self.temporal_patch)
            pieces.append(patches)
            grids.append(grid)
        return np.concatenate(pieces), grids

    def _resized(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        """`image` resized as the image processor resizes an image of `size` (width, height):
        a multiple of 28 pixels within its min/max pixels."""
        height, width = self.image_settings.resized_size(size[1], size[0])
        if (width, height) != image.size:
            image = image.resize((width, height), resample=self.image_settings.resample)
        return image

    # ---- videos ---------------------------------------------------------------------------

    def load_video(
        self, source: videos.VideoSource, *, image_root: str | os.PathLike | None = None
    ) -> videos.Clip:
        """`video_frames` frames of a video (g2e.data.videos), each under the resolution policy,
        then all resized as the image processor resizes the first. Raises BadInput."""
        root = self.image_root if image_root is None else image_root
        clip = videos.load_clip(source, count=self.video_frames, image_root=root)
        frames = [images_lib.apply_policy(f, self.image_resolution) for f in clip.frames]
        images_lib.check_aspect_ratio(frames[0], clip.name)
        size = frames[0].size
        clip.frames = [self._resized(f.resize(size) if f.size != size else f, size) for f in frames]
        return clip

    def _vision_features(
        self, video_order: np.ndarray, loaded: Sequence[Image.Image], clips: Sequence[videos.Clip]
    ) -> tuple[np.ndarray, list[tuple[int, int, int]], list[float]]:
        """Patches, grids and time intervals of the images and clips in token order
        (`video_order`: per vision input, whether it is a video); two frames per patch when
        there is a clip."""
        if not clips:
            pixel_values, grids = self.image_features(loaded)
            return pixel_values, grids, [1.0] * len(grids)
        image_iter, clip_iter = iter(loaded), iter(clips)
        pieces, grids, intervals = [], [], []
        for is_video in video_order.tolist():
            if is_video:
                patches, grid, interval = videos.clip_patches(
                    next(clip_iter),
                    patch=self.image_settings.patch_size,
                    merge=self.merge_size,
                    temporal=self.temporal_patch,
                    tokens_per_second=self.video_tokens_per_second,
                )
            else:
                patches, (grid,) = self.image_features([next(image_iter)])
                patches, interval = widen_frames(patches, self.patch_dim), 1.0
            pieces.append(patches)
            grids.append(grid)
            intervals.append(interval)
        return np.concatenate(pieces), grids, intervals

    # ---- encoding -------------------------------------------------------------------------

    def _vision_tokens(
        self, ids: np.ndarray, images: int, clips: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(every vision token, the video tokens) of token `ids`; raises BadInput when their
        counts are not `images` images and `clips` videos."""
        is_video = np.zeros(len(ids), bool)
        if self.video_token_id is not None:
            is_video = ids == self.video_token_id
        if int(is_video.sum()) != clips:
            raise BadInput(
                "video placeholders do not match videos",
                detail=f"{int(is_video.sum())} {prompts.VIDEO_PAD} for {clips} video(s)",
                hint="the tokenizer needs a <|video_pad|> token for video input",
            )
        is_image = ids == self.image_token_id
        if int(is_image.sum()) != images:
            raise BadInput(
                "image placeholders do not match images",
                detail=f"{int(is_image.sum())} {prompts.IMAGE_PAD} for {images} image(s)",
            )
        return is_image | is_video, is_video

    def encode_prompt(
        self,
        prompt: prompts.ChatPrompt,
        loaded: Sequence[Image.Image],
        clips: Sequence[videos.Clip] = (),
    ) -> Encoded:
        """Tokenises a ChatPrompt whose `<|image_pad|>`s stand for `loaded` images and whose
        `<|video_pad|>`s stand for `clips` (`load_video`), each kind in order.

        Raises:
          BadInput: text far over max_length, or a prompt that does not fit even with its
            text cut (too many image tokens for max_length).
        """
        text = prompt.text
        body_start = len(prompt.head)
        body_end = body_start + len(prompt.body)
        answer_start = len(text) - len(prompt.answer)
        tokens = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(tokens["input_ids"], np.int64)
        offsets = np.asarray(tokens["offset_mapping"], np.int64).reshape(-1, 2)
        is_image, is_video = self._vision_tokens(ids, len(loaded), len(clips))
        cuttable = (offsets[:, 0] >= body_start) & (offsets[:, 1] <= body_end) & ~is_image
        num_text = int(cuttable.sum())
        if num_text > FAR_OVER_FACTOR * self.max_length:
            raise BadInput(
                "text far over max_length",
                detail=f"{num_text} text tokens, max_length={self.max_length}",
                hint=f"texts over {FAR_OVER_FACTOR}x max_length are refused; raise "
                "data.max_length or shorten the text",
            )
        pixel_values, grids, intervals = self._vision_features(is_video[is_image], loaded, clips)
        # Expand each image (video) token to its merged-patch count.
        repeats = np.ones(len(ids), np.int64)
        repeats[is_image] = [t * h * w // self.merge_size**2 for t, h, w in grids]
        total = int(repeats.sum())
        excess = total - self.max_length
        keep = np.ones(len(ids), bool)
        if excess > 0:
            cut_positions = np.flatnonzero(cuttable)
            if len(cut_positions) < excess:
                raise BadInput(
                    "prompt does not fit max_length even with its text removed",
                    detail=f"{total} tokens ({total - int(repeats[~is_image].sum())} image "
                    f"tokens), max_length={self.max_length}",
                    hint="raise data.max_length, lower data.max_pixels or pick a smaller "
                    "data.image_resolution",
                )
            keep[cut_positions[len(cut_positions) - excess :]] = False
        input_ids = np.repeat(ids[keep], repeats[keep]).astype(np.int32)
        target_mask = None
        if prompt.answer:
            is_answer = (offsets[:, 0] >= answer_start).astype(np.int32)
            target_mask = np.repeat(is_answer[keep], repeats[keep]).astype(np.int32)
        return Encoded(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_thw=grids,
            target_mask=target_mask,
            truncated_tokens=max(excess, 0),
            time_intervals=intervals,
        )

    def _guarded(self, build, *, subset: str, row: Any, strict: bool) -> Encoded | None:
        """Runs `build()`; applies the on_bad_input policy to a BadInput (None when skipped),
        or, when `strict`, raises it with its subset and row for the caller to handle."""
        try:
            return build()
        except BadInput as error:
            error = error.with_context(subset=subset, row=row)
            if strict:
                raise error from None
            self.report.handle(error)
            return None

    def encode(
        self, item: EmbedItem, *, image_root: str | os.PathLike | None = None, strict: bool = False
    ) -> Encoded | None:
        """Encodes one item with the hierarchical embedding prompt (and its video clause when
        the item has a video: g2e.data.prompts).

        Returns None when the item is bad input and on_bad_input='skip' (it is counted in
        `self.report`). Raises BadInput (naming subset, row and file) under 'error', and
        always when `strict` (a worker process leaves the policy to the main process).
        """
        image = (
            None
            if item.image is None or (isinstance(item.image, str) and not item.image)
            else item.image
        )

        def build() -> Encoded:
            loaded = self.load_images([image] if image is not None else [], image_root=image_root)
            clips = []
            if item.video is not None:
                clips.append(self.load_video(item.video, image_root=image_root))
            prompt = prompts.embedding_prompt(
                item.text,
                has_image=image is not None,
                role=item.role,
                subset=item.subset,
                options=self.prompt,
                has_video=bool(clips),
            )
            return self.encode_prompt(prompt, loaded, clips)

        return self._guarded(build, subset=item.subset, row=item.row, strict=strict)

    def encode_chat(
        self,
        system: str | None,
        user: str,
        images: Sequence[images_lib.ImageSource] = (),
        *,
        user_suffix: str = "",
        answer: str | None = None,
        subset: str = "",
        row: Any = None,
        image_root: str | os.PathLike | None = None,
        strict: bool = False,
    ) -> Encoded | None:
        """Encodes a free chat turn: `user` (may hold image placeholders; else images go first)
        then `user_suffix`; with `answer`, the assistant's reply and a `target_mask` over it.

        Bad input follows the on_bad_input policy as in `encode`.
        """

        def build() -> Encoded:
            loaded = self.load_images(images, image_root=image_root)
            body = prompts.place_images(user, len(loaded))
            prompt = prompts.chat_prompt(system, body, user_suffix=user_suffix, answer=answer)
            return self.encode_prompt(prompt, loaded)

        return self._guarded(build, subset=subset, row=row, strict=strict)

    def encode_judge(
        self,
        query: EmbedItem,
        candidate: EmbedItem,
        *,
        image_root: str | os.PathLike | None = None,
        strict: bool = False,
    ) -> Encoded | None:
        """Encodes the mining stage's Yes/No judge prompt for a (query, candidate) pair."""

        def has(item):
            return item.image is not None and not (isinstance(item.image, str) and not item.image)

        def build() -> Encoded:
            sources = [item.image for item in (query, candidate) if has(item)]
            loaded = self.load_images(sources, image_root=image_root)
            prompt = prompts.judge_prompt(query.text, has(query), candidate.text, has(candidate))
            return self.encode_prompt(prompt, loaded)

        return self._guarded(build, subset=query.subset, row=query.row, strict=strict)

    def judge_token_ids(self) -> tuple[int, int]:
        """Ids of the judge's answers ('Yes', 'No'); each must be a single token."""
        ids = []
        for word in (prompts.JUDGE_YES, prompts.JUDGE_NO):
            pieces = self.tokenizer.encode(word, add_special_tokens=False)
            if len(pieces) != 1:
                raise ValueError(
                    f"the tokenizer splits the judge answer {word!r} into {pieces}; "
                    "the generative check needs it as one token"
                )
            ids.append(pieces[0])
        return ids[0], ids[1]

    # ---- batching: `self.batcher` (g2e.data.batching) collates; this adds the skip count ----

    def padding_report(self) -> dict[str, Any]:
        """Padding fractions, distinct (B, L, P) shapes compiled, truncation and skip counts."""
        return self.batcher.padding_report(skipped=self.report.total)

    def padding_share(self) -> dict[str, float]:
        """The share of token and patch slots that were padding, for a stage's summary."""
        report = self.padding_report()
        return {
            "tokens": round(report["token_padding_fraction"], 4),
            "patches": round(report["patch_padding_fraction"], 4),
        }
