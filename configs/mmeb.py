"""The paper's recipe on MMEB (SPEC §3): zero-shot eval, SaHa mining, DoRA fine-tuning, eval, export.

  python -m g2e.main --config=configs/mmeb.py \
      --config.model_dir=/data/Qwen2-VL-2B-Instruct \
      --config.data.train_dir=/data/MMEB-train --config.data.train_image_root=/data/MMEB-train \
      --config.data.eval_dir=/data/MMEB-eval --config.data.eval_image_root=/data/MMEB-eval \
      --config.workdir=/data/runs/g2e-2b

`configs/mmeb.py:7b` selects the 7B recipe (point model_dir at Qwen2-VL-7B-Instruct).
Release defaults: DoRA r=8, alpha=64 on q/k/v/o and MLP down; InfoNCE at temperature 0.02;
clusters of 16 rows, 16 clusters per device (2048 pairs on 8 devices), GradCache chunks of 4;
AdamW lr 5e-5, 100 warm-up steps, 1500 steps; 448x448 training images, max length 1024;
mining and evaluation use the `random` image policy and max length 2048.
Mining adds g2e's generative judge (`--config.mine.judge=false` mines as the release does):
pairs are judged in steps of mine.judge_batch_size=16 per device (128 on 8 GPUs), a block of
mine.block_size=256 anchors at a time, and every answer is kept under <workdir>/mine/cache/, so
a preempted `mine` resumes mid-subset. A pair over the max length is judged with downscaled
images or kept unjudged (counted in mine/report.json), never stopping the stage.
"""

from g2e import configuration


def get_config(arg: str = "2b"):
    config = configuration.base_config()
    size = arg or "2b"
    if size not in ("2b", "7b"):
        raise ValueError(f"configs/mmeb.py:{arg}: unknown size; use configs/mmeb.py:2b or :7b")
    config.workdir = f"workdir/mmeb-{size}"
    if size == "7b":
        # 7B keeps the recipe; shard the weights over fsdp so parameters and optimizer state fit.
        config.mesh.data = 1
        config.mesh.fsdp = -1
    return config
