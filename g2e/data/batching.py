"""Host-side batching: tokenised examples -> fixed-shape batches of the design contract.

Letters: B batch, L text length, P vision patches per example, M = P // 4 merged vision tokens.

`Encoded` is one example as g2e.data.preprocess.Processor.encode leaves it: token ids with each
`<|image_pad|>` (`<|video_pad|>`) expanded, and its image and video patches. `Batcher.collate` pads a list of them to the
smallest (L, P) bucket that fits, computes the M-RoPE ids and the vision layout
(g2e.models.positions), and counts the padding; `Batcher.widen` pads a batch further, to a
shape agreed across hosts. Buckets bound the number of shapes, hence of compiled programs.

Packing (`pack_rows`, `Batcher.pack`): several examples one after another in one row of a
fixed length, each its own segment (segment_ids), with its own positions and its last token
named in last_index [B, S]; the model keeps each segment's tokens to themselves, so an
example's embedding is the one it has alone, and far fewer slots are padding. A packed batch's
patches lie in vision rows of their own ([V, P], `pack_vision`: several examples' images per
row, V apart from B), so a text row is not limited by its images' patches and a vision row's
attention spans P patches, not a whole text row's; merged_token_index [B, L] names each vision
token's merged token in the flattened [V * P / 4] vision rows.

Video (g2e.models.vision explains the widths): an image-only batch carries one frame per patch
(uint8 [B, P, 588]), as before video existed; a batch with any video patch carries two
([B, P, 1176]), its images' frames duplicated. `frames=` on `collate` and `pack` forces the
wider layout (e.g. agreed across hosts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from g2e.data.patches import widen_frames
from g2e.models import positions


@dataclasses.dataclass
class Encoded:
    """One tokenised example, before padding.

    input_ids: int32 [n], `<|image_pad|>` / `<|video_pad|>` expanded; pixel_values: uint8
    [p, 588] (one frame of the example's images' patches, concatenated; the device normalises
    them), or [p, 1176] (two frames) when the example has a video;
    image_grid_thw: (t, h, w) per visual input (image or video), in token (= patch) order;
    target_mask: int32 [n], 1 on assistant-answer tokens (only from `encode_chat(answer=...)`);
    truncated_tokens: how many text tokens truncation removed;
    time_intervals: per visual input, the step of its temporal position ids (1.0 for images;
    `positions.rope_index`); empty: 1.0 for every one.
    """

    input_ids: np.ndarray
    pixel_values: np.ndarray
    image_grid_thw: list[tuple[int, int, int]]
    target_mask: np.ndarray | None = None
    truncated_tokens: int = 0
    time_intervals: list[float] = dataclasses.field(default_factory=list)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_patches(self) -> int:
        return int(self.pixel_values.shape[0])


def pick_bucket(size: int, buckets: Sequence[int], what: str) -> int:
    """Smallest bucket >= size; past the largest, a multiple of the largest (bounded programs).

    Raises:
      ValueError: for the 'length' buckets, whose largest must hold max_length.
    """
    for bucket in buckets:
        if bucket >= size:
            return bucket
    largest = buckets[-1]
    if what == "length" or largest <= 0:
        raise ValueError(
            f"{what} {size} exceeds the largest {what} bucket {largest}; add a "
            f"larger one to data.{what}_buckets"
        )
    return -(-size // largest) * largest


def _first_fit(sizes: dict[int, int], capacity: int) -> list[list[int]]:
    """The keys of `sizes` grouped into bins whose sizes sum to at most `capacity`: first fit,
    largest first."""
    bins: list[list[int]] = []
    room: list[int] = []
    for key in sorted(sizes, key=lambda k: -sizes[k]):
        for number, left in enumerate(room):
            if sizes[key] <= left:
                bins[number].append(key)
                room[number] -= sizes[key]
                break
        else:
            bins.append([key])
            room.append(capacity - sizes[key])
    return bins


def pack_rows(encoded: Sequence[Encoded], *, length: int) -> list[list[int]]:
    """Indices of `encoded` grouped into rows of at most `length` tokens each: first fit,
    longest first (their patches go to vision rows of their own: `pack_vision`)."""
    longest = max((item.length for item in encoded), default=0)
    if longest > length:
        raise ValueError(
            f"pack_rows: an example of {longest} tokens does not fit a packed row of "
            f"{length}; make data.pack_length at least data.max_length"
        )
    return _first_fit({i: item.length for i, item in enumerate(encoded)}, length)


def pack_vision(encoded: Sequence[Encoded], capacity: int) -> list[list[int]]:
    """Indices of the encodings with patches grouped into vision rows of at most `capacity`
    patches each: first fit, most patches first; an encoding's patches stay in one row."""
    most = max((item.num_patches for item in encoded), default=0)
    if most > capacity:
        raise ValueError(
            f"pack_vision: an example of {most} patches does not fit a vision row of "
            f"{capacity}; the vision rows must hold the step's largest example"
        )
    return _first_fit({i: e.num_patches for i, e in enumerate(encoded) if e.num_patches}, capacity)


def fine_bucket(count: int, multiple: int) -> int:
    """Rows that hold `count` rows: a multiple of `multiple` (the devices along the batch axes)
    times 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, ... (four sizes an octave: at most a
    quarter of the rows are padding, with a few programs an octave)."""
    units = max(-(-count // multiple), 1)
    step = 1 << max(units.bit_length() - 3, 0)
    return multiple * -(-units // step) * step


def segment_bucket(count: int) -> int:
    """Segment slots of a packed batch: the smallest power of two >= count."""
    return 1 << max(count - 1, 0).bit_length()


def default_length_buckets(max_length: int) -> tuple[int, ...]:
    """Powers of two from 64 below max_length, then max_length."""
    buckets, size = [], 64
    while size < max_length:
        buckets.append(size)
        size *= 2
    return (*buckets, max_length)


def default_patch_buckets(max_patches_per_image: int) -> tuple[int, ...]:
    """0 (text only), powers of four from 64 below the per-image maximum, then that maximum."""
    top = -(-max_patches_per_image // 4) * 4
    return (0, *[b for b in (64, 256, 1024, 4096, 16384, 65536) if b < top], top)


def _new_stats() -> dict[str, int]:
    return dict(
        batches=0,
        real_tokens=0,
        token_slots=0,
        real_patches=0,
        patch_slots=0,
        truncated_items=0,
        truncated_tokens=0,
    )


@dataclasses.dataclass
class Batcher:
    """Pads `Encoded`s into fixed-shape batches and counts the padding (module docstring).

    pad_token_id / image_token_id: the tokenizer's; merge_size: vision patches merged per side
    (2); patch_bytes: bytes of one patch frame (588); length_buckets / patch_buckets: sorted;
    padding_side: 'right' or 'left'; window_merged: Qwen2.5-VL's attention windows in merged
    units (0: Qwen2-VL, no windows); video_token_id: the tokenizer's `<|video_pad|>` (None: no
    video). `stats` and `shapes` count what `collate` and `widen` made.

    Raises (on construction):
      ValueError: a patch bucket is not a multiple of merge_size ** 2.
    """

    pad_token_id: int
    image_token_id: int
    merge_size: int
    patch_bytes: int
    length_buckets: tuple[int, ...]
    patch_buckets: tuple[int, ...]
    padding_side: str = "right"
    window_merged: int = 0
    video_token_id: int | None = None
    stats: dict[str, int] = dataclasses.field(default_factory=_new_stats)
    shapes: set[tuple[int, int, int]] = dataclasses.field(default_factory=set)

    def __post_init__(self):
        unit = self.merge_size**2
        if any(b % unit for b in self.patch_buckets):
            raise ValueError(f"patch buckets {self.patch_buckets} must be multiples of {unit}")

    def collate(
        self,
        encoded: Sequence[Encoded],
        *,
        pad_to_batch: int | None = None,
        length: int | None = None,
        num_patches: int | None = None,
        frames: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Pads encodings into the fixed-shape batch of the design contract.

        L and P are the smallest buckets that fit, unless `length` / `num_patches` fix them
        (e.g. to a shape agreed across hosts; they must hold every encoding). With
        `pad_to_batch=N`, dummy rows (one attended pad token, no image) fill the batch to N
        rows, so `encoded` may even be empty; the caller drops the dummy rows' outputs.
        A `target_mask` [B, L] is added when any encoding carries one. `frames` (1 or 2):
        the frames per patch of pixel_values; None: 2 when any encoding has video, else 1.

        Raises:
          ValueError: more encodings than pad_to_batch (or none), or a fixed (L, P) that
            cannot hold them or is not a multiple of the merged unit.
        """
        count = len(encoded)
        batch = pad_to_batch or count
        if batch == 0 or count > batch:
            raise ValueError(f"collate got {count} encodings for pad_to_batch={pad_to_batch}")
        length, num_patches = self._fixed_shape(encoded, length, num_patches)
        arrays = self._empty_arrays(batch, length, num_patches, self.frames_of(encoded, frames))
        grids = [
            self._fill_row(arrays, row, encoded[row] if row < count else None)
            for row in range(batch)
        ]
        position_ids = self._rope_index(
            arrays["input_ids"], arrays["attention_mask"], encoded, grids
        )
        self._count(encoded, batch, length, num_patches)
        with_targets = any(e.target_mask is not None for e in encoded)
        return self._batch_dict(arrays, position_ids, with_targets=with_targets)

    def _fixed_shape(
        self, encoded: Sequence[Encoded], length: int | None, num_patches: int | None
    ) -> tuple[int, int]:
        """(L, P) of the batch: the given ones, checked, else the smallest buckets that fit."""
        longest = max((e.length for e in encoded), default=1)
        most_patches = max((e.num_patches for e in encoded), default=0)
        if length is None:
            length = pick_bucket(longest, self.length_buckets, "length")
        if num_patches is None:
            num_patches = self.patch_bucket(most_patches)
        if length < longest or num_patches < most_patches:
            raise ValueError(
                f"collate: (length={length}, num_patches={num_patches}) cannot hold "
                f"an encoding of {longest} tokens / {most_patches} patches"
            )
        if num_patches % self.merge_size**2:
            raise ValueError(
                f"collate: num_patches={num_patches} must be a multiple of {self.merge_size**2}"
            )
        return length, num_patches

    def frames_of(self, encoded: Sequence[Encoded], frames: int | None = None) -> int:
        """Frames per patch of a batch of `encoded`: `frames` if given, else 2 when some
        encoding carries two-frame (video) patches, else 1.

        Raises:
          ValueError: `frames` is 1 but an encoding has video patches, or is not 1 or 2.
        """
        needed = 2 if any(e.pixel_values.shape[-1] == 2 * self.patch_bytes for e in encoded) else 1
        if frames is None:
            return needed
        if frames not in (1, 2) or frames < needed:
            raise ValueError(
                f"collate: frames={frames} cannot hold these encodings (they need {needed})"
            )
        return frames

    def _rope_index(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        encoded: Sequence[Encoded],
        grids: Sequence[Sequence[tuple[int, int, int]]],
    ) -> np.ndarray:
        """M-RoPE ids [3, B, L] of rows holding `encoded` in order (dummy rows after them)."""
        intervals = [list(e.time_intervals) for e in encoded]
        intervals += [[] for _ in range(len(grids) - len(encoded))]
        return positions.rope_index(
            input_ids,
            attention_mask,
            grids,
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            time_intervals=intervals,
            spatial_merge_size=self.merge_size,
        )

    def _is_vision(self, input_ids: np.ndarray) -> np.ndarray:
        """Where `input_ids` hold an image or a video token."""
        is_vision = input_ids == self.image_token_id
        if self.video_token_id is not None:
            is_vision |= input_ids == self.video_token_id
        return is_vision

    def _empty_arrays(
        self, batch: int, length: int, num_patches: int, frames: int = 1, vision_rows: int = 0
    ) -> dict[str, np.ndarray]:
        """The batch's arrays, all padding: pad tokens, nothing attended, no patches; the
        patch fields have `vision_rows` rows (0: one per text row)."""
        vision = vision_rows or batch
        return dict(
            input_ids=np.full((batch, length), self.pad_token_id, np.int32),
            attention_mask=np.zeros((batch, length), np.int32),
            image_token_index=np.zeros((batch, length), np.int32),
            last_index=np.zeros((batch,), np.int32),
            pixel_values=np.zeros((vision, num_patches, frames * self.patch_bytes), np.uint8),
            vision_segment_ids=np.zeros((vision, num_patches), np.int32),
            vision_positions=np.zeros((vision, num_patches, 2), np.int32),
            vision_window_ids=np.zeros((vision, num_patches), np.int32),  # Qwen2.5-VL only
            target_mask=np.zeros((batch, length), np.int32),
        )

    def _fill_row(
        self, arrays: dict[str, np.ndarray], row: int, item: Encoded | None
    ) -> list[tuple[int, int, int]]:
        """Writes `item` (None: a dummy row) into `row` of `arrays`; returns its image grids."""
        length = arrays["input_ids"].shape[1]
        size = item.length if item is not None else 1
        start = 0 if self.padding_side == "right" else length - size
        span = slice(start, start + size)
        arrays["attention_mask"][row, span] = 1
        arrays["last_index"][row] = start + size - 1
        if item is None:  # A dummy row: one attended pad token keeps softmaxes finite.
            return []
        arrays["input_ids"][row, span] = item.input_ids
        is_vision = self._is_vision(item.input_ids)
        arrays["image_token_index"][row, start + np.flatnonzero(is_vision)] = np.arange(
            int(is_vision.sum()), dtype=np.int32
        )
        if item.target_mask is not None:
            arrays["target_mask"][row, span] = item.target_mask
        arrays["pixel_values"][row, : item.num_patches] = widen_frames(
            item.pixel_values, arrays["pixel_values"].shape[-1]
        )
        self._fill_vision(arrays, row, item.image_grid_thw)
        return list(item.image_grid_thw)

    def _fill_vision(self, arrays: dict[str, np.ndarray], row: int, grids: Sequence) -> None:
        """The patch positions, attention segments (and windows) of `row`'s images, `grids`."""
        num_patches = arrays["pixel_values"].shape[1]
        if not num_patches:
            return
        arrays["vision_positions"][row], arrays["vision_segment_ids"][row] = (
            positions.vision_layout(grids, num_patches, self.merge_size)
        )
        if self.window_merged:
            arrays["vision_window_ids"][row] = positions.vision_window_ids(
                grids, num_patches, self.window_merged, self.merge_size
            )

    def _batch_dict(
        self, arrays: dict[str, np.ndarray], position_ids: np.ndarray, *, with_targets: bool
    ) -> dict[str, np.ndarray]:
        """The batch dict of the design contract, its optional fields only where they apply."""
        out = dict(
            input_ids=arrays["input_ids"],
            attention_mask=arrays["attention_mask"],
            position_ids=position_ids,
            pixel_values=arrays["pixel_values"],
            vision_segment_ids=arrays["vision_segment_ids"],
            vision_positions=arrays["vision_positions"],
            image_token_index=arrays["image_token_index"],
            last_index=arrays["last_index"],
        )
        if with_targets:
            out["target_mask"] = arrays["target_mask"]
        if self.window_merged:
            out["vision_window_ids"] = arrays["vision_window_ids"]
        return out

    def pack(
        self,
        rows: Sequence[Sequence[Encoded]],
        *,
        pad_to_batch: int,
        length: int,
        num_patches: int,
        segments: int,
        frames: int | None = None,
        vision_rows: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Packs rows of encodings (`pack_rows`) into a batch of `pad_to_batch` rows of
        `length` tokens with `segments` slots per row, and their patches into `vision_rows`
        vision rows of `num_patches` patches (`pack_vision`; None: as many as they fill).

        Each encoding is one segment, its tokens right after the previous one's: segment_ids
        [B, L] (1, 2, ... in a row, 0 on padding), positions as `collate` gives it alone,
        last_index [B, segments] (its last token; 0 in unused slots), merged_token_index
        [B, L] (its vision tokens' merged tokens in the flattened vision rows; 0 elsewhere).
        Text rows past `rows` are dummies, as in `collate`; `frames` as in `collate`."""
        if len(rows) > pad_to_batch or max(map(len, rows), default=0) > segments:
            raise ValueError(
                f"pack: {len(rows)} rows of up to {max(map(len, rows), default=0)} segments "
                f"for pad_to_batch={pad_to_batch}, segments={segments}"
            )
        items = [item for row in rows for item in row]
        vision = pack_vision(items, num_patches) if num_patches else []
        vision_rows = len(vision) if vision_rows is None else vision_rows
        if len(vision) > vision_rows or (vision and not vision_rows):
            raise ValueError(f"pack: {len(vision)} vision rows for vision_rows={vision_rows}")
        arrays = self._empty_arrays(
            pad_to_batch, length, num_patches, self.frames_of(items, frames), max(vision_rows, 1)
        )
        arrays["segment_ids"] = np.zeros((pad_to_batch, length), np.int32)
        arrays["last_index"] = np.zeros((pad_to_batch, segments), np.int32)
        arrays["attention_mask"][len(rows) :, 0] = 1  # dummies: one attended pad token
        merged = num_patches // self.merge_size**2  # merged tokens per vision row
        first_merged = np.zeros(len(items), np.int64)  # each item's first merged token
        for v, members in enumerate(vision):
            patch_start = 0
            for i in members:
                item = items[i]
                patches = slice(patch_start, patch_start + item.num_patches)
                arrays["pixel_values"][v, patches] = widen_frames(
                    item.pixel_values, arrays["pixel_values"].shape[-1]
                )
                first_merged[i] = v * merged + patch_start // self.merge_size**2
                patch_start = patches.stop
            self._fill_vision(arrays, v, [g for i in members for g in items[i].image_grid_thw])
        alone = self._positions_alone(items) if items else None
        position_ids = np.zeros((3, pad_to_batch, length), np.int32)
        number = 0
        for r, row in enumerate(rows):
            start = 0
            for s, item in enumerate(row):
                span = slice(start, start + item.length)
                for name, value in (("input_ids", item.input_ids), ("attention_mask", 1)):
                    arrays[name][r, span] = value
                arrays["segment_ids"][r, span] = s + 1
                arrays["last_index"][r, s] = span.stop - 1
                position_ids[:, r, span] = alone[:, number, : item.length]
                is_vision = np.flatnonzero(self._is_vision(item.input_ids))
                arrays["image_token_index"][r, start + is_vision] = first_merged[
                    number
                ] + np.arange(len(is_vision), dtype=np.int32)
                start, number = span.stop, number + 1
        self._count(items, pad_to_batch, length, num_patches, patch_rows=max(vision_rows, 1))
        out = self._batch_dict(arrays, position_ids, with_targets=False)
        out["merged_token_index"] = out.pop("image_token_index")
        return out | {"segment_ids": arrays["segment_ids"]}

    def widen_packed(
        self,
        batch: dict[str, np.ndarray],
        *,
        rows: int,
        num_patches: int,
        segments: int,
        vision_rows: int,
    ) -> dict[str, np.ndarray]:
        """A packed batch (`pack`) padded to more text rows (dummies, as `pack` makes them),
        segment slots (unused slots name token 0), vision rows and patches per vision row
        (merged_token_index follows its tokens into the wider rows)."""
        old_vision, old_patches = batch["pixel_values"].shape[:2]
        extra_rows = rows - batch["input_ids"].shape[0]
        extra_patches = num_patches - old_patches
        extra_slots = segments - batch["last_index"].shape[1]
        extra_vision = vision_rows - old_vision
        if min(extra_rows, extra_patches, extra_slots, extra_vision) < 0:
            raise ValueError(
                f"widen_packed: ({rows}, {num_patches}, {segments}, {vision_rows}) is smaller "
                "than the batch's"
            )
        out = {}
        for name, value in batch.items():
            widths = [(0, 0)] * value.ndim
            if name.startswith("vision_") or name == "pixel_values":
                widths[0], widths[1] = (0, extra_vision), (0, extra_patches)
            else:
                widths[1 if name == "position_ids" else 0] = (0, extra_rows)
            if name == "last_index":
                widths[1] = (0, extra_slots)
            fill = self.pad_token_id if name == "input_ids" else 0
            out[name] = np.pad(value, widths, constant_values=fill)
        out["attention_mask"][rows - extra_rows :, 0] = 1  # dummies: one attended pad token
        unit = self.merge_size**2
        if extra_patches and old_patches:  # vision row v's tokens start at v * P / 4
            index = out["merged_token_index"]
            out["merged_token_index"] = (
                index // (old_patches // unit) * (num_patches // unit)
                + index % (old_patches // unit)
            ).astype(np.int32)
        length = batch["input_ids"].shape[1]
        self.stats["token_slots"] += extra_rows * length
        self.stats["patch_slots"] += old_vision * extra_patches + extra_vision * num_patches
        self.shapes.add((rows, length, num_patches))
        return out

    def for_process(self, batch: dict[str, np.ndarray], process: int) -> dict[str, np.ndarray]:
        """A packed batch as process `process` feeds its share of a global one: put_batch lays
        the processes' rows one after another, so merged_token_index moves past the vision
        rows of processes 0..process-1 (every process has as many, of as many patches)."""
        if not process or "merged_token_index" not in batch:
            return batch
        rows, patches = batch["pixel_values"].shape[:2]
        shift = process * rows * (patches // self.merge_size**2)
        return {**batch, "merged_token_index": batch["merged_token_index"] + shift}

    def vision_shape(
        self, encoded: Sequence[Encoded], patches: int, multiple: int = 1, *, fit: bool = False
    ) -> tuple[int, int]:
        """(patches per vision row, vision rows) of a packed batch of `encoded`: rows of
        `patches` (data.pack_patches; the patch bucket of its largest example where that is
        more), as few as hold its images (`pack_vision`), `fine_bucket` of `multiple`;
        (0, multiple) when no example has patches. With `fit`, of the row sizes that are
        multiples of that bucket up to `patches`, the one with the fewest patch slots (ties:
        the smaller, whose attention costs less): a training step's fixed number of examples
        leaves few such shapes.
        """
        largest = max((e.num_patches for e in encoded), default=0)
        if largest == 0:
            return 0, multiple
        base = self.patch_bucket(largest)
        sizes = range(base, max(patches, base) + 1, base) if fit else [max(patches, base)]
        shapes = [(size, fine_bucket(len(pack_vision(encoded, size)), multiple)) for size in sizes]
        return min(shapes, key=lambda shape: (shape[0] * shape[1], shape[0]))

    def _positions_alone(self, items: Sequence[Encoded]) -> np.ndarray:
        """M-RoPE ids [3, N, longest] of each encoding as the only one of its row."""
        longest = max(item.length for item in items)
        input_ids = np.full((len(items), longest), self.pad_token_id, np.int32)
        attention_mask = np.zeros((len(items), longest), np.int32)
        for i, item in enumerate(items):
            input_ids[i, : item.length] = item.input_ids
            attention_mask[i, : item.length] = 1
        return self._rope_index(
            input_ids, attention_mask, items, [list(item.image_grid_thw) for item in items]
        )

    def shape_of(self, encoded: Sequence[Encoded]) -> tuple[int, int]:
        """(length bucket, patch bucket) `collate` picks for these encodings."""
        longest = max((e.length for e in encoded), default=1)
        most_patches = max((e.num_patches for e in encoded), default=0)
        return pick_bucket(longest, self.length_buckets, "length"), self.patch_bucket(most_patches)

    def patch_bucket(self, patches: int) -> int:
        """The patch bucket of a row of `patches` patches (0: a text-only row)."""
        return 0 if patches == 0 else pick_bucket(patches, self.patch_buckets, "patch")

    def widen(
        self, batch: dict[str, np.ndarray], *, length: int, num_patches: int
    ) -> dict[str, np.ndarray]:
        """A collated batch padded to a larger (length, num_patches), as `collate` would have
        padded it (e.g. to a shape agreed across hosts after collating locally)."""
        extra_length = length - batch["input_ids"].shape[1]
        extra_patches = num_patches - batch["pixel_values"].shape[1]
        if extra_length < 0 or extra_patches < 0:
            raise ValueError(
                f"widen: ({length}, {num_patches}) is smaller than the batch's "
                f"{batch['input_ids'].shape[1]}, {batch['pixel_values'].shape[1]}"
            )
        if not extra_length and not extra_patches:
            return batch
        left = self.padding_side == "left"
        out = {}
        for name, value in batch.items():
            widths = [(0, 0)] * value.ndim
            if name in ("input_ids", "attention_mask", "image_token_index", "target_mask"):
                widths[1] = (extra_length, 0) if left else (0, extra_length)
            elif name == "position_ids":
                widths[2] = (extra_length, 0) if left else (0, extra_length)
            elif name.startswith("vision_") or name == "pixel_values":
                widths[1] = (0, extra_patches)
            fill = self.pad_token_id if name == "input_ids" else 0
            out[name] = np.pad(value, widths, constant_values=fill)
        if left:
            out["last_index"] = batch["last_index"] + extra_length
        rows = batch["input_ids"].shape[0]
        self.stats["token_slots"] += rows * extra_length
        self.stats["patch_slots"] += rows * extra_patches
        self.shapes.add((rows, length, num_patches))
        return out

    def _count(
        self,
        encoded: Sequence[Encoded],
        batch: int,
        length: int,
        num_patches: int,
        *,
        patch_rows: int | None = None,
    ) -> None:
        self.stats["batches"] += 1
        self.stats["real_tokens"] += sum(e.length for e in encoded)
        self.stats["token_slots"] += batch * length
        self.stats["real_patches"] += sum(e.num_patches for e in encoded)
        self.stats["truncated_items"] += sum(e.truncated_tokens > 0 for e in encoded)
        self.stats["truncated_tokens"] += sum(e.truncated_tokens for e in encoded)
        self.stats["patch_slots"] += (batch if patch_rows is None else patch_rows) * num_patches
        self.shapes.add((batch, length, num_patches))

    def padding_report(self, *, skipped: int) -> dict[str, Any]:
        """Padding fractions, distinct (B, L, P) shapes made, truncation counts and `skipped`
        (the items refused as bad input, counted by the caller)."""
        stats = self.stats

        def fraction(real: int, slots: int) -> float:
            return 0.0 if slots == 0 else 1.0 - real / slots

        return dict(
            batches=stats["batches"],
            token_padding_fraction=fraction(stats["real_tokens"], stats["token_slots"]),
            patch_padding_fraction=fraction(stats["real_patches"], stats["patch_slots"]),
            shapes=sorted(self.shapes),
            truncated_items=stats["truncated_items"],
            truncated_tokens=stats["truncated_tokens"],
            skipped=skipped,
        )
