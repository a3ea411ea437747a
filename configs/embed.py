"""Embeds a JSONL file of {text, image, role} lines with a Qwen2-VL checkpoint.

  python -m g2e.main --config=configs/embed.py --config.model_dir=DIR \
      --config.input=IN.jsonl --config.output=OUT.npy

Each line: {"text": str, "image": path or null, "role": "query" | "candidate"}; the output is
float32 [N, D], L2-normalised, in input order. Relative image paths are taken from the working
directory. `--config.data.image_resolution=random` (or any policy of docs/method.md §3)
replaces the default `processor`. In Python,
`g2e.Embedder.from_pretrained(DIR).embed(texts, images, role=...)` gives the same vectors.
"""

from g2e import configuration


def get_config():
    # The same settings as the Python API: `g2e.Embedder.from_pretrained(model_dir)`.
    return configuration.embed_config()
