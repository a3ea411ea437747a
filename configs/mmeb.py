"""The paper's recipe on MMEB (docs/method.md §3): zero-shot eval, SaHa mining, DoRA fine-tuning, eval, export.

  python -m g2e.main --config=configs/mmeb.py \
      --config.model_dir=/data/Qwen2-VL-2B-Instruct \
      --config.data.train_dir=/data/MMEB-train --config.data.train_image_root=/data/MMEB-train \
      --config.data.eval_dir=/data/MMEB-eval --config.data.eval_image_root=/data/MMEB-eval \
      --config.workdir=/data/runs/g2e-2b

Variants (`--config=configs/mmeb.py:<variant>`):
  2b (default)  g2e's recipe for Qwen2-VL-2B-Instruct;
  7b            the same for Qwen2-VL-7B-Instruct (weights sharded over fsdp);
  release       the public release exactly: `mine.judge=False` (the release has no generative
                judge), `train.mask_identical_positives=False` (identical positives are scored
                as negatives, the release's plain cross-entropy), 50k rows per subset;
  release-7b    the same with the 7B model;
  qwen25-3b     g2e's recipe on Qwen2.5-VL-3B-Instruct (point model_dir at it; the model type
                comes from its config.json, so every stage and the export follow);
  qwen25-7b     the same on Qwen2.5-VL-7B-Instruct (weights sharded over fsdp).
g2e's recipe differs from the release in two keys only, both g2e design decisions: the judge
drops owners the model itself calls false negatives (`mine.judge=True`), and candidates
identical to a query's positive are masked rather than scored as negatives
(`train.mask_identical_positives=True`).

Release defaults, in both: DoRA r=8, alpha=64, dropout 0.1 on q/k/v/o and MLP down; InfoNCE at
temperature 0.02 over the global batch; `train.global_batch=2048` pairs per step whatever the
device count, in clusters of 16 rows (`train.cluster_size`; the release's 16 clusters x 16 rows
x 8 devices); AdamW lr 5e-5, 100 warm-up steps, 1500 steps; 448x448 training images, max length
1024; mining and evaluation use the `random` image policy and max length 2048.
`data.max_rows_per_subset=50000` caps every training subset as the release and VLM2Vec do
(about 662k of MMEB-train's 1.07M rows); `data.row_sample_seed=-1` keeps the first 50k rows in
source order, as the release's `split[:50000]` does (a seed >= 0 draws a seeded sample instead);
mining and training see the same rows. 0 uses every row.
Speed keys (no effect on the maths): `train.backprop='auto'` backpropagates through the whole
batch when it fits the device's memory and uses GradCache otherwise (the release always used
GradCache with chunks of 4); `train.query_chunk`/`candidate_chunk` 0 size the chunks for the
device; `train.vision_chunk` rows per device go through the frozen vision tower at a time.
The export keeps the base checkpoint's dtype (export.dtype=source: bfloat16 for the released
Qwen2-VL) and merges the adapters in float32; compiled programs are cached in
<workdir>/compilation_cache (compilation_cache.dir), so a resumed run does not compile again.
Mining adds g2e's generative judge (`mine.judge=False` mines as the release does): pairs are
judged in steps of mine.judge_batch_size=16 per device (128 on 8 GPUs), a block of
mine.block_size=256 anchors at a time, and every answer is kept under <workdir>/mine/cache/, so
a preempted `mine` resumes mid-subset. A pair over the max length is judged with downscaled
images or kept unjudged (counted in mine/report.json), never stopping the stage.
"""

from g2e import configuration

VARIANTS = ("2b", "7b", "release", "release-7b", "qwen25-3b", "qwen25-7b")


def get_config(arg: str = "2b"):
    config = configuration.base_config()
    variant = arg or "2b"
    if variant not in VARIANTS:
        raise ValueError(
            f"configs/mmeb.py:{arg}: unknown variant; use one of "
            + ", ".join(f"configs/mmeb.py:{v}" for v in VARIANTS)
        )
    config.workdir = f"workdir/mmeb-{variant}"
    if variant.startswith("release"):
        config.mine.judge = False
        config.train.mask_identical_positives = False
        config.data.max_rows_per_subset = 50000
        config.data.row_sample_seed = -1
    if variant.endswith("7b"):
        # 7B keeps the recipe; shard the weights over fsdp so parameters and optimizer state fit.
        config.mesh.data = 1
        config.mesh.fsdp = -1
    return config
