"""The judge against the model it claims to be: g2e's P(yes) (g2e.mining.judge) equals
softmax(logits[-1, [Yes, No]])[0] of transformers' Qwen2VLForConditionalGeneration (and
Qwen2_5_VLForConditionalGeneration) on the judge's exact prompt, for pairs of every shape.

The reference is built here from the prompt string alone: transformers' tokenizer, its
Qwen2VLImageProcessorPil, one unpadded sequence per pair, logits of the full vocabulary at
the last position. The over-length pair is judged by g2e at half its images' pixels
(DOWNSCALED); the reference takes the same LANCZOS downscale of the same images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from g2e import mining
from g2e.data import prompts
from g2e.data.preprocess import EmbedItem, Processor
from g2e.mining.judge import Judge
from g2e.models import hf_io
from tests import assets

TOLERANCE = 1e-5


def _pairs() -> list[tuple[EmbedItem, EmbedItem]]:
    """Text-text, image-text, text-image, image-image (small images of two shapes) and an
    image-image pair of two 224x224 images (64 image tokens each: the pair that is too long)."""
    tall, wide = assets.noise_image(84, 56, seed=1), assets.noise_image(56, 112, seed=2)
    big_a, big_b = assets.noise_image(224, 224, seed=3), assets.noise_image(224, 196, seed=4)

    def query(text, image=None):
        return EmbedItem(text, image, "query", "Toy", 0)

    def candidate(text, image=None):
        return EmbedItem(text, image, "candidate")

    return [
        (query("a red circle"), candidate("a blue square")),
        (query("<|image_1|>\nWhat shape is in the image?", tall), candidate("a circle")),
        (query("Find the picture of a dog"), candidate("", wide)),
        (query("<|image_1|>\nthe same scene", tall), candidate("<|image_1|>\nscene", wide)),
        (query("<|image_1|>\na big one", big_a), candidate("another", big_b)),
    ]


def _downscale(image: Image.Image, pixel_fraction: float) -> Image.Image:
    side = pixel_fraction**0.5
    size = (max(1, round(image.width * side)), max(1, round(image.height * side)))
    return image.resize(size, Image.Resampling.LANCZOS)


class Reference:
    """transformers' judge: the prompt string, tokenised and expanded by hand, one pair a pass."""

    def __init__(self, hf_model, checkpoint):
        self.model = hf_model
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
        self.image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(prompts.IMAGE_PAD)
        self.yes_no = []
        for word in ("Yes", "No"):
            ids = self.tokenizer.encode(word, add_special_tokens=False)
            assert len(ids) == 1, f"the tiny tokenizer splits {word!r}: {ids}"
            self.yes_no += ids

    def inputs(self, query: EmbedItem, candidate: EmbedItem, pixel_fraction: float = 1.0):
        """(input_ids [1, L], pixel_values, image_grid_thw) of the pair's judge prompt."""
        images = [item.image for item in (query, candidate) if item.image is not None]
        images = [image.convert("RGB") for image in images]
        if pixel_fraction != 1.0:
            images = [_downscale(image, pixel_fraction) for image in images]
        text = prompts.judge_prompt(
            query.text, query.image is not None, candidate.text, candidate.image is not None
        ).text
        pixel_values = grid = None
        if images:
            features = self.image_processor(images=images)
            grid = np.asarray(features["image_grid_thw"])
            for t, h, w in grid:
                count = int(t * h * w) // self.image_processor.merge_size**2
                text = text.replace(prompts.IMAGE_PAD, "<|placeholder|>" * count, 1)
            text = text.replace("<|placeholder|>", prompts.IMAGE_PAD)
            pixel_values = torch.tensor(np.asarray(features["pixel_values"]))
            grid = torch.tensor(grid)
        input_ids = torch.tensor([self.tokenizer.encode(text, add_special_tokens=False)])
        return input_ids, pixel_values, grid

    @torch.no_grad()
    def p_yes(self, query: EmbedItem, candidate: EmbedItem, pixel_fraction: float = 1.0):
        input_ids, pixel_values, grid = self.inputs(query, candidate, pixel_fraction)
        extra = {} if grid is None else dict(pixel_values=pixel_values, image_grid_thw=grid)
        logits = self.model(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            mm_token_type_ids=(input_ids == self.image_token_id).long(),
            **extra,
        ).logits
        return float(torch.softmax(logits[0, -1, self.yes_no].double(), dim=0)[0])


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_p_yes_equals_transformers_on_the_judge_prompt(tmp_path, model_type):
    hf_model, checkpoint = assets.tiny_checkpoint(tmp_path, seed=3, model_type=model_type)
    reference = Reference(hf_model, checkpoint)
    pairs = _pairs()
    lengths = [reference.inputs(*pair)[0].shape[1] for pair in pairs]
    halved = reference.inputs(*pairs[-1], pixel_fraction=0.5)[0].shape[1]
    # The last pair fits only at half its pixels: its full length is over max_length by more
    # than the text the processor could cut; every other pair fits as it is.
    max_length = max(halved, *lengths[:-1])
    assert lengths[-1] - max_length > 20
    processor = Processor.from_dir(
        checkpoint, max_length=max_length, length_buckets=(max_length,), patch_buckets=(0, 512)
    )
    judge = Judge(hf_io.load_model(checkpoint), processor, batch_size=8, progress=False)

    result = judge.judge(pairs)

    assert result.status.tolist() == [mining.JUDGED] * 4 + [mining.DOWNSCALED]
    expected = [reference.p_yes(*pair) for pair in pairs[:-1]]
    expected.append(reference.p_yes(*pairs[-1], pixel_fraction=0.5))
    print(f"{model_type} P(yes) g2e {result.p_yes} transformers {np.array(expected)}")
    np.testing.assert_allclose(result.p_yes, expected, atol=TOLERANCE, rtol=0)
    # Random weights put P(yes) near 0.5; the answers still differ from pair to pair by far
    # more than the tolerance, so a pair answered for another one would show.
    assert np.ptp(expected) > 100 * TOLERANCE
