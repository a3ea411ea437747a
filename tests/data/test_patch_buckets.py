"""The default patch buckets fit a common photo: 640x480 under `random` pays for 2,048 patches,
not 4,096."""

from __future__ import annotations

from PIL import Image

from g2e import configuration
from g2e.data.preprocess import EmbedItem, Processor
from tests import assets


def test_a_640x480_photo_under_random_takes_the_2048_patch_bucket(tmp_path):
    _, checkpoint = assets.tiny_checkpoint(tmp_path / "ckpt")
    data = configuration.base_config().data
    processor = Processor.from_dir(
        checkpoint,
        max_length=4096,
        image_resolution="random",
        # Qwen2-VL's own pixel range (the tiny checkpoint's may be smaller).
        min_pixels=56 * 56,
        max_pixels=28 * 28 * 1280,
        length_buckets=(4096,),
        patch_buckets=data.patch_buckets,
    )
    photo = Image.new("RGB", (640, 480), (120, 80, 40))
    encoded = processor.encode(EmbedItem("a photo", photo, "candidate"))
    assert encoded.num_patches == 1564  # 46 x 34 patches of 14 px (644 x 476 after resizing)
    length, patches = processor.batcher.shape_of([encoded])
    assert patches == 2048 and 2048 in data.patch_buckets
