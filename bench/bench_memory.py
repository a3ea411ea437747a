"""The 7B memory plan: XLA's per-device memory of the real train step at the recipe's batch.

  python bench/bench_memory.py [--plans fsdp8-full-gc32,fsdp8-none-gc8,...] [--length 512]

Builds Qwen2-VL-7B-Instruct's architecture from abstract shapes (nothing is allocated), shards
it as `configs/mmeb.py:7b` does (mesh data=1, fsdp=8 over 8 simulated CPU devices), and compiles
g2e's train step (g2e.training.step.train_step with the Qwen2VL prepare/embed functions:
vision tower once per side, DoRA r=8 on q/k/v/o/down) for the recipe's global batch of 2048
pairs: queries with a 448x448 image (1024 patches) and `--length` tokens, candidates likewise
(every row an image row: the worst case of the patch bucket). For each plan it prints
`compiled.memory_analysis()`: arguments (parameters, optimizer state, batch) + outputs - aliased
+ temporaries, per device, against an H100's 80 GB and a TPU v4 chip's 32 GB.

Plans are named <mesh>-<remat>-<backprop>: mesh 'fsdp8' (data=1, fsdp=8) or 'data8'
(data=8, replicated weights), remat none / dots_no_batch / full, backprop 'direct' or 'gcN'
(GradCache, N rows per device per chunk). The numbers are the CPU backend's buffer assignment;
a GPU or TPU compiler fuses differently, so read them as a plan, with headroom.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from g2e.models import lora, sharding  # noqa: E402
from g2e.models.config import Qwen2VLConfig  # noqa: E402
from g2e.models.qwen2_vl import Qwen2VL  # noqa: E402
from g2e.training import loss as loss_lib  # noqa: E402
from g2e.training import optimizer, step  # noqa: E402
from g2e.training import stage as model_training  # noqa: E402

QWEN2_VL_7B = dict(
    model_type="qwen2_vl",
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    tie_word_embeddings=False,
    text_config=dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        hidden_act="silu",
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    ),
    vision_config=dict(
        depth=32,
        embed_dim=1280,
        hidden_size=3584,
        num_heads=16,
        mlp_ratio=4,
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        in_channels=3,
        hidden_act="quick_gelu",
    ),
)
MESHES = {"fsdp8": (1, 8, 1), "data8": (8, 1, 1)}
GIB = 2**30


def abstract_batch(config: Qwen2VLConfig, rows: int, length: int, patches: int, mesh, rules):
    """ShapeDtypeStructs of one side of a training batch, sharded over the batch axes."""
    axes = sharding.batch_axes(rules, mesh.axis_names)

    def field(name, shape, dtype):
        spec = [None] * len(shape)
        spec[sharding.batch_dim(name)] = axes
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*spec)))

    return {
        "input_ids": field("input_ids", (rows, length), jnp.int32),
        "attention_mask": field("attention_mask", (rows, length), jnp.int32),
        "position_ids": field("position_ids", (3, rows, length), jnp.int32),
        "last_index": field("last_index", (rows,), jnp.int32),
        "image_token_index": field("image_token_index", (rows, length), jnp.int32),
        "pixel_values": field(
            "pixel_values", (rows, patches, config.vision.patch_dim), jnp.float32
        ),
        "vision_segment_ids": field("vision_segment_ids", (rows, patches), jnp.int32),
        "vision_positions": field("vision_positions", (rows, patches, 2), jnp.int32),
    }


def plan_memory(plan: str, args) -> dict:
    """Compiles the train step of `plan` from abstract shapes; returns its memory figures."""
    mesh_name, remat, backprop = plan.split("-")
    devices = jax.devices()[:8]
    mesh = jax.make_mesh(
        MESHES[mesh_name],
        ("data", "fsdp", "tensor"),
        axis_types=(AxisType.Auto,) * 3,
        devices=devices,
    )
    rules = sharding.DEFAULT_RULES
    config = Qwen2VLConfig.from_hf(QWEN2_VL_7B)
    adapter = lora.AdapterConfig(kind="dora", r=8, alpha=64, dropout=0.1)
    abstract = nnx.eval_shape(
        lambda: Qwen2VL(
            config,
            dtype=jnp.bfloat16,
            param_dtype=jnp.bfloat16,
            remat=remat,
            attention="xla",
            adapter=adapter,
            rngs=nnx.Rngs(0),
        )
    )
    graphdef, trainable, frozen = nnx.split(abstract, nnx.LoRAParam, ...)

    def placed(state):
        shardings = sharding.state_shardings(state, mesh, rules)
        return jax.tree.map(
            lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
            state,
            shardings,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )

    trainable, frozen = placed(trainable).to_pure_dict(), placed(frozen)
    prepare, embed = model_training.model_step_fns(
        graphdef, devices=sharding.batch_devices(mesh, rules), vision_chunk=16
    )
    cfg = type(
        "TrainConfig",
        (),
        dict(lr=5e-5, warmup_steps=100, steps=1500, weight_decay=0.0, grad_clip=1.0),
    )
    opt, schedule = optimizer.make_optimizer(cfg)
    chunk = 0 if backprop == "direct" else int(backprop[2:])
    setup = step.StepSetup(
        embed_fn=embed,
        loss_config=loss_lib.LossConfig(0.02),
        optimizer=opt,
        schedule=schedule,
        mesh=mesh,
        rules=rules,
        query_chunk=chunk,
        candidate_chunk=chunk,
        prepare_fn=prepare,
    )
    replicated = NamedSharding(mesh, P())
    state = jax.eval_shape(lambda t: step.init_state(t, opt, 0, setup.loss_config), trainable)
    state = _shard_like_params(state, {"model": trainable}, replicated)
    batch = {
        side: abstract_batch(config, args.pairs, args.length, args.patches, mesh, rules)
        for side in ("query", "candidate")
    }
    batch["ids"] = jax.ShapeDtypeStruct(
        (args.pairs,),
        jnp.int32,
        sharding=NamedSharding(mesh, P(sharding.batch_axes(rules, mesh.axis_names))),
    )
    start = time.perf_counter()
    jitted = step.jit_step(setup, jax.tree.map(lambda x: x.sharding, state))
    compiled = step.compile_step(jitted, setup, state, frozen, batch)
    memory = compiled.memory_analysis()
    return dict(
        plan=plan,
        seconds=time.perf_counter() - start,
        total=step.memory_bytes(compiled),
        arguments=memory.argument_size_in_bytes,
        temporaries=memory.temp_size_in_bytes,
        outputs=memory.output_size_in_bytes,
        aliased=memory.alias_size_in_bytes,
    )


def _shard_like_params(state, params, replicated):
    """The train state with each parameter's sharding on it and on its Adam moments (whose
    paths end with the parameter's path); everything else replicated."""
    keys = lambda path: tuple(str(k) for k in path)  # noqa: E731
    by_path = {
        keys(path): leaf.sharding for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }

    def one(path, x):
        path = keys(path)
        found = next(
            (by_path[path[i:]] for i in range(len(path)) if path[i:] in by_path), replicated
        )
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=found)

    return jax.tree_util.tree_map_with_path(one, state)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--plans",
        default="fsdp8-full-direct,fsdp8-full-gc32,fsdp8-full-gc16,"
        "fsdp8-full-gc8,fsdp8-dots_no_batch-gc8",
    )
    parser.add_argument("--pairs", type=int, default=2048, help="global batch (recipe: 2048)")
    parser.add_argument("--length", type=int, default=512, help="padded tokens per row")
    parser.add_argument("--patches", type=int, default=1024, help="patches per row (448x448)")
    args = parser.parse_args()
    print(
        f"Qwen2-VL-7B, DoRA r=8, bf16 weights, {args.pairs} pairs, {args.length} tokens and "
        f"{args.patches} patches per row, 8 simulated devices ({jax.devices()[0].platform})"
    )
    print(
        f"{'plan':24s} {'GiB/device':>10s} {'args':>7s} {'temp':>7s} {'80 GB':>6s} "
        f"{'32 GB':>6s} {'compile':>8s}"
    )
    for plan in args.plans.split(","):
        r = plan_memory(plan, args)
        total = r["total"] / GIB
        print(
            f"{plan:24s} {total:10.2f} {r['arguments'] / GIB:7.2f} {r['temporaries'] / GIB:7.2f}"
            f" {'yes' if r['total'] < 80e9 else 'no':>6s} {'yes' if r['total'] < 32e9 else 'no':>6s}"
            f" {r['seconds']:7.0f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
