"""Video in g2e's Qwen2-VL and Qwen2.5-VL: end-to-end parity with transformers' PyTorch models.

Each case is a batch of examples made of text runs, images and videos (random uint8 frames).
g2e's side goes through the host code a real input takes: `patches.patchify` (uint8
patches), `batching.Batcher.collate` (one frame per patch for image-only batches, two for a
batch with video; vision segments per temporal group; M-RoPE ids with video runs) and the jitted
model. transformers' side gets float patches made by its own image processor
(`Qwen2VLImageProcessorPil`, the normalisation and patch order of the release): an image as it
makes it, a video's temporal group from its two frames' patches (frame 0's half of the first,
frame 1's half of the second: the video processor's layout; its own video processor needs
torchvision, whose CPU build PyPI does not serve), with `mm_token_type_ids` 1/2 and, for
Qwen2.5-VL, `second_per_grid_ts`.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from g2e.data.batching import Batcher, Encoded
from g2e.data.patches import patchify, widen_frames
from g2e.models import hf_io
from tests.models import checkpoints
from tests.models.test_qwen2_vl import forward

PATCH, MERGE, TEMPORAL = 14, 2, 2

# Pieces: an int is that many text tokens; ("image", h, w) an image of h x w patches;
# ("video", frames, h, w) a video of `frames` frames of h x w patches.
CASES = {
    "video_only": (
        [[4, ("video", 4, 4, 6), 5], [("video", 2, 2, 4), 3], [2, ("video", 6, 4, 4), 1]],
        "left",
    ),
    "image_only": (
        [[3, ("image", 4, 4), 5], [7], [2, ("image", 2, 6), 1, ("image", 4, 2), 2]],
        "right",
    ),
    "mixed": (
        [
            [9],
            [2, ("image", 4, 6), 3],
            [3, ("video", 6, 4, 4), 2],
            [2, ("image", 2, 4), 1, ("video", 4, 4, 2), 3],
            [2, ("video", 2, 2, 4), ("image", 4, 2), 3],
        ],
        "left",
    ),
}

# Qwen2.5-VL seconds per temporal group of each video, in order (tokens_per_second is 2):
# 0.75 s gives a time interval of 1.5, whose floored ids (0, 1, 3, 4, ...) test the rounding.
SECONDS = (0.75, 1.0, 2.5, 0.5)


def _hf_patches(image_processor, frames: np.ndarray) -> np.ndarray:
    """float32 [p, 1176] of uint8 frames [T, H, W, 3] as transformers lays them out."""
    made = [
        image_processor(images=[Image.fromarray(f)], do_resize=False, return_tensors="np")[
            "pixel_values"
        ]
        for f in frames
    ]
    if len(frames) == 1:
        return made[0]
    groups = []
    for first, second in zip(made[::2], made[1::2]):
        group = first.reshape(len(first), 3, TEMPORAL, -1).copy()
        group[:, :, 1] = second.reshape(len(second), 3, TEMPORAL, -1)[:, :, 1]
        groups.append(group.reshape(len(first), -1))
    return np.concatenate(groups)


def build(config, examples, side, rng, image_processor, *, qwen2_5: bool, parts=None):
    """(g2e batch of numpy arrays, transformers kwargs) for the same examples; with a dict
    `parts`, also its encodings ('encoded') and batcher ('batcher')."""
    tokens = {"image": config.image_token_id, "video": config.video_token_id}
    encoded, hf_pixels, hf_grids, seconds = (
        [],
        {"image": [], "video": []},
        {"image": [], "video": []},
        [],
    )
    tps = config.vision.tokens_per_second
    for pieces in examples:
        ids, patches, grids, intervals = [], [], [], []
        for piece in pieces:
            if isinstance(piece, int):
                ids += rng.integers(0, config.image_token_id - 10, piece).tolist()
                continue
            kind, *shape = piece
            count, h, w = (1, *shape) if kind == "image" else shape
            frames = rng.integers(0, 256, (count, h * PATCH, w * PATCH, 3), dtype=np.uint8)
            ours, grid = patchify(frames, patch=PATCH, merge=MERGE, temporal=TEMPORAL)
            patches.append(ours)
            grids.append(grid)
            ids += [tokens[kind]] * (grid[0] * h * w // MERGE**2)
            hf_pixels[kind].append(_hf_patches(image_processor, frames))
            hf_grids[kind].append(grid)
            interval = 1.0
            if kind == "video" and qwen2_5:
                seconds.append(SECONDS[len(seconds) % len(SECONDS)])
                interval = float(np.float32(tps) * np.float32(seconds[-1]))
            intervals.append(interval)
        width = max((p.shape[1] for p in patches), default=3 * PATCH**2)
        pixels = [widen_frames(p, width) for p in patches]
        encoded.append(
            Encoded(
                input_ids=np.asarray(ids, np.int32),
                pixel_values=np.concatenate(pixels) if pixels else np.zeros((0, width), np.uint8),
                image_grid_thw=grids,
                time_intervals=intervals,
            )
        )
    longest = max(e.length for e in encoded) + 2
    most = max(e.num_patches for e in encoded)
    batcher = Batcher(
        pad_token_id=config.bos_token_id,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        merge_size=MERGE,
        patch_bytes=3 * PATCH**2,
        length_buckets=(longest,),
        patch_buckets=(0, most + 8),
        padding_side=side,
        window_merged=config.vision.window_merged if qwen2_5 else 0,
    )
    batch = batcher.collate(encoded)
    if parts is not None:
        parts.update(encoded=encoded, batcher=batcher)
    input_ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
    types = np.where(batch["input_ids"] == tokens["image"], 1, 0)
    types = np.where(batch["input_ids"] == tokens["video"], 2, types)
    hf = dict(
        input_ids=input_ids,
        attention_mask=torch.from_numpy(batch["attention_mask"].astype(np.int64)),
        mm_token_type_ids=torch.from_numpy(types.astype(np.int64)),
    )
    for kind, names in (
        ("image", ("pixel_values", "image_grid_thw")),
        ("video", ("pixel_values_videos", "video_grid_thw")),
    ):
        if hf_grids[kind]:
            hf[names[0]] = torch.from_numpy(np.concatenate(hf_pixels[kind]).astype(np.float32))
            hf[names[1]] = torch.tensor(hf_grids[kind])
    if qwen2_5 and seconds:
        hf["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
    return batch, hf


def hf_reference(hf_model, hf):
    """transformers' position ids [3, B, L] and last hidden states [B, L, D]."""
    rope_args = {k: hf.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
    if "second_per_grid_ts" not in hf:
        rope_args.pop("second_per_grid_ts")
    with torch.no_grad():
        position_ids, _ = hf_model.model.get_rope_index(
            hf["input_ids"],
            mm_token_type_ids=hf["mm_token_type_ids"],
            attention_mask=hf["attention_mask"],
            **rope_args,
        )
        out = hf_model(**hf, position_ids=position_ids, output_hidden_states=True)
    return position_ids.numpy(), out.hidden_states[-1].numpy()


@pytest.fixture(scope="module")
def image_processor():
    return transformers.Qwen2VLImageProcessorPil()


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def tiny(request, tmp_path_factory):
    hf_model, path = checkpoints.make_hf_checkpoint(
        tmp_path_factory.mktemp(request.param), seed=4, model_type=request.param
    )
    return hf_model, hf_io.load_model(path), request.param == "qwen2_5_vl"


@pytest.mark.parametrize("case", sorted(CASES))
def test_video_parity(tiny, image_processor, case):
    hf_model, model, qwen2_5 = tiny
    examples, side = CASES[case]
    batch, hf = build(
        model.config, examples, side, np.random.default_rng(0), image_processor, qwen2_5=qwen2_5
    )
    has_video = "pixel_values_videos" in hf
    # Image-only batches keep one frame per patch; a batch with video carries two.
    assert batch["pixel_values"].shape[-1] == (1176 if has_video else 588)
    expected_positions, expected_hidden = hf_reference(hf_model, hf)
    np.testing.assert_array_equal(batch["position_ids"], expected_positions)
    hidden, _, embeddings = forward(model, batch)
    hidden, embeddings = np.asarray(hidden), np.asarray(embeddings)
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(hidden[real], expected_hidden[real], atol=1e-4, rtol=0)
    pooled = expected_hidden[np.arange(len(real)), batch["last_index"]]
    pooled = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    np.testing.assert_allclose(embeddings, pooled, atol=1e-4, rtol=0)
    print(
        f"{case}: max |g2e - transformers| {np.abs(hidden[real] - expected_hidden[real]).max():.1e}"
    )


@jax.jit
def embed(model, batch):
    return model.embed(batch)


def test_packed_rows_with_video_equal_each_alone(tiny, image_processor):
    """Batcher.pack puts a video, an image-and-video and a text example one after another in
    a row (their own positions, time intervals and vision tokens): each one's embedding is
    the one it has alone."""
    _, model, qwen2_5 = tiny
    parts = {}
    examples, _ = CASES["mixed"]
    batch, _ = build(
        model.config,
        examples,
        "right",
        np.random.default_rng(1),
        image_processor,
        qwen2_5=qwen2_5,
        parts=parts,
    )
    encoded, batcher = parts["encoded"], parts["batcher"]
    rows = [[encoded[2], encoded[3], encoded[0]], [encoded[4], encoded[1]]]
    packed = batcher.pack(
        rows,
        pad_to_batch=2,
        length=sum(e.length for e in encoded),
        num_patches=sum(e.num_patches for e in encoded),
        segments=3,
    )
    assert packed["pixel_values"].shape[-1] == 1176
    alone = np.asarray(embed(model, batch))
    together = np.asarray(embed(model, packed))
    order = [[2, 3, 0], [4, 1]]
    for row, indices in enumerate(order):
        for slot, index in enumerate(indices):
            np.testing.assert_allclose(together[row, slot], alone[index], atol=1e-5, rtol=0)
