"""Times the contrastive training step (pairs/s).

  # CPU: g2e vs a plain PyTorch step (transformers + peft DoRA, same loss, same batch).
  python bench/bench_train.py
  # Accelerator: Qwen2-VL-2B architecture, random weights, DoRA r=8, 448x448 images,
  # clusters of 16, GradCache chunks of 4; prints pairs/s, MFU and peak memory.
  python bench/bench_train.py --accelerator [--clusters_per_device 4] [--chunk 4]

Both modes use synthetic batches of the design's batch format. In CPU mode the model is a tiny
Qwen2-VL (text only) and both steps do one forward/backward of all queries and candidates
(g2e with one GradCache chunk per side, i.e. an extra no-grad forward) plus an AdamW update.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from g2e.models import lora  # noqa: E402
from g2e.models import positions  # noqa: E402
from g2e.models.config import Qwen2VLConfig  # noqa: E402
from g2e.models.qwen2_vl import Qwen2VL  # noqa: E402
from g2e.training import loss as loss_lib  # noqa: E402
from g2e.training import optimizer, trainer  # noqa: E402
from g2e.training import stage as model_training  # noqa: E402

QWEN2_VL_2B = dict(
    model_type="qwen2_vl", image_token_id=151655, video_token_id=151656,
    vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=True,
    text_config=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                     num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
                     hidden_act="silu", tie_word_embeddings=True,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4,
                       patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                       in_channels=3, hidden_act="quick_gelu"),
)


def synthetic_batch(config: Qwen2VLConfig, batch: int, text_len: int, image_side: int,
                    seed: int) -> dict[str, np.ndarray]:
    """Random tokens (+ one image_side x image_side image per example when image_side > 0)."""
    rng = np.random.default_rng(seed)
    grid = (1, image_side // 14, image_side // 14) if image_side else None
    image_tokens = grid[1] * grid[2] // 4 if grid else 0
    length = text_len + image_tokens
    # Plain text ids below the special tokens (which sit at the top of the vocabulary).
    input_ids = rng.integers(0, min(1000, config.image_token_id - 16), (batch, length))
    input_ids = input_ids.astype(np.int32)
    if grid:
        input_ids[:, 4:4 + image_tokens] = config.image_token_id
    attention_mask = np.ones((batch, length), np.int32)
    grids = [[grid] if grid else [] for _ in range(batch)]
    out = dict(input_ids=input_ids, attention_mask=attention_mask,
               position_ids=positions.rope_index(input_ids, attention_mask, grids,
                                                 image_token_id=config.image_token_id),
               last_index=np.full((batch,), length - 1, np.int32),
               image_token_index=np.zeros((batch, length), np.int32))
    patches = grid[1] * grid[2] if grid else 0
    out["pixel_values"] = rng.normal(size=(batch, patches, 1176)).astype(np.float32)
    if grid:
        out["image_token_index"][:, 4:4 + image_tokens] = np.arange(image_tokens)
        layout = positions.vision_layout([grid], patches)
        out["vision_positions"] = np.broadcast_to(layout[0], (batch,) + layout[0].shape).copy()
        out["vision_segment_ids"] = np.broadcast_to(layout[1], (batch, patches)).copy()
    else:
        out["vision_positions"] = np.zeros((batch, 0, 2), np.int32)
        out["vision_segment_ids"] = np.zeros((batch, 0), np.int32)
    return out


def time_g2e(model, batch, *, cpd, cluster, chunk, steps, temperature=0.02):
    """Runs the jitted train step; returns (median seconds per step, last loss)."""
    mesh = jax.make_mesh((jax.device_count(), 1, 1), ("data", "fsdp", "tensor"),
                         axis_types=(AxisType.Auto,) * 3)
    graphdef, trainable, frozen = model_training.split_model(model, full=False)
    train_cfg = types.SimpleNamespace(lr=5e-5, warmup_steps=100, steps=1500, weight_decay=0.0,
                                      grad_clip=1.0)
    opt, schedule = optimizer.make_optimizer(train_cfg)
    loss_config = loss_lib.LossConfig(temperature)
    setup = trainer.StepSetup(embed_fn=model_training.model_embed_fn(graphdef),
                              loss_config=loss_config, optimizer=opt, schedule=schedule,
                              mesh=mesh, query_chunk=chunk, candidate_chunk=chunk,
                              batch_axes=("data",))
    state = trainer.init_state(trainable, opt, 0, loss_config)
    shard = lambda key: NamedSharding(mesh, P(None, "data") if key == "position_ids"
                                      else P("data"))
    n = batch["query"]["input_ids"].shape[0]
    device_batch = {side: {k: jax.device_put(v, shard(k)) for k, v in batch[side].items()}
                    for side in ("query", "candidate")}
    device_batch["ids"] = jax.device_put(np.arange(n, dtype=np.int32), shard("ids"))
    step = jax.jit(functools.partial(trainer.train_step, setup), donate_argnums=(0,))
    for _ in range(2):  # compile; the second call sees the output shardings of the first
        state, metrics = step(state, frozen, device_batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, frozen, device_batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    # The median: on a shared machine single steps can stall far beyond the typical one.
    return float(np.median(times)), float(metrics["loss"])


def time_torch(model_dir, batch, steps, threads):
    """A plain PyTorch step: transformers Qwen2-VL + peft DoRA, InfoNCE, AdamW."""
    import peft
    import torch
    import transformers
    torch.set_num_threads(threads)
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(model_dir).float()
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=64, lora_dropout=0.1, use_dora=True, init_lora_weights="gaussian",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)

    def embed(side):
        b = batch[side]
        out = model.base_model.model.model(
            input_ids=torch.tensor(b["input_ids"], dtype=torch.long),
            attention_mask=torch.tensor(b["attention_mask"]))
        pooled = out.last_hidden_state[torch.arange(len(b["last_index"])),
                                       torch.tensor(b["last_index"], dtype=torch.long)]
        return torch.nn.functional.normalize(pooled, dim=-1)

    def step():
        q, c = embed("query"), embed("candidate")
        logits = q @ c.T / 0.02
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(q)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), loss


def cpu_mode(args):
    import transformers
    from tests.models import checkpoints
    pairs = args.clusters_per_device * args.cluster_size * jax.device_count()
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = checkpoints.make_hf_model(widths="tiny", num_layers=2)
        hf_model.save_pretrained(tmp)
        config = Qwen2VLConfig.from_dir(tmp)
        batch = {side: synthetic_batch(config, pairs, args.text_len, 0, seed)
                 for seed, side in enumerate(("query", "candidate"))}
        from g2e.models import hf_io
        model = hf_io.load_model(tmp, adapter=lora.AdapterConfig(kind="dora"))
        g2e_s, g2e_loss = time_g2e(model, batch, cpd=args.clusters_per_device,
                                   cluster=args.cluster_size, chunk=pairs // jax.device_count(),
                                   steps=args.steps)
        torch_s, torch_loss = time_torch(tmp, batch, args.steps, threads=args.torch_threads)
    del transformers
    print(f"batch: {pairs} pairs, text length {args.text_len}, tiny Qwen2-VL, DoRA r=8 "
          f"(devices: {jax.device_count()} {jax.devices()[0].device_kind})")
    print(f"g2e    step {g2e_s * 1e3:8.1f} ms  {pairs / g2e_s:8.1f} pairs/s  loss {g2e_loss:.3f}")
    print(f"torch  step {torch_s * 1e3:8.1f} ms  {pairs / torch_s:8.1f} pairs/s  "
          f"({args.torch_threads} threads)  "
          f"loss {torch_loss:.3f}")
    print(f"ratio g2e/torch pairs/s: {torch_s / g2e_s:.2f}")


def accelerator_mode(args):
    hf = dict(QWEN2_VL_2B)
    if args.layers:
        hf["text_config"] = dict(hf["text_config"], num_hidden_layers=args.layers)
        hf["vision_config"] = dict(hf["vision_config"], depth=args.layers)
    config = Qwen2VLConfig.from_hf(hf)
    dtype = jnp.bfloat16
    model = Qwen2VL(config, dtype=dtype, param_dtype=dtype, remat=args.remat,
                    attention=args.attention, adapter=lora.AdapterConfig(kind="dora", r=8),
                    rngs=nnx.Rngs(0))
    pairs = args.clusters_per_device * args.cluster_size * jax.device_count()
    batch = {"query": synthetic_batch(config, pairs, args.text_len, args.image_side, 0),
             "candidate": synthetic_batch(config, pairs, args.text_len, 0, 1)}
    seconds, loss = time_g2e(model, batch, cpd=args.clusters_per_device,
                             cluster=args.cluster_size, chunk=args.chunk, steps=args.steps)
    tokens = sum(int(batch[s]["attention_mask"].sum()) for s in ("query", "candidate"))
    flops = 3 * model_training.flops_per_token(model) * tokens  # 6N per token, text model only
    peak = trainer._peak_flops()
    stats = jax.devices()[0].memory_stats() or {}
    print(f"Qwen2-VL-2B architecture ({config.text.num_layers} text / "
          f"{config.vision.depth} vision layers), random weights, DoRA r=8, bf16, "
          f"remat={args.remat}, attention={args.attention}")
    print(f"batch: {pairs} pairs ({args.clusters_per_device} clusters x {args.cluster_size} "
          f"x {jax.device_count()} devices), queries {args.image_side}px image + "
          f"{args.text_len} text tokens, candidates {args.text_len} text tokens, chunk "
          f"{args.chunk}; device {jax.devices()[0].device_kind}")
    print(f"step {seconds:.3f} s  {pairs / seconds:.1f} pairs/s  {tokens / seconds:.0f} tokens/s"
          f"  loss {loss:.3f}")
    if peak:
        print(f"MFU (6N x tokens, text model, no attention FLOPs): "
              f"{flops / seconds / (peak * jax.device_count()):.3f}")
    if "peak_bytes_in_use" in stats:
        print(f"peak memory: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", action="store_true",
                        help="Qwen2-VL-2B architecture on the accelerator")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--clusters_per_device", type=int, default=None)
    parser.add_argument("--cluster_size", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--text_len", type=int, default=None)
    parser.add_argument("--image_side", type=int, default=448)
    parser.add_argument("--layers", type=int, default=0, help="override depth (0: real 2B)")
    parser.add_argument("--remat", default="full")
    # One thread: on a loaded machine torch's OpenMP threads can spin-wait 50x slower.
    parser.add_argument("--torch_threads", type=int, default=1)
    parser.add_argument("--attention", default="xla")
    args = parser.parse_args()
    if args.accelerator:
        args.clusters_per_device = args.clusters_per_device or 4
        args.cluster_size = args.cluster_size or 16
        args.text_len = args.text_len or 64
        accelerator_mode(args)
    else:
        args.clusters_per_device = args.clusters_per_device or 4
        args.cluster_size = args.cluster_size or 4
        args.text_len = args.text_len or 64
        cpu_mode(args)


if __name__ == "__main__":
    main()
