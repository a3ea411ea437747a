"""Video input on the host: frames from lists, folders and files (g2e.data.videos), the video
clause of the prompt, and `Processor.encode` of a video item end to end against transformers."""

from __future__ import annotations

import sys

import av
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from g2e.data import prompts, videos
from g2e.data.errors import BadInput
from g2e.data.preprocess import EmbedItem, Processor
from g2e.demo import tiny
from g2e.models import hf_io
from tests.models.test_qwen2_vl import forward
from tests.models.test_video import _hf_patches, hf_reference


def solid(value: int, size=(56, 84)) -> Image.Image:
    """A frame of one grey level (width, height) = size."""
    return Image.new("RGB", size, (value, value, value))


def levels(clip: videos.Clip) -> list[int]:
    return [int(np.asarray(f)[..., 0].mean().round()) for f in clip.frames]


def test_frame_list_sampled_uniformly_and_padded_to_even(tmp_path):
    paths = []
    for i in range(10):
        solid(10 * i).save(tmp_path / f"{i}.png")
        paths.append(f"{i}.png")
    clip = videos.load_clip(paths, count=4, image_root=tmp_path)
    assert levels(clip) == [0, 30, 60, 90]  # linspace(0, 9, 4) -> 0, 3, 6, 9
    assert clip.sampled_fps == videos.DEFAULT_FPS
    odd = videos.load_clip([solid(10 * i) for i in range(10)], count=3)
    assert levels(odd) == [0, 40, 90, 90]  # 0, 4, 9, then the last repeated
    short = videos.load_clip([solid(5), solid(7)], count=4)
    assert levels(short) == [5, 5, 5, 7]  # linspace(0, 1, 4) -> 0, 0, 0, 1


def test_folder_in_natural_order(tmp_path):
    for i in range(1, 13):
        solid(10 * i).save(tmp_path / f"frame{i}.jpg", quality=100)
    (tmp_path / "notes.txt").write_text("not a frame")
    clip = videos.load_clip(tmp_path, count=4)
    # linspace(0, 11, 4) -> 0, 3, 7, 11: frame1, frame4, frame8, frame12 (not frame10 first).
    assert levels(clip) == [10, 40, 80, 120]
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="holds no frame images"):
        videos.load_clip(tmp_path / "empty", count=2)


def write_video(path, values, fps=10):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for value in values:
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), value, np.uint8), "rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_video_file_decoded_with_pyav(tmp_path, monkeypatch):
    write_video(tmp_path / "clip.mp4", [8 * i for i in range(20)])
    clip = videos.load_clip("clip.mp4", count=4, image_root=tmp_path)
    # linspace(0, 19, 4) -> 0, 6, 12, 19; lossy codec: within a few levels.
    np.testing.assert_allclose(levels(clip), [0, 48, 96, 152], atol=4)
    assert clip.sampled_fps == pytest.approx(4 / 20 * 10)
    with pytest.raises(BadInput, match="missing video") as missing:
        videos.load_clip("nope.mp4", count=4, image_root=tmp_path)
    assert "nope.mp4" in str(missing.value)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(BadInput, match="cannot decode video file"):
        videos.load_clip("broken.mp4", count=4, image_root=tmp_path)
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(BadInput, match="PyAV is not installed") as no_av:
        videos.load_clip("clip.mp4", count=4, image_root=tmp_path)
    assert "clip.mp4" in str(no_av.value) and "frame images" in str(no_av.value)


def test_prompt_video_clause():
    text = "Represent the given video for retrieval."
    query = prompts.embedding_prompt(text, has_image=False, role="query", has_video=True)
    assert query.head.startswith(f"<|im_start|>system\n{prompts.VIDEO_SYSTEM_PROMPT}")
    assert query.body == f"{prompts.VIDEO_PAD}\n{text}"
    assert query.tail.startswith(prompts.QUERY_SUFFIX_WITH_VIDEO)
    placed = prompts.embedding_prompt(
        "<|video_1|> what happens?", has_image=False, role="candidate", has_video=True
    )
    assert placed.body == f"{prompts.VIDEO_PAD} what happens?" and placed.tail.startswith("<|im")
    # Inputs without a video keep the paper's prompt.
    image = prompts.embedding_prompt("x", has_image=True, role="query")
    assert prompts.SYSTEM_PROMPT in image.head and prompts.VIDEO_SYSTEM_PROMPT not in image.head
    with pytest.raises(BadInput, match="video placeholders"):
        prompts.embedding_prompt("<|video_1|>", has_image=False, role="query")


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def checkpoint(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    tiny.write_assets(out, texts=["a clip of a cat", "the cat jumps"], model_type=request.param)
    model_class = (
        transformers.Qwen2_5_VLForConditionalGeneration
        if request.param == "qwen2_5_vl"
        else transformers.Qwen2VLForConditionalGeneration
    )
    config = transformers.AutoConfig.from_pretrained(out)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf_model = model_class(config).float().eval()
    hf_model.save_pretrained(out)
    return out, hf_model


def test_video_item_end_to_end_equals_transformers(checkpoint, tmp_path):
    """Processor.encode (frames sampled, prompt, <|video_pad|> expansion, time intervals) ->
    collate -> g2e's model equals transformers fed the same frames, the same prompt text,
    `second_per_grid_ts` = 2 / 24 (frames without a rate) and its image processor's floats."""
    path, hf_model = checkpoint
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (56, 84, 3), np.uint8)) for _ in range(7)]
    for i, frame in enumerate(frames):
        frame.save(tmp_path / f"f{i}.png")
    processor = Processor.from_dir(path, max_length=256, video_frames=3, image_root=tmp_path)
    image = Image.fromarray(rng.integers(0, 256, (56, 56, 3), np.uint8))
    items = [
        EmbedItem("the cat jumps", None, "query", video=[f"f{i}.png" for i in range(7)]),
        EmbedItem("a clip of a cat", image, "candidate", video=tmp_path),
        EmbedItem("the cat jumps", None, "candidate"),
    ]
    encoded = [processor.encode(item) for item in items]
    assert encoded[0].image_grid_thw == [(2, 4, 6)]  # 3 frames sampled, padded to 4
    batch = processor.batcher.collate(encoded)
    assert batch["pixel_values"].shape[-1] == 1176
    model = hf_io.load_model(path)
    qwen2_5 = model.config.vision.is_qwen2_5

    hf_frames = [np.stack([np.asarray(frames[i]) for i in (0, 3, 6, 6)])] * 2
    image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(path)
    ids = batch["input_ids"]
    types = np.where(ids == model.config.image_token_id, 1, 0)
    types = np.where(ids == model.config.video_token_id, 2, types)
    hf = dict(
        input_ids=torch.from_numpy(ids.astype(np.int64)),
        attention_mask=torch.from_numpy(batch["attention_mask"].astype(np.int64)),
        mm_token_type_ids=torch.from_numpy(types),
        pixel_values=torch.from_numpy(_hf_patches(image_processor, np.asarray(image)[None])),
        image_grid_thw=torch.tensor([(1, 4, 4)]),
        pixel_values_videos=torch.from_numpy(
            np.concatenate([_hf_patches(image_processor, f) for f in hf_frames])
        ),
        video_grid_thw=torch.tensor([(2, 4, 6)] * 2),
    )
    if qwen2_5:
        hf["second_per_grid_ts"] = torch.tensor([2 / 24] * 2, dtype=torch.float32)
    expected_positions, expected_hidden = hf_reference(hf_model, hf)
    np.testing.assert_array_equal(batch["position_ids"], expected_positions)
    _, _, embeddings = forward(model, batch)
    pooled = expected_hidden[np.arange(3), batch["last_index"]]
    pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(embeddings), pooled, atol=1e-4, rtol=0)
    text = processor.tokenizer.decode(encoded[0].input_ids)
    assert prompts.VIDEO_SYSTEM_PROMPT in text and prompts.QUERY_SUFFIX_WITH_VIDEO in text
