"""Times the contrastive train step (pairs/s) of g2e against transformers + peft, same work.

  # CPU (this machine): tiny Qwen2-VL, text only; both sides on the same --threads cores.
  python bench/bench_train.py [--threads 2] [--steps 7] [--pairs 16]
  # Accelerator (one command, < 8 minutes on an H100): Qwen2-VL-2B architecture, random
  # weights, DoRA r=8 (q/k/v/o/down, dropout 0.1), bf16, an MMEB-like batch of 64 pairs.
  python bench/bench_train.py --accelerator [--pairs 64] [--remat none] [--attention xla]
  # The accelerator path end to end on a CPU, at toy sizes:
  python bench/bench_train.py --accelerator --smoke
  # One side only, its figures also written as JSON; then the table of such files:
  python bench/bench_train.py --accelerator --side g2e|torch --result DIR/train_SIDE.json
  python bench/bench_train.py --report DIR
  # On this workplace's lent GPU machine: bench/gpu_session.sh (wheels, timeouts, all figures).

Both sides run the same step: embed queries and candidates (last token, L2-normalised), InfoNCE
at temperature 0.02 over the batch, backward, global-norm clipping, AdamW. g2e runs its real
train step (g2e.training.step: the vision tower once per side, text-only chunks skipped, DoRA
norms once per step, direct backprop or GradCache as `train.backprop='auto'` chooses);
transformers runs Qwen2VLModel with peft's DoRA (adapters in float32, as peft keeps them) and
the same choice (GradCache written out in torch when g2e chose it).

CPU mode first checks that both compute the same thing: dropout off, the same adapter weights
(moved off their identity start, written by g2e as a PEFT adapter and loaded by peft), the first
step's loss and every adapter gradient must agree within 1e-4 (relative to the largest
gradient). Then both are timed with dropout 0.1: medians after warm-up, with the spread
(min-max), on the same cores (sched_setaffinity before either library starts, torch also
set_num_threads; XLA sizes its pool from the affinity mask). OMP_WAIT_POLICY defaults to
PASSIVE: torch's spinning OpenMP workers collapse when other work shares the cores.

Accelerator mode prints pairs/s of both (torch twice: under torch.autocast(bfloat16) as the HF
Trainer runs, and with peft's float32 adapters without autocast; bench/torch_reference.py), MFU
against the datasheet peak and against a measured bf16 GEMM rate, with and without DoRA's
drop(x) @ W, the XLA compilations of the step (and any while timed), and HFU of g2e
(g2e.training.flops: model FLOPs count the text forward+backward without the embedding lookup,
each image's tower forward once, attention, and the loss; a frozen base's backward counts as 1x
its forward plus the adapters' weight gradients; HFU counts the compiled step's own matmuls,
recomputation included), g2e's pairs/s with the tower run over every row instead of image rows
only (`--vision_chunk`), and peak memory of both.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import types

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# Imported by main() once the process is pinned to its cores (torch_reference imports torch).
jax = jnp = torch = torch_reference = None

QWEN2_VL_2B = dict(
    model_type="qwen2_vl",
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    tie_word_embeddings=True,
    text_config=dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        hidden_act="silu",
        tie_word_embeddings=True,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    ),
    vision_config=dict(
        depth=32,
        embed_dim=1280,
        hidden_size=1536,
        num_heads=16,
        mlp_ratio=4,
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        in_channels=3,
        hidden_act="quick_gelu",
    ),
)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
# MMEB-train (50k cap) by what each side holds: (share of rows, query text tokens, query has an
# image, candidate text tokens, candidate has an image). Classification, VQA, i2t retrieval,
# t2i retrieval, VisDial, CIRR/NIGHTS (image to image), WebQA, MSCOCO grounding.
MMEB_MIX = (
    (0.20, 20, True, 3, False),
    (0.25, 30, True, 5, False),
    (0.15, 15, True, 25, False),
    (0.15, 25, False, 10, True),
    (0.08, 150, False, 10, True),
    (0.06, 30, True, 10, True),
    (0.03, 30, False, 40, True),
    (0.08, 20, True, 10, True),
)
TEMPLATE_TOKENS = 40  # system turn, chat template and suffix around the instruction


def _pin(threads: int) -> list[int]:
    """Restricts this process to `threads` cores before jax or torch start their pools."""
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    return cores


def _rows_batch(config, rows, pad_to, image_side, rng):
    """A host batch (numpy, right padded) of rows [(text tokens, has image)].

    Returns (g2e batch, per-row image grids).
    """
    from g2e.models import positions

    side = image_side // 28 * 2 if image_side else 0
    grid = (1, side, side)
    image_tokens = side * side // 4
    patches = side * side if any(has for _, has in rows) else 0
    lengths = [t + (image_tokens if has else 0) for t, has in rows]
    length = -(-max(lengths) // pad_to) * pad_to
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros_like(ids)
    grids = []
    for r, ((_tokens, has), total) in enumerate(zip(rows, lengths)):
        ids[r, :total] = rng.integers(0, min(1000, config.image_token_id - 16), total)
        if has:
            ids[r, 4 : 4 + image_tokens] = config.image_token_id
        mask[r, :total] = 1
        grids.append([grid] if has else [])
    is_image = ids == config.image_token_id
    batch = dict(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions.rope_index(ids, mask, grids, image_token_id=config.image_token_id),
        last_index=np.asarray(lengths, np.int32) - 1,
        image_token_index=np.where(is_image, np.cumsum(is_image, 1) - 1, 0).astype(np.int32),
        pixel_values=np.zeros((len(rows), patches, config.vision.patch_dim), np.float32),
        vision_segment_ids=np.zeros((len(rows), patches), np.int32),
        vision_positions=np.zeros((len(rows), patches, 2), np.int32),
    )
    for r, row_grids in enumerate(grids):
        if row_grids:
            batch["pixel_values"][r] = rng.normal(size=(patches, config.vision.patch_dim))
            batch["vision_positions"][r], batch["vision_segment_ids"][r] = positions.vision_layout(
                row_grids, patches
            )
    return batch, grids


def mmeb_like_batch(config, pairs, image_side, seed, pad_to=64):
    """{'query', 'candidate', 'ids'} host batch drawn from MMEB_MIX (template tokens added)."""
    rng = np.random.default_rng(seed)
    shares = np.array([m[0] for m in MMEB_MIX])
    kinds = rng.choice(len(MMEB_MIX), size=pairs, p=shares / shares.sum())
    jitter = lambda n: int(max(1, n * rng.uniform(0.5, 1.5)))  # noqa: E731
    queries = [(TEMPLATE_TOKENS + jitter(MMEB_MIX[k][1]), MMEB_MIX[k][2]) for k in kinds]
    candidates = [(TEMPLATE_TOKENS + jitter(MMEB_MIX[k][3]), MMEB_MIX[k][4]) for k in kinds]
    query, query_grids = _rows_batch(config, queries, pad_to, image_side, rng)
    candidate, candidate_grids = _rows_batch(config, candidates, pad_to, image_side, rng)
    return (
        {"query": query, "candidate": candidate, "ids": np.arange(pairs, dtype=np.int32)},
        {"query": query_grids, "candidate": candidate_grids},
    )


# ------------------------------------------------------------------------------------ g2e side


def g2e_step(model, host, *, backprop="auto", vision_chunk=16, memory_limit=None, chunk=0):
    """(run one step -> loss, the chosen compiled step, the placed batch) for `model`."""
    from g2e import distributed
    from g2e.models import sharding
    from g2e.training import loss as loss_lib
    from g2e.training import optimizer, step, trainer
    from g2e.training import stage as model_training

    mesh = distributed.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    rules = sharding.DEFAULT_RULES
    graphdef, trainable, frozen = model_training.split_model(model, full=False)
    trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
    prepare, embed = model_training.model_step_fns(
        graphdef, devices=sharding.batch_devices(mesh, rules), vision_chunk=vision_chunk
    )
    train_cfg = types.SimpleNamespace(
        lr=5e-5, warmup_steps=100, steps=1500, weight_decay=0.0, grad_clip=1.0
    )
    opt, schedule = optimizer.make_optimizer(train_cfg)
    config = loss_lib.LossConfig(0.02, mask_identical_positives=False)
    setup = step.StepSetup(
        embed_fn=embed,
        loss_config=config,
        optimizer=opt,
        schedule=schedule,
        mesh=mesh,
        rules=rules,
        prepare_fn=prepare,
    )
    state = trainer._placed(step.init_state(trainable, opt, 0, config), mesh)
    batch = distributed.put_batch(host, mesh, rules)
    steps = step.CompiledSteps(
        setup,
        jax.tree.map(lambda x: x.sharding, state),
        backprop=backprop,
        memory_limit=memory_limit,
        query_chunk=chunk,
        candidate_chunk=chunk,
    )
    compiled = steps.get(state, frozen, batch)
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled.executable(holder["state"], frozen, batch)
        return float(metrics["loss"])  # fetching the loss waits for the step

    return run, compiled


def g2e_loss_and_grads(model, host):
    """Loss and adapter gradients of the first step, by plain backprop (no dropout)."""
    from g2e.training import gradcache
    from g2e.training import loss as loss_lib
    from g2e.training import stage as model_training

    graphdef, trainable, frozen = model_training.split_model(model, full=False)
    prepare, embed = model_training.model_step_fns(graphdef)
    config = loss_lib.LossConfig(0.02, mask_identical_positives=False)

    def fn(trainable, frozen, batch):
        frozen, batch = prepare(trainable, frozen, batch)
        return gradcache.direct_loss_and_grads(
            lambda p, f, b, k: embed(p["model"], f, b, k),
            lambda q, c, p: (loss_lib.infonce(q, c, batch["ids"], config, mesh=None)[0], {}),
            {"model": trainable},
            frozen,
            batch,
            jax.random.key(0),
        )

    loss, _, grads = jax.jit(fn)(trainable, frozen, jax.tree.map(jnp.asarray, host))
    return float(loss), grads["model"]


def peft_names(tree) -> dict[str, np.ndarray]:
    """g2e adapter arrays (stacked layers) by peft's parameter names, in peft's layout."""
    from g2e.models import peft as peft_io

    out = {}
    layers = tree["language_model"]["layers"]
    for _block, projections in layers.items():
        for projection, state in projections.items():
            for key, value in state.items():
                value = np.asarray(value, np.float32)
                for layer in range(value.shape[0]):
                    name = (
                        f"base_model.model.model.language_model.layers.{layer}."
                        f"{peft_io._BLOCK_OF[projection]}.{projection}."
                    )
                    if key == "magnitude":
                        out[name + "lora_magnitude_vector.default.weight"] = value[layer]
                    else:
                        out[name + f"lora_{key[-1].upper()}.default.weight"] = value[layer].T
    return out


def time_steps(run, steps, warmup, sync=lambda: None):
    """Seconds per step: (median, min, max) over `steps` after `warmup` untimed steps."""
    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(min(times)), float(max(times))


# ------------------------------------------------------------------------------------ CPU mode


def cpu_mode(args):
    import peft
    import transformers

    from g2e.models import hf_io, lora
    from g2e.models import peft as peft_io
    from g2e.models.config import Qwen2VLConfig
    from tests.models import checkpoints

    with tempfile.TemporaryDirectory() as tmp:
        checkpoints.make_hf_model(widths="tiny", num_layers=2).save_pretrained(tmp)
        config = Qwen2VLConfig.from_dir(tmp)
        text_rows = lambda rng: [
            (
                int(rng.integers(args.text_len // 2, args.text_len + 1)),  # noqa
                False,
            )
            for _ in range(args.pairs)
        ]
        rng = np.random.default_rng(0)
        host = {
            "query": _rows_batch(config, text_rows(rng), args.text_len, 0, rng)[0],
            "candidate": _rows_batch(config, text_rows(rng), args.text_len, 0, rng)[0],
            "ids": np.arange(args.pairs, dtype=np.int32),
        }
        grids = {s: [[] for _ in range(args.pairs)] for s in ("query", "candidate")}
        adapter = dict(kind="dora", r=8, alpha=64, targets=TARGETS)
        model = hf_io.load_model(tmp, adapter=lora.AdapterConfig(dropout=0.0, **adapter))
        _move_adapters(model)
        peft_io.save_peft_adapter(
            model, lora.AdapterConfig(dropout=0.0, **adapter), f"{tmp}/adapter"
        )
        base = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp).float()
        torch_model = peft.PeftModel.from_pretrained(base, f"{tmp}/adapter", is_trainable=True)

        # 1. The same computation: first step's loss and gradients, dropout off.
        g2e_loss, g2e_grads = g2e_loss_and_grads(model, host)
        torch_model.train()
        torch_reference.set_dropout(torch_model, 0.0)
        sides = {
            s: torch_reference.torch_inputs(host[s], grids[s], "cpu", config.image_token_id)
            for s in ("query", "candidate")
        }
        q, c = (
            torch_reference.torch_embed(
                torch_model,
                sides[s],
                torch.tensor(host[s]["last_index"], dtype=torch.long),
                torch.float32,
            )
            for s in ("query", "candidate")
        )
        torch_loss = torch.nn.functional.cross_entropy(q @ c.T / 0.02, torch.arange(args.pairs))
        torch_loss.backward()
        named = dict(torch_model.named_parameters())
        ours = peft_names(g2e_grads)
        scale = max(float(np.abs(g).max()) for g in ours.values())
        worst = max(float(np.abs(ours[n] - named[n].grad.numpy()).max()) for n in ours)
        same = abs(g2e_loss - float(torch_loss)) < 1e-4 and worst < 1e-4 * scale
        print(
            f"check (dropout off): loss g2e {g2e_loss:.6f} torch {float(torch_loss):.6f}; "
            f"{len(ours)} adapter gradients, largest difference {worst:.2e} "
            f"(largest gradient {scale:.2e}): {'SAME' if same else 'DIFFERENT'}"
        )
        torch_model.zero_grad()

        # 2. Timing, dropout 0.1 on both sides.
        model = hf_io.load_model(tmp, adapter=lora.AdapterConfig(dropout=0.1, **adapter))
        peft_io.load_peft_adapter(model, f"{tmp}/adapter")
        run, compiled = g2e_step(model, host)
        g2e_time = time_steps(run, args.steps, args.warmup)
        torch_reference.set_dropout(torch_model, 0.1)
        torch_step = torch_reference.torch_step_fn(
            torch_model,
            host,
            grids,
            device="cpu",
            dtype=torch.float32,
            image_token_id=config.image_token_id,
        )
        torch_time = time_steps(torch_step, args.steps, args.warmup)
    cores = sorted(os.sched_getaffinity(0))
    print(
        f"batch: {args.pairs} pairs, text up to {args.text_len} tokens, tiny Qwen2-VL (2 "
        f"layers), DoRA r=8 on {', '.join(TARGETS)}, dropout 0.1; g2e {compiled.backprop} "
        f"backprop; both on cores {cores} (torch {torch.get_num_threads()} threads); "
        f"{args.steps} timed steps after {args.warmup} warm-up"
    )
    for name, (median, low, high) in (("g2e", g2e_time), ("torch", torch_time)):
        print(
            f"{name:6s} step {median * 1e3:8.1f} ms (min {low * 1e3:.1f}, max {high * 1e3:.1f})"
            f"  {args.pairs / median:8.1f} pairs/s"
        )
    print(f"ratio g2e/torch pairs/s: {torch_time[0] / g2e_time[0]:.2f} (target >= 1.3)")


def _move_adapters(model, seed=3):
    """Adapters off their identity start (B != 0, magnitudes off the norms), as after training."""
    from flax import nnx

    _, adapters, _ = nnx.split(model, nnx.LoRAParam, ...)
    keys = iter(jax.random.split(jax.random.key(seed), 256))
    nnx.update(
        model,
        jax.tree.map(
            lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), adapters
        ),
    )


# ---------------------------------------------------------------------------- accelerator mode
# Each side runs in its own process (`--side g2e|torch`), so each has the accelerator's memory
# to itself; the parent prints the table.


def _hf_config(args) -> dict:
    if args.smoke:
        from tests.models import checkpoints

        tiny = checkpoints.hf_config_dict("tiny", num_layers=args.layers or 2)
        return dict(tiny, model_type="qwen2_vl")
    hf = dict(QWEN2_VL_2B)
    if args.layers:
        hf["text_config"] = dict(hf["text_config"], num_hidden_layers=args.layers)
        hf["vision_config"] = dict(hf["vision_config"], depth=args.layers)
    return hf


def g2e_side(args) -> dict:
    from flax import nnx

    from g2e.models import lora
    from g2e.models.config import Qwen2VLConfig
    from g2e.models.qwen2_vl import Qwen2VL
    from g2e.training import flops, step

    compiles = []  # (seconds) of every XLA compilation in this process
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: (
            compiles.append(seconds)
            if event == "/jax/core/compile/backend_compile_duration"
            else None
        )
    )
    config = Qwen2VLConfig.from_hf(_hf_config(args))
    adapter = lora.AdapterConfig(kind="dora", r=8, alpha=64, dropout=0.1, targets=TARGETS)
    model = Qwen2VL(
        config,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
        remat=args.remat,
        attention=args.attention,
        adapter=adapter,
        rngs=nnx.Rngs(0),
    )
    host, _ = mmeb_like_batch(config, args.pairs, args.image_side, seed=0)
    start, compiles_before = time.perf_counter(), len(compiles)
    run, compiled = g2e_step(
        model,
        host,
        backprop=args.backprop,
        vision_chunk=args.vision_chunk,
        memory_limit=step.device_memory_limit(),
        chunk=args.chunk,
    )
    compile_s = time.perf_counter() - start
    compiles_for_step = len(compiles) - compiles_before
    median, low, high = time_steps(run, args.steps, args.warmup)
    compiles_while_timed = len(compiles) - compiles_before - compiles_for_step
    devices = jax.device_count()
    peak = flops.peak_flops()
    model_flops = flops.train_step_flops(config, host, adapter)
    # DoRA with dropout needs a second base product drop(x) @ W (PEFT's formulation); the
    # figure without it is the work of the method with a fused adapter.
    no_drop = dataclasses.replace(adapter, dropout=0.0)
    model_flops_no_drop = flops.train_step_flops(config, host, no_drop)
    hardware_flops = compiled.hardware_flops * devices
    stats = jax.devices()[0].memory_stats() or {}
    return dict(
        side="g2e",
        jax=jax.__version__,
        device=jax.devices()[0].device_kind,
        devices=devices,
        peak_flops=peak,
        gemm_peak=jax_gemm_peak(_gemm_size(args)),
        model_flops_no_drop=model_flops_no_drop,
        compiles=compiles_for_step,
        compiles_while_timed=compiles_while_timed,
        attention=args.attention,
        remat=args.remat,
        pairs=args.pairs,
        smoke=args.smoke,
        seconds=median,
        low=low,
        high=high,
        compile_s=compile_s,
        backprop=compiled.backprop,
        chunk=compiled.query_chunk,
        model_flops=model_flops,
        hardware_flops=hardware_flops,
        mfu=model_flops / median / (peak * devices) if peak else None,
        hfu=hardware_flops / median / (peak * devices) if peak else None,
        planned_gib=compiled.memory_bytes / 2**30,
        peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
        images={
            s: int((host[s]["vision_segment_ids"] > 0).any(-1).sum())
            for s in ("query", "candidate")
        },
        tokens={s: int(host[s]["attention_mask"].sum()) for s in ("query", "candidate")},
        lengths={s: host[s]["input_ids"].shape[1] for s in ("query", "candidate")},
    )


def torch_side(args) -> dict:
    """transformers + peft on the same batch, in each of torch_reference.MODES."""
    from g2e.models.config import Qwen2VLConfig

    hf = _hf_config(args)
    config = Qwen2VLConfig.from_hf(hf)
    host, grids = mmeb_like_batch(config, args.pairs, args.image_side, seed=0)
    return torch_reference.run_side(
        hf,
        host,
        grids,
        targets=TARGETS,
        gradient_checkpointing=args.remat != "none",
        chunk=args.chunk,
        time_steps=lambda run, sync: time_steps(run, args.steps, args.warmup, sync),
        write=lambda result: _write_result(args.result, result),
        gemm_size=_gemm_size(args),
    )


def _gemm_size(args) -> int:
    return 256 if args.smoke else 8192


def _write_result(path: str, result: dict) -> None:
    """Writes a side's figures as JSON to `path` (nothing when empty), replacing it whole."""
    if not path:
        return
    import json

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def jax_gemm_peak(size: int, repeats: int = 10) -> float:
    """Measured FLOP/s of a jitted bf16 [size, size] @ [size, size] product (random data)."""
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (size, size), jnp.bfloat16) for k in keys)
    product = jax.jit(lambda a, b: a @ b)
    product(a, b).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = product(a, b)
    out.block_until_ready()
    return 2.0 * size**3 * repeats / (time.perf_counter() - start)


def _child(args, side: str, **overrides) -> dict:
    import json
    import subprocess

    argv = [sys.executable, __file__, "--accelerator", "--side", side]
    for key in (
        "pairs",
        "steps",
        "warmup",
        "image_side",
        "layers",
        "remat",
        "attention",
        "backprop",
        "vision_chunk",
        "chunk",
    ):
        argv += [f"--{key}", str(overrides.get(key, getattr(args, key)))]
    argv += ["--smoke"] if args.smoke else []
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return dict(side=side, error=f"timed out after {args.child_timeout} s")
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        return dict(side=side, error=(done.stderr or done.stdout)[-2000:])
    return json.loads(lines[-1][len("RESULT ") :])


def accelerator_mode(args):
    fast = _child(args, "g2e")
    every_row = None if args.quick or "error" in fast else _child(args, "g2e", vision_chunk=0)
    gradcache = fast.get("backprop") == "gradcache"
    chunk = fast["chunk"] * fast["devices"] if gradcache else 0
    print_report(fast, every_row, _child(args, "torch", chunk=chunk))


def read_results(folder: str) -> tuple[dict, dict]:
    """The g2e and torch result files a GPU session wrote (an error entry for a missing one)."""
    import json

    results = []
    for side in ("g2e", "torch"):
        path = os.path.join(folder, f"train_{side}.json")
        try:
            with open(path) as f:
                results.append(json.load(f))
        except (OSError, ValueError) as error:
            results.append(dict(side=side, error=f"{path}: {error}"))
    return results[0], results[1]


def _utilisation(model_flops, seconds, result, gemm_peak) -> str:
    """MFU against the datasheet peak and against the measured bf16 GEMM rate."""
    devices, peak = result.get("devices", 1), result.get("peak_flops")
    rate = model_flops / seconds / devices
    datasheet = f"{rate / peak:.3f}" if peak else "n/a (no datasheet peak for this device)"
    return f"{datasheet} of the datasheet peak, {rate / gemm_peak:.3f} of the measured GEMM rate"


def _print_g2e(fast: dict, every_row: dict | None, gemm: float) -> None:
    pairs, seconds = fast["pairs"], fast["seconds"]
    print(
        f"Qwen2-VL-2B architecture{' (smoke: tiny widths)' if fast['smoke'] else ''}, random "
        f"weights, DoRA r=8 on {', '.join(TARGETS)}, dropout 0.1, bf16, remat={fast['remat']}, "
        f"attention={fast['attention']}; device {fast['device']} x {fast['devices']}, "
        f"jax {fast['jax']}; measured bf16 GEMM {gemm / 1e12:.1f} TFLOP/s"
    )
    print(
        f"batch: {pairs} MMEB-like pairs, images in {fast['images']['query']} queries / "
        f"{fast['images']['candidate']} candidates, tokens {fast['tokens']}, padded lengths "
        f"{fast['lengths']}"
    )
    print(
        f"g2e    {seconds * 1e3:9.1f} ms/step (min {fast['low'] * 1e3:.1f}, max "
        f"{fast['high'] * 1e3:.1f})  {pairs / seconds:8.1f} pairs/s  {fast['backprop']} "
        f"backprop (chunk {fast['chunk']}), compile {fast['compile_s']:.0f} s"
    )
    for label, work in (("", "model_flops"), (" without drop(x)@W", "model_flops_no_drop")):
        print(f"       MFU{label}: {_utilisation(fast[work], seconds, fast, gemm)}")
    if fast["hfu"] is not None:
        print(f"       HFU {fast['hfu']:.3f} ({fast['hardware_flops']:.3g} FLOP per step)")
    print(
        f"       memory: planned {fast['planned_gib']:.2f} GiB, peak {fast['peak_gib']:.2f} "
        f"GiB; XLA compilations for the step {fast['compiles']} (while timed: "
        f"{fast['compiles_while_timed']})"
    )
    if every_row and "error" not in every_row:
        print(
            f"g2e, tower over every row (vision_chunk=0): {every_row['seconds'] * 1e3:.1f} "
            f"ms/step, {pairs / every_row['seconds']:.1f} pairs/s"
        )


def print_report(fast: dict, every_row: dict | None, reference: dict) -> None:
    """The accelerator table: g2e's step, MFU/HFU, memory and compiles; torch per mode."""
    if "error" in fast:
        print("g2e failed:\n" + fast["error"])
        return
    gemm = max(fast["gemm_peak"], reference.get("gemm_peak", 0.0))
    _print_g2e(fast, every_row, gemm)
    if "error" in reference:
        print("torch failed: " + reference["error"])
    pairs, seconds = fast["pairs"], fast["seconds"]
    for mode in torch_reference.MODES:
        figures = reference.get(mode)
        if not figures or "error" in figures:
            print(f"torch {mode}: {figures['error'] if figures else 'not run (timed out?)'}")
            continue
        print(
            f"torch {mode:17s} {figures['seconds'] * 1e3:9.1f} ms/step (min "
            f"{figures['low'] * 1e3:.1f}, max {figures['high'] * 1e3:.1f})  "
            f"{pairs / figures['seconds']:8.1f} pairs/s  peak {figures['peak_gib']:.2f} GiB"
        )
        print(
            f"       same work's MFU: "
            f"{_utilisation(fast['model_flops'], figures['seconds'], fast, gemm)}"
        )
        print(
            f"       ratio g2e/torch ({mode}) pairs/s: {figures['seconds'] / seconds:.2f} "
            "(target >= 1.5 against autocast; MFU target >= 0.40)"
        )


def main():
    global jax, jnp, torch, torch_reference
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--accelerator", action="store_true", help="Qwen2-VL-2B architecture on the accelerator"
    )
    parser.add_argument("--smoke", action="store_true", help="accelerator path at toy sizes")
    parser.add_argument("--quick", action="store_true", help="skip the vision_chunk=0 run")
    parser.add_argument(
        "--side", choices=("g2e", "torch"), help="accelerator mode: run one side only"
    )
    parser.add_argument("--result", default="", help="--side: also write its figures here (JSON)")
    parser.add_argument(
        "--report", default="", help="print the table of the train_*.json files in this folder"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="CPU mode: cores both sides run on",
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--text_len", type=int, default=64)
    parser.add_argument("--image_side", type=int, default=None)
    parser.add_argument("--layers", type=int, default=0, help="override depth (0: real 2B)")
    parser.add_argument(
        "--remat",
        default=None,
        help="none, dots_no_batch or full (default: full on the accelerator, as "
        "the recipe; torch then checkpoints its layers too)",
    )
    parser.add_argument("--attention", default="xla")
    parser.add_argument("--backprop", default="auto", help="auto, direct or gradcache")
    parser.add_argument("--vision_chunk", type=int, default=16)
    parser.add_argument(
        "--child_timeout",
        type=int,
        default=400,
        help="accelerator mode: seconds each side may take",
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=0,
        help="GradCache rows per device per chunk (0: sized for the device)",
    )
    args = parser.parse_args()
    if args.report:
        import torch_reference as reference_module

        globals()["torch_reference"] = reference_module
        fast, reference = read_results(args.report)
        print_report(fast, None, reference)
        return
    if not args.accelerator:
        _pin(args.threads)
        # torch's OpenMP threads otherwise spin while waiting: on a machine whose cores other
        # work shares, 2 threads then ran a step 10-30x slower than 1 thread did.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    elif args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax as jax_module
    import jax.numpy as jnp_module
    import torch as torch_module
    import torch_reference as reference_module

    jax, jnp, torch, torch_reference = jax_module, jnp_module, torch_module, reference_module
    if not args.accelerator:
        torch.set_num_threads(args.threads)
        args.pairs, args.steps = args.pairs or 16, args.steps or 7
        cpu_mode(args)
        return
    args.remat = args.remat or "full"
    args.pairs = args.pairs or (8 if args.smoke else 64)
    args.steps = args.steps or (2 if args.smoke else 5)
    args.image_side = args.image_side or (56 if args.smoke else 448)
    if args.side:
        import json

        result = g2e_side(args) if args.side == "g2e" else torch_side(args)
        _write_result(args.result, result)
        print("RESULT " + json.dumps(result))
        return
    accelerator_mode(args)


if __name__ == "__main__":
    main()
