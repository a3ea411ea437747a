"""Tiny tokenizer / config / preprocessor assets load in transformers and agree with each other."""

import json

import numpy as np
import pytest
import torch
import transformers

from g2e.demo import tiny

SAMPLE = (
    "<|im_start|>system\nGiven an image, summarize it.<|im_end|>\n<|im_start|>user\n"
    "<|image_pad|><|image_pad|>\nA zebra-striped café, naïve 42!<|im_end|>\n"
    "<|im_start|>assistant\nYes<|im_end|><|endoftext|>"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    config = tiny.write_assets(out, texts=["a zebra stands in the savanna"] * 3, vocab_size=1200)
    return out, config


def test_tokenizer_reloads_with_autotokenizer(checkpoint):
    out, _ = checkpoint
    built = tiny.build_tokenizer(["a zebra stands in the savanna"] * 3, vocab_size=1200)
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    assert loaded(SAMPLE)["input_ids"] == built(SAMPLE)["input_ids"]
    assert loaded.decode(loaded(SAMPLE)["input_ids"]) == SAMPLE
    assert loaded.pad_token == "<|endoftext|>" and loaded.eos_token == "<|im_end|>"


def test_special_tokens_are_single_tokens_after_the_vocabulary(checkpoint):
    out, _ = checkpoint
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tiny.special_token_ids(tokenizer)
    learned = len(tokenizer) - len(tiny.SPECIAL_TOKENS)
    assert list(ids.values()) == list(range(learned, learned + len(tiny.SPECIAL_TOKENS)))
    assert 900 < learned <= 1200
    for token, token_id in ids.items():
        assert tokenizer(f"a{token}b")["input_ids"][1] == token_id
    # The judge reads single 'Yes' / 'No' tokens.
    assert len(tokenizer.encode("Yes", add_special_tokens=False)) == 1
    assert len(tokenizer.encode("No", add_special_tokens=False)) == 1


def test_config_matches_tokenizer_and_builds_in_transformers(checkpoint):
    out, config = checkpoint
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert json.loads((out / "config.json").read_text()) == config
    hf = transformers.AutoConfig.from_pretrained(out)
    assert isinstance(hf, transformers.Qwen2VLConfig)
    assert hf.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert hf.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert hf.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert hf.text_config.eos_token_id == tokenizer.eos_token_id
    assert hf.text_config.pad_token_id == tokenizer.pad_token_id
    assert hf.text_config.vocab_size % 64 == 0 and hf.text_config.vocab_size >= len(tokenizer)
    assert hf.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert hf.vision_config.hidden_size == hf.text_config.hidden_size
    # A forward pass of the PyTorch model on tokenizer output runs with these ids.
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(hf).eval()
    ids = torch.tensor([tokenizer("Yes No a zebra")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], hf.text_config.vocab_size)


def test_mrope_section_default_follows_qwen_ratio():
    tokenizer = tiny.build_tokenizer()
    config = tiny.tiny_hf_config(tokenizer, hidden_size=256, heads=2)  # head dim 128
    assert config["text_config"]["rope_parameters"]["mrope_section"] == [16, 24, 24]
    with pytest.raises(ValueError, match="mrope_section"):
        tiny.tiny_hf_config(tokenizer, mrope_section=(1, 1, 1))


def test_preprocessor_config_loads_in_the_pil_image_processor(checkpoint):
    out, _ = checkpoint
    processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(out)
    assert (processor.patch_size, processor.merge_size, processor.temporal_patch_size) == (14, 2, 2)
    assert processor.size.shortest_edge == 56 * 56 and processor.size.longest_edge == 224 * 224
    image = np.random.RandomState(0).randint(0, 256, (300, 500, 3), np.uint8)
    features = processor(images=[image])
    t, h, w = features["image_grid_thw"][0]
    assert t == 1 and h * w * 14 * 14 <= 224 * 224
    assert features["pixel_values"].shape == (h * w, 1176)
