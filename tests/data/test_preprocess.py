"""Processor: parity with transformers' Qwen2-VL preprocessing and get_rope_index; batches,
buckets, truncation and bad input."""

import io
import types

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from g2e.data import prompts
from g2e.data.errors import BadInput, BadInputReport
from g2e.data.preprocess import EmbedItem, Processor
from g2e.demo import tiny
from g2e.models import positions
from g2e.models.config import Qwen2VLConfig

VQA = "<|image_1|>\nRepresent the given image with the following question: What is on the table?"
TAIL = prompts.QUERY_SUFFIX_WITH_IMAGE + "<|im_end|>\n<|im_start|>assistant\n"


def noise(height, width, seed=0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_ckpt")
    tiny.write_assets(out, texts=[VQA, "a vase of flowers on a wooden table"])
    (out / "images" / "OK-VQA").mkdir(parents=True)
    noise(70, 100, seed=1).save(out / "images" / "OK-VQA" / "table.png")
    return out


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    # Only get_rope_index is used; the tiny model builds in well under a second.
    return transformers.Qwen2VLModel(transformers.AutoConfig.from_pretrained(checkpoint)).eval()


@pytest.fixture(scope="module")
def hf_image_processor(checkpoint):
    return transformers.Qwen2VLImageProcessorPil.from_pretrained(checkpoint)


def as_model_input(uint8_patches: np.ndarray, checkpoint) -> np.ndarray:
    """The float patches [.., 1176] the vision tower makes of the host's uint8 frames [.., 588]:
    each value through the config's normalisation table, the frame repeated in time."""
    table = Qwen2VLConfig.from_dir(checkpoint).vision.pixel_table()
    values = uint8_patches.reshape(*uint8_patches.shape[:-1], 3, 1, 196)
    normalised = table[np.arange(3)[:, None, None], values]
    return np.repeat(normalised, 2, axis=-2).reshape(*uint8_patches.shape[:-1], 1176)


def make(checkpoint, **kwargs) -> Processor:
    kwargs.setdefault("max_length", 256)
    return Processor.from_dir(checkpoint, image_root=checkpoint, **kwargs)


def hf_reference(processor: Processor, image_processor, text: str, pil_images):
    """What transformers' Qwen2VLProcessor does: image features, pad expansion, tokenisation."""
    if pil_images:
        features = image_processor(images=list(pil_images))
        grids = np.asarray(features["image_grid_thw"])
        pixel_values = np.asarray(features["pixel_values"])
    else:
        grids, pixel_values = np.zeros((0, 3), np.int64), np.zeros((0, 1176), np.float32)
    # Qwen2VLProcessor's own replacement rule (its constructor needs torchvision, so the
    # unbound method is called with the two attributes it reads).
    owner = types.SimpleNamespace(image_processor=image_processor, image_token=prompts.IMAGE_PAD)
    pieces = text.split(prompts.IMAGE_PAD)
    expanded = pieces[0]
    for index, piece in enumerate(pieces[1:]):
        expanded += (
            transformers.Qwen2VLProcessor.replace_image_token(
                owner, {"image_grid_thw": grids}, index
            )
            + piece
        )
    ids = processor.tokenizer(expanded)["input_ids"]
    return np.asarray(ids), pixel_values, [tuple(int(x) for x in g) for g in grids]


def hf_rope(hf_model, processor, batch, grids):
    input_ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
    all_grids = [g for example in grids for g in example]
    position_ids, _ = hf_model.get_rope_index(
        input_ids,
        mm_token_type_ids=(input_ids == processor.image_token_id).int(),
        image_grid_thw=torch.tensor(all_grids) if all_grids else None,
        attention_mask=torch.from_numpy(batch["attention_mask"]),
    )
    return position_ids.numpy()


ITEMS = [
    EmbedItem(VQA, "images/OK-VQA/table.png", "query", "OK-VQA", row=0),
    EmbedItem("a vase of flowers", None, "candidate", "OK-VQA", row=0),
    EmbedItem(
        "<|image_1|>\nSelect the portion of the image.",
        png(noise(150, 60, 2)),
        "candidate",
        "RefCOCO-Matching",
        row=3,
    ),
    EmbedItem("What is this?", noise(300, 420, 3), "query", "ImageNet-1K", row=5),
    EmbedItem(prompts.sugarcrepe_caption("A man rides a horse."), None, "query"),
]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("resolution", ["processor", "random"])
def test_matches_transformers_preprocessing(
    checkpoint, hf_model, hf_image_processor, padding_side, resolution
):
    processor = make(checkpoint, padding_side=padding_side, image_resolution=resolution)
    encoded = [processor.encode(item) for item in ITEMS]
    batch = processor.batcher.collate(encoded)
    grids = []
    for row, item in enumerate(ITEMS):
        has_image = item.image is not None
        text = prompts.embedding_prompt_text(
            item.text, has_image=has_image, role=item.role, subset=item.subset
        )
        pil = processor.load_images([item.image] if has_image else [])
        ids, pixel_values, item_grids = hf_reference(processor, hf_image_processor, text, pil)
        grids.append(item_grids)
        real = batch["attention_mask"][row].astype(bool)
        np.testing.assert_array_equal(batch["input_ids"][row][real], ids)
        assert encoded[row].image_grid_thw == item_grids
        count = pixel_values.shape[0]
        # Bit for bit what transformers' processor gives, once the device normalises.
        np.testing.assert_array_equal(
            as_model_input(batch["pixel_values"][row, :count], checkpoint), pixel_values
        )
        assert batch["pixel_values"].dtype == np.uint8
        assert not batch["pixel_values"][row, count:].any()
        # The pooled token is the "\n" after "assistant", on either padding side.
        last = batch["last_index"][row]
        assert real[last] and (padding_side == "left" or not real[last + 1 :].any())
        header = processor.tokenizer("<|im_start|>assistant\n")["input_ids"]
        np.testing.assert_array_equal(
            batch["input_ids"][row][last + 1 - len(header) : last + 1], header
        )
    np.testing.assert_array_equal(batch["position_ids"], hf_rope(hf_model, processor, batch, grids))
    assert batch["position_ids"].dtype == np.int32


def test_batch_layout(checkpoint):
    processor = make(checkpoint, length_buckets=(64, 128, 256), patch_buckets=(0, 32, 64, 128))
    encoded = [processor.encode(item) for item in ITEMS[:3]]
    batch = processor.batcher.collate(encoded, pad_to_batch=4)
    B, L, P = 4, 128, 64
    assert 64 < max(e.length for e in encoded) <= 128
    assert 32 < max(e.num_patches for e in encoded) <= 64
    expected = dict(
        input_ids=(B, L),
        attention_mask=(B, L),
        position_ids=(3, B, L),
        pixel_values=(B, P, 588),
        vision_segment_ids=(B, P),
        vision_positions=(B, P, 2),
        image_token_index=(B, L),
        last_index=(B,),
    )
    assert {key: value.shape for key, value in batch.items()} == expected
    for row, item in enumerate(encoded):
        is_image = batch["input_ids"][row] == processor.image_token_id
        assert is_image.sum() == item.num_patches // 4
        np.testing.assert_array_equal(
            batch["image_token_index"][row][is_image], np.arange(is_image.sum())
        )
        assert not batch["image_token_index"][row][~is_image].any()
        layout = positions.vision_layout(item.image_grid_thw, P)
        np.testing.assert_array_equal(batch["vision_positions"][row], layout[0])
        np.testing.assert_array_equal(batch["vision_segment_ids"][row], layout[1])
        assert (batch["vision_segment_ids"][row] > 0).sum() == item.num_patches
    # The dummy row: one attended pad token, no image.
    assert batch["attention_mask"][3].sum() == 1 and batch["last_index"][3] == 0
    assert batch["input_ids"][3, 0] == processor.tokenizer.pad_token_id
    assert not batch["vision_segment_ids"][3].any()
    report = processor.padding_report()
    real = sum(e.length for e in encoded)
    assert report["token_padding_fraction"] == pytest.approx(1 - real / (B * L))
    assert report["patch_padding_fraction"] == pytest.approx(
        1 - sum(e.num_patches for e in encoded) / (B * P)
    )
    assert report["shapes"] == [(B, L, P)]


def test_buckets(checkpoint):
    processor = make(checkpoint, length_buckets=(64, 128, 256), patch_buckets=(0, 32, 64))
    text_only = processor.batcher.collate([processor.encode(ITEMS[1])])
    assert text_only["input_ids"].shape == (1, 64)
    assert text_only["pixel_values"].shape == (1, 0, 588)
    # Past the largest patch bucket: the next multiple of it (a bounded set of shapes).
    big = processor.encode(EmbedItem("x", noise(224, 224), "query"))
    assert big.num_patches == 256
    assert processor.batcher.collate([big])["pixel_values"].shape == (1, 256, 588)
    with pytest.raises(ValueError, match="pad_to_batch"):
        processor.batcher.collate([big, big], pad_to_batch=1)
    # Shapes fixed by the caller (e.g. agreed across hosts), even with no encodings at all.
    fixed = processor.batcher.collate(
        [processor.encode(ITEMS[1])], pad_to_batch=2, length=256, num_patches=64
    )
    assert fixed["input_ids"].shape == (2, 256) and fixed["pixel_values"].shape == (2, 64, 588)
    empty = processor.batcher.collate([], pad_to_batch=2, length=64, num_patches=0)
    assert empty["attention_mask"].sum() == 2 and empty["input_ids"].shape == (2, 64)
    with pytest.raises(ValueError, match="cannot hold"):
        processor.batcher.collate([big], length=64, num_patches=64)
    with pytest.raises(ValueError, match="length bucket"):
        make(checkpoint, max_length=300, length_buckets=(64, 256))
    # Defaults: powers of two up to max_length; patches up to the processor's max_pixels.
    defaults = make(checkpoint, max_length=300)
    assert defaults.batcher.length_buckets == (64, 128, 256, 300)
    assert defaults.batcher.patch_buckets == (0, 64, 256)  # 224*224 pixels = 256 patches


def test_pixel_limits_override(checkpoint):
    small = make(checkpoint, max_pixels=56 * 56)
    # 300 x 420 capped at 56*56 pixels: 28 x 56 (smart_resize floors both sides).
    assert small.encode(ITEMS[3]).image_grid_thw == [(1, 2, 4)]
    assert make(checkpoint).encode(ITEMS[3]).image_grid_thw == [(1, 12, 18)]
    low = make(checkpoint, image_resolution="low")  # 128 x 128 -> 140 x 140 by the processor
    assert low.encode(ITEMS[3]).image_grid_thw == [(1, 10, 10)]


def test_truncation_cuts_the_text_and_keeps_the_template(checkpoint):
    processor = make(checkpoint, max_length=120)
    question = " ".join(["what is on the wooden table"] * 30)
    item = EmbedItem(f"<|image_1|>\n{question}", "images/OK-VQA/table.png", "query", "OK-VQA")
    encoded = processor.encode(item)
    full = make(checkpoint, max_length=1024).encode(item)
    assert encoded.length == 120 and full.length > 120
    assert encoded.truncated_tokens == full.length - 120
    tail = processor.tokenizer(TAIL)["input_ids"]
    np.testing.assert_array_equal(encoded.input_ids[-len(tail) :], tail)
    head_length = len(
        processor.tokenizer(prompts.embedding_prompt(item.text, has_image=True, role="query").head)[
            "input_ids"
        ]
    )
    np.testing.assert_array_equal(encoded.input_ids[:head_length], full.input_ids[:head_length])
    # Every image token survives; the text is cut from its end.
    assert (encoded.input_ids == processor.image_token_id).sum() == encoded.num_patches // 4
    kept_text = len(encoded.input_ids) - len(tail)
    np.testing.assert_array_equal(encoded.input_ids[:kept_text], full.input_ids[:kept_text])
    processor.batcher.collate([encoded])  # batches count what was truncated
    report = processor.padding_report()
    assert report["truncated_items"] == 1 and report["truncated_tokens"] == encoded.truncated_tokens


def test_bad_input_error_names_subset_row_and_file(checkpoint):
    processor = make(checkpoint)
    item = EmbedItem(VQA, "images/OK-VQA/missing.png", "query", "OK-VQA", row=17)
    with pytest.raises(BadInput) as info:
        processor.encode(item)
    message = str(info.value)
    assert "subset 'OK-VQA'" in message and "row 17" in message and "missing.png" in message


@pytest.mark.parametrize(
    "item, reason",
    [
        (EmbedItem(VQA, "images/OK-VQA/missing.png", "query", "OK-VQA", 1), "missing image"),
        (EmbedItem(VQA, b"", "query", "OK-VQA", 2), "empty image file"),
        (EmbedItem(VQA, png(noise(40, 40))[:100], "query", "OK-VQA", 3), "truncated or corrupt"),
        (EmbedItem(VQA, "../../etc/passwd", "query", "OK-VQA", 4), "escapes the image root"),
        (
            EmbedItem(VQA, png(Image.new("1", (10000, 9000))), "query", "OK-VQA", 5),
            "decompression bomb",
        ),
        (EmbedItem("", None, "candidate", "N24News", 6), "empty text and no image"),
        (EmbedItem(VQA, None, "query", "OK-VQA", 7), "placeholders do not match"),
        (EmbedItem("word " * 1200, None, "query", "WebQA", 8), "text far over max_length"),
        (EmbedItem("x", noise(600, 600), "query", "OK-VQA", 9), "does not fit max_length"),
    ],
)
def test_bad_input_cases_error_or_skip(checkpoint, item, reason):
    with pytest.raises(BadInput, match=reason):
        make(checkpoint, max_length=128, max_pixels=448 * 448).encode(item)
    report = BadInputReport("skip")
    processor = make(checkpoint, max_length=128, max_pixels=448 * 448, on_bad_input=report)
    assert processor.encode(item) is None
    ((subset, counted_reason),) = report.counts
    assert report.total == 1 and subset == item.subset and reason in counted_reason
    assert reason in report.summary()
    assert processor.encode(ITEMS[1]) is not None  # Good input still goes through.


def test_image_modes_are_converted(checkpoint):
    processor = make(checkpoint)
    rgba = noise(60, 60).convert("RGBA")
    cmyk = noise(60, 60).convert("CMYK")
    for source in (rgba, png(rgba), cmyk, noise(60, 60).convert("L")):
        encoded = processor.encode(EmbedItem("x", source, "query"))
        assert encoded.image_grid_thw == [(1, 4, 4)]


def test_encode_chat_with_answer_marks_targets(checkpoint):
    processor = make(checkpoint)
    encoded = processor.encode_chat(None, "What colour is the vase?", [noise(56, 56)], answer="Red")
    answer_ids = processor.tokenizer("Red<|im_end|>")["input_ids"]
    targets = encoded.input_ids[encoded.target_mask.astype(bool)]
    np.testing.assert_array_equal(targets, answer_ids)
    np.testing.assert_array_equal(encoded.input_ids[-len(answer_ids) :], answer_ids)
    batch = processor.batcher.collate([encoded, processor.encode(ITEMS[1])])
    assert batch["target_mask"].shape == batch["input_ids"].shape
    assert batch["target_mask"][0].sum() == len(answer_ids) and not batch["target_mask"][1].any()


def test_judge_prompt_with_two_images_matches_transformers(
    checkpoint, hf_model, hf_image_processor
):
    processor = make(checkpoint)
    query = EmbedItem(VQA, "images/OK-VQA/table.png", "query", "OK-VQA")
    candidate = EmbedItem("", noise(80, 50, 4), "candidate", "OK-VQA")
    encoded = processor.encode_judge(query, candidate)
    text = prompts.judge_prompt(VQA, True, "", True).text
    ids, pixel_values, grids = hf_reference(
        processor, hf_image_processor, text, processor.load_images([query.image, candidate.image])
    )
    np.testing.assert_array_equal(encoded.input_ids, ids)
    np.testing.assert_array_equal(as_model_input(encoded.pixel_values, checkpoint), pixel_values)
    batch = processor.batcher.collate([encoded], pad_to_batch=2)
    np.testing.assert_array_equal(
        batch["position_ids"], hf_rope(hf_model, processor, batch, [grids, []])
    )
    assert set(batch["vision_segment_ids"][0]) == {0, 1, 2}
    assert processor.tokenizer.decode(encoded.input_ids).endswith("<|im_start|>assistant\n")
    yes, no = processor.judge_token_ids()
    assert processor.tokenizer.decode([yes]) == "Yes" and processor.tokenizer.decode([no]) == "No"


def test_embed_item_checks_its_role():
    with pytest.raises(ValueError, match="role"):
        EmbedItem("a cat", None, "document")


def test_prompt_ablation_reaches_the_tokens(checkpoint):
    plain = make(checkpoint, prompt=prompts.PromptOptions(system=False, suffix=False))
    encoded = plain.encode(ITEMS[1])
    assert plain.tokenizer.decode(encoded.input_ids) == (
        "<|im_start|>user\na vase of flowers<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_square_policy_gives_one_patch_bucket(checkpoint):
    """448x448 training images all have the same patch count: one bucket holds them (1,024
    patches with Qwen2-VL's pixel limits; the tiny checkpoint's max_pixels shrink it to 256)."""
    processor = make(checkpoint, image_resolution="mid_low")
    patches = processor.patches_per_image("mid_low")
    assert processor.batcher.patch_buckets == (0, patches) and patches == 256
    encoded = processor.encode(EmbedItem("", noise(300, 500), "candidate"))
    assert encoded.num_patches == patches
    assert processor.batcher.collate([encoded])["pixel_values"].shape[1] == patches
    full_size = Processor.from_dir(
        checkpoint, max_length=256, image_resolution="mid_low", max_pixels=12845056
    )
    assert full_size.batcher.patch_buckets == (0, 1024)
