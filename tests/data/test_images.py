"""Safe image loading (each bad-input case), RGB conversion and the resolution policies."""

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from g2e.data import images
from g2e.data.errors import BadInput, BadInputReport


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def noise(height=40, width=60, seed=0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def root(tmp_path):
    (tmp_path / "images" / "Sub").mkdir(parents=True)
    noise().save(tmp_path / "images" / "Sub" / "ok.png")
    (tmp_path / "images" / "Sub" / "empty.jpg").write_bytes(b"")
    jpeg = encode(noise(), "JPEG")
    (tmp_path / "images" / "Sub" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "images" / "Sub" / "text.jpg").write_bytes(b"this is not an image")
    (tmp_path / "secret.png").write_bytes(encode(noise()))
    return tmp_path


def test_loads_relative_path_as_rgb(root):
    image = images.load_image("images/Sub/ok.png", image_root=root)
    assert image.mode == "RGB" and image.size == (60, 40)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(noise()))


@pytest.mark.parametrize(
    "path, reason",
    [
        ("images/Sub/missing.png", "missing image"),
        ("images/Sub/empty.jpg", "empty image file"),
        ("images/Sub/cut.jpg", "truncated or corrupt image"),
        ("images/Sub/text.jpg", "cannot decode image"),
        ("../secret.png", "escapes the image root"),
        ("images/../../secret.png", "escapes the image root"),
        ("/etc/passwd", "escapes the image root"),
    ],
)
def test_bad_image_files(root, path, reason):
    with pytest.raises(BadInput, match=reason) as info:
        images.load_image(path, image_root=root / "images" / "..")
    assert info.value.file  # The error names the file.


def test_escape_check_is_lexical_so_symlinked_roots_work(tmp_path, root):
    link = tmp_path / "linked_root"
    link.symlink_to(root / "images")
    assert images.load_image("Sub/ok.png", image_root=link).size == (60, 40)


def test_empty_bytes_and_bad_bytes():
    with pytest.raises(BadInput, match="0 bytes"):
        images.load_image(b"")
    with pytest.raises(BadInput, match="cannot decode"):
        images.load_image(b"\x89PNG garbage")


def test_decompression_bomb_refused_before_decoding():
    # 10000 x 9000 one-bit pixels: a tiny file declaring 90M pixels (> PIL's 89.5M limit).
    bomb = encode(Image.new("1", (10000, 9000)))
    assert len(bomb) < 200_000
    with pytest.raises(BadInput, match="decompression bomb"):
        images.load_image(bomb)
    with pytest.raises(BadInput, match="decompression bomb"):
        images.load_image(encode(noise()), max_declared_pixels=100)


def test_mode_conversions_are_deterministic():
    # Grayscale.
    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    rgb = np.asarray(images.load_image(encode(grey)))
    np.testing.assert_array_equal(rgb, np.repeat(np.asarray(grey)[..., None], 3, -1))
    # RGBA: transparent pixels become white, opaque ones keep their colour.
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[0, 1] = (255, 0, 0, 0)
    rgba[1, 0] = (0, 0, 255, 128)
    out = np.asarray(images.load_image(encode(Image.fromarray(rgba, "RGBA"))))
    np.testing.assert_array_equal(out[0, 0], (255, 0, 0))
    np.testing.assert_array_equal(out[0, 1], (255, 255, 255))
    np.testing.assert_array_equal(out[1, 0], (127, 127, 255))
    # 16-bit grey: scaled to 8 bits with rounding, not clipped.
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    out = np.asarray(images.load_image(encode(Image.fromarray(values))))
    np.testing.assert_array_equal(out[0, :, 0], (0, 1, 128, 255))
    # CMYK JPEG: PIL's conversion, and the same bytes give the same pixels every time.
    cmyk = encode(noise().convert("CMYK"), "JPEG")
    first, second = (np.asarray(images.load_image(cmyk)) for _ in range(2))
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB")))
    # Palette with a transparent index.
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 255, 0] * 256)
    palette.info["transparency"] = 0
    np.testing.assert_array_equal(np.asarray(images.load_image(palette))[0, 0], (255, 255, 255))
    for mode in ("L", "LA", "1", "I", "F", "RGB"):
        assert images.load_image(Image.new(mode, (3, 3))).mode == "RGB"


def test_square_policies():
    image = noise(50, 80)
    for name, side in images.SQUARE_POLICIES.items():
        resized = images.apply_policy(image, name)
        assert resized.size == (side, side)
    assert images.SQUARE_POLICIES == {
        "high": 1344,
        "mid_high": 768,
        "mid": 672,
        "mid_low": 448,
        "clip": 336,
        "low": 128,
    }
    np.testing.assert_array_equal(
        np.asarray(images.apply_policy(image, "clip")),
        np.asarray(image.resize((336, 336), Image.Resampling.BICUBIC)),
    )
    assert images.apply_policy(image, "processor") is image
    with pytest.raises(ValueError, match="image_resolution"):
        images.apply_policy(image, "ultra")


@pytest.mark.parametrize(
    "size, expected",
    [
        ((400, 400), (400, 400)),  # within bounds: unchanged
        ((2000, 1500), (992, 744)),  # long side capped at 992
        ((200, 150), (448, 336)),  # short side raised to 336
        ((100, 1000), (496, 992)),  # aspect > 2: short side to half the long, then capped
        ((3000, 400), (992, 496)),
        ((1000, 100), (992, 496)),
        ((1200, 300), (992, 496)),
        ((5000, 200), (992, 496)),
        ((900, 700), (900, 700)),
    ],
)
def test_random_policy_size(size, expected):
    assert images.random_policy_size(*size) == expected


def test_random_policy_resizes_with_lanczos():
    image = noise(150, 200)
    out = images.apply_policy(image, "random")
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(image.resize((448, 336), Image.Resampling.LANCZOS))
    )


def test_extreme_aspect_ratio_is_bad_input():
    with pytest.raises(BadInput, match="aspect ratio"):
        images.check_aspect_ratio(Image.new("RGB", (300, 1)), "strip.png")


def test_bad_input_message_and_report():
    error = BadInput("missing image", file="images/A/x.jpg", hint="check the image root")
    located = error.with_context(subset="OK-VQA", row=7)
    assert str(located) == (
        "subset 'OK-VQA', row 7, file 'images/A/x.jpg': missing image. check the image root"
    )
    assert str(pickle.loads(pickle.dumps(located))) == str(located)
    with pytest.raises(BadInput, match="row 7"):
        BadInputReport("error").handle(located)
    report = BadInputReport("skip")
    report.handle(located)
    report.handle(located)
    report.handle(BadInput("empty text and no image", subset="N24News", row=3))
    assert report.total == 3
    assert report.counts[("OK-VQA", "missing image")] == 2
    assert "3 skipped" in report.summary() and "OK-VQA: 2 x missing image" in report.summary()
    assert report.as_dict()["skipped"] == 3
    other = BadInputReport("skip")
    other.handle(located)
    report.merge(other)
    assert report.total == 4
    with pytest.raises(ValueError, match="on_bad_input"):
        BadInputReport("ignore")
