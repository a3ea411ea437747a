"""g2e runs without torch: importing its entry points and preprocessing a checkpoint's inputs
leave torch out of sys.modules (importing it costs seconds of CPU in every process), and the
tokenizer g2e loads without AutoTokenizer is the one AutoTokenizer loads."""

import json
import subprocess
import sys

import numpy as np
import pytest
import transformers

from g2e.data.preprocess import load_tokenizer
from g2e.demo import tiny

REPORT_TORCH = "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"


def run_python(code: str, cwd) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_importing_g2e_leaves_torch_out(tmp_path):
    code = (
        "import sys, g2e, g2e.main, g2e.embedding, g2e.mteb_adapter\ng2e.Embedder\n" + REPORT_TORCH
    )
    assert run_python(code, tmp_path) == "[]"


def test_preprocessing_a_checkpoints_inputs_leaves_torch_out(tmp_path):
    code = f"""
import sys
import numpy as np
from PIL import Image
from g2e.data.preprocess import EmbedItem, Processor
from g2e.demo import tiny
tiny.write_assets({str(tmp_path)!r})
processor = Processor.from_dir({str(tmp_path)!r}, max_length=128)
image = Image.fromarray(np.zeros((90, 120, 3), np.uint8))
encoded = [processor.encode(EmbedItem("a red car", image, "query")),
           processor.encode(EmbedItem("a car", None, "candidate"))]
processor.batcher.collate(encoded)
{REPORT_TORCH}
"""
    assert run_python(code, tmp_path) == "[]"


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("declared", ["Qwen2Tokenizer", "Qwen2TokenizerFast", "TokenizersBackend"])
def test_load_tokenizer_is_what_auto_tokenizer_loads(tmp_path, model_type, declared):
    tiny.write_assets(tmp_path, model_type=model_type)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "tokenizer_class": declared}))
    ours, theirs = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(ours) is type(theirs)
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>A red car.<|im_end|>"
    for kwargs in ({}, {"add_special_tokens": False, "return_offsets_mapping": True}):
        assert ours(text, **kwargs).data == theirs(text, **kwargs).data
    assert (ours.pad_token_id, ours.eos_token_id) == (theirs.pad_token_id, theirs.eos_token_id)
    assert np.array_equal(ours.encode("Yes No"), theirs.encode("Yes No"))
