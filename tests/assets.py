"""Test helper: a complete tiny Qwen2-VL checkpoint (weights + tokenizer + preprocessor config)
and transformers' PyTorch embedding of an item with the docs/method.md §1 prompt, as the reference.

The weights are written by transformers (`save_pretrained`) from a config built around a tiny
tokenizer (g2e.demo.tiny), with normal(0, 0.05) weights so that a wrong op shows.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers
from PIL import Image

from g2e.data import images as images_lib
from g2e.data import prompts
from g2e.data.preprocess import EmbedItem
from g2e.demo import tiny
from tests.models.checkpoints import randomize

TEXTS = (
    "Represent the given image with the following question: What shape is in the image?",
    "a red circle and a blue square",
    "Find me an everyday image that matches the caption",
)


def tiny_checkpoint(
    out_dir: str | pathlib.Path, *, seed: int = 0, model_type: str = "qwen2_vl"
) -> tuple[transformers.PreTrainedModel, pathlib.Path]:
    """Writes a tiny, complete Qwen2-VL (or, with model_type='qwen2_5_vl', Qwen2.5-VL)
    checkpoint; returns (float32 eval torch model, dir)."""
    out_dir = pathlib.Path(out_dir)
    config = tiny.write_assets(out_dir, texts=TEXTS, vocab_size=600, model_type=model_type)
    if model_type == "qwen2_5_vl":
        hf_config = transformers.Qwen2_5_VLConfig(**config)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        hf_config = transformers.Qwen2VLConfig(**config)
        model_class = transformers.Qwen2VLForConditionalGeneration
    for sub in (hf_config, hf_config.text_config, hf_config.vision_config):
        sub._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_class(hf_config).float().eval()
    randomize(model, seed)
    model.save_pretrained(out_dir)
    return model, out_dir


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


@torch.no_grad()
def reference_embedding(
    model,
    checkpoint: str | pathlib.Path,
    item: EmbedItem,
    prompt: prompts.PromptOptions = prompts.PromptOptions(),
) -> np.ndarray:
    """transformers' embedding of one item: docs/method.md §1 prompt, HF image processing, last token."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
    has_image = item.image is not None
    text = prompts.embedding_prompt_text(
        item.text, has_image=has_image, role=item.role, subset=item.subset, options=prompt
    )
    inputs = {}
    if has_image:
        image = images_lib.load_image(item.image)
        features = image_processor(images=[image])
        grid = np.asarray(features["image_grid_thw"])
        count = int(grid[0].prod()) // image_processor.merge_size**2
        text = text.replace(prompts.IMAGE_PAD, prompts.IMAGE_PAD * count, 1)
        inputs["pixel_values"] = torch.tensor(np.asarray(features["pixel_values"]))
        inputs["image_grid_thw"] = torch.tensor(grid)
    input_ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    image_token_id = tokenizer.convert_tokens_to_ids(prompts.IMAGE_PAD)
    outputs = model(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        mm_token_type_ids=(input_ids == image_token_id).long(),
        output_hidden_states=True,
        **inputs,
    )
    last = outputs.hidden_states[-1][0, -1].double().numpy()
    return (last / np.linalg.norm(last)).astype(np.float32)
