"""Embeds a JSONL file of {text, image, role} lines with a Qwen2-VL checkpoint.

  python -m g2e.main --config=configs/embed.py --config.model_dir=DIR \
      --config.input=IN.jsonl --config.output=OUT.npy

Each line: {"text": str, "image": path or null, "role": "query" | "candidate"}; the output is
float32 [N, D], L2-normalised, in input order. Relative image paths are taken from the working
directory. `--config.image_resolution=random` (or any policy of SPEC §3) replaces the default
`processor`.
"""

from g2e import configuration


def get_config():
    config = configuration.base_config()
    config.stages = "embed"
    config.image_resolution = "processor"
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    config.model.remat = "none"
    return config
