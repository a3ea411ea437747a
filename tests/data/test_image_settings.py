"""ImageSettings and smart_resize against transformers' Qwen2VLImageProcessorPil: the same
resized sizes for every preprocessor_config.json layout real checkpoints use, with and
without the data.min_pixels / data.max_pixels overrides."""

import itertools
import json

import pytest
import transformers
from PIL import Image
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2_vl

from g2e.data import image_settings
from g2e.data.image_settings import ImageSettings

BASE = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
}

# The layouts of preprocessor_config.json that transformers 5 loads and resizes with.
LAYOUTS = {
    # Qwen2-VL-2B-Instruct / Qwen2.5-VL-7B-Instruct on the hub: top-level bounds, no size.
    "hub": {"min_pixels": 200 * 28 * 28, "max_pixels": 1000 * 28 * 28},
    # What transformers 5 writes: size with shortest/longest edge (as pixel counts).
    "size_edges": {"size": {"shortest_edge": 64 * 28 * 28, "longest_edge": 300 * 28 * 28}},
    # transformers 4.4x: both, with size in min/max pixels; the top-level keys win.
    "size_pixels_and_top": {
        "size": {"min_pixels": 9 * 28 * 28, "max_pixels": 40 * 28 * 28},
        "min_pixels": 100 * 28 * 28,
        "max_pixels": 500 * 28 * 28,
    },
    # Later 4.x files: size edges and top-level keys that disagree; the top-level keys win.
    "size_edges_and_top": {
        "size": {"shortest_edge": 9 * 28 * 28, "longest_edge": 40 * 28 * 28},
        "min_pixels": 50 * 28 * 28,
        "max_pixels": 700 * 28 * 28,
    },
    # Only one top-level bound; the other from size.
    "size_edges_and_top_min": {
        "size": {"shortest_edge": 9 * 28 * 28, "longest_edge": 400 * 28 * 28},
        "min_pixels": 30 * 28 * 28,
    },
    # Nothing given: the class defaults (56*56, 28*28*1280); resample given as bilinear.
    "defaults": {"resample": 2},
    "nulls": {"min_pixels": None, "max_pixels": None},
}
OVERRIDES = (
    {},
    {"min_pixels": 500 * 28 * 28},
    {"max_pixels": 20 * 28 * 28},
    {"min_pixels": 4 * 28 * 28, "max_pixels": 2000 * 28 * 28},
)
# (height, width): tiny, thin, square, wide and large (smart_resize's grid below goes further).
SIZES = [
    (10, 10),
    (28, 28),
    (27, 29),
    (40, 7000),
    (3, 590),
    (100, 150),
    (224, 224),
    (333, 500),
    (480, 640),
    (719, 1281),
    (1080, 1920),
]


def write(directory, settings):
    (directory / "preprocessor_config.json").write_text(json.dumps({**BASE, **settings}))
    return directory


def hf_resized(hf_processor, height, width):
    """(height, width) transformers' processor resizes an image to, from its grid."""
    image = Image.new("RGB", (width, height))
    features = hf_processor(images=[image], return_tensors="np")
    _, grid_h, grid_w = (int(x) for x in features["image_grid_thw"][0])
    return grid_h * hf_processor.patch_size, grid_w * hf_processor.patch_size


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resized_sizes_match_transformers(tmp_path, layout):
    checkpoint = write(tmp_path, LAYOUTS[layout])
    for overrides in OVERRIDES:
        ours = ImageSettings.from_dir(checkpoint, **overrides)
        theirs = transformers.Qwen2VLImageProcessorPil.from_pretrained(checkpoint, **overrides)
        assert (ours.min_pixels, ours.max_pixels) == (
            theirs.size.shortest_edge,
            theirs.size.longest_edge,
        ), overrides
        assert ours.resample == int(theirs.resample)
        assert (ours.patch_size, ours.merge_size, ours.temporal_patch_size) == (
            theirs.patch_size,
            theirs.merge_size,
            theirs.temporal_patch_size,
        )
        for height, width in SIZES:
            assert ours.resized_size(height, width) == hf_resized(theirs, height, width), (
                overrides,
                height,
                width,
            )


def test_smart_resize_matches_transformers_over_a_grid():
    sides = [*range(1, 120, 3), *range(120, 4000, 97)]
    bounds = [(56 * 56, 28 * 28 * 1280), (3136, 12845056), (28 * 28 * 4, 28 * 28 * 16), (1, 10**9)]
    for (min_pixels, max_pixels), factor in itertools.product(bounds, (28, 32)):
        for height, width in itertools.product(sides, sides):
            kwargs = dict(factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
            try:
                expected = hf_qwen2_vl.smart_resize(height, width, **kwargs)
            except ValueError as error:
                with pytest.raises(ValueError) as ours:
                    image_settings.smart_resize(height, width, **kwargs)
                assert str(ours.value) == str(error)
                continue
            assert image_settings.smart_resize(height, width, **kwargs) == expected


def test_transformers4_size_in_pixels_is_read_as_the_bounds(tmp_path):
    # transformers 5 keeps such a size but cannot resize with it; g2e reads its bounds, which
    # give transformers' sizes once written as top-level keys.
    size = {"min_pixels": 16 * 28 * 28, "max_pixels": 90 * 28 * 28}
    ours = ImageSettings.from_dir(write(tmp_path, {"size": size}))
    theirs = transformers.Qwen2VLImageProcessorPil(**size)
    for height, width in SIZES:
        assert ours.resized_size(height, width) == hf_resized(theirs, height, width)
    assert ImageSettings.from_dir(tmp_path, max_pixels=20 * 28 * 28).max_pixels == 20 * 28 * 28


def test_a_size_without_a_bound_is_refused_naming_the_key(tmp_path):
    write(tmp_path, {"size": {"shortest_edge": 3136}})
    with pytest.raises(ValueError, match="sets no longest_edge .* add max_pixels"):
        ImageSettings.from_dir(tmp_path)
    assert ImageSettings.from_dir(tmp_path, max_pixels=50_000).max_pixels == 50_000


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json is missing"):
        ImageSettings.from_dir(tmp_path)


def test_resample_defaults_to_bicubic(tmp_path):
    assert ImageSettings.from_dir(write(tmp_path, {})).resample == Image.Resampling.BICUBIC
    assert ImageSettings.from_dir(write(tmp_path, {"resample": 0})).resample == 0
