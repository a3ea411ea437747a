"""The PyTorch side of bench/bench_train.py: transformers' Qwen2-VL with peft's DoRA, the same
step as g2e's (last-token embeddings, InfoNCE at 0.02, clipping, AdamW with g2e's schedule),
by direct backprop or GradCache.

On the accelerator it runs as the release trains (transformers' Trainer with bf16=True): bf16
base weights, peft's float32 adapters, the forward and the loss under
`torch.autocast(bfloat16)`, gradient checkpointing enabled the Trainer's way
(`gradient_checkpointing_enable()` with transformers' default arguments). Without autocast
('float32_adapters') peft casts each adapted input to the float32 `lora_A` dtype, so DoRA's
extra drop(x) @ W runs in float32: the slower figure the benchmark used to report; both are
measured (`MODES`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import numpy as np
import torch

MODES = ("autocast", "float32_adapters")


def torch_inputs(host_side, grids, device, image_token_id):
    """transformers' inputs for one side of a host batch (pixels of real patches only)."""
    ids = torch.tensor(host_side["input_ids"], dtype=torch.long, device=device)
    inputs = dict(
        input_ids=ids, attention_mask=torch.tensor(host_side["attention_mask"], device=device)
    )
    flat = [g for row in grids for g in row]
    if flat:
        patches = [
            host_side["pixel_values"][r, : int(np.prod(g))]
            for r, row in enumerate(grids)
            for g in row
        ]
        inputs["pixel_values"] = torch.tensor(np.concatenate(patches), device=device)
        inputs["image_grid_thw"] = torch.tensor(flat, device=device)
        inputs["mm_token_type_ids"] = (ids == image_token_id).long()
    return inputs


def torch_embed(model, inputs, last_index, dtype):
    """L2-normalised last-token embeddings of peft-wrapped Qwen2VLForConditionalGeneration."""
    if "pixel_values" in inputs:
        inputs = dict(inputs, pixel_values=inputs["pixel_values"].to(dtype))
    out = model.base_model.model.model(**inputs)
    rows = torch.arange(len(last_index), device=last_index.device)
    return torch.nn.functional.normalize(out.last_hidden_state[rows, last_index].float(), dim=-1)


def torch_step_fn(model, host, grids, *, device, dtype, image_token_id, chunk=0, autocast=False):
    """A torch train step on the batch: direct backprop, or GradCache over `chunk` rows.

    autocast: forward passes and the loss under torch.autocast(bfloat16), as the HF Trainer's
    bf16=True; backward and the optimizer outside it.
    """
    device_type = torch.device(device).type

    def forward_context():
        if not autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)

    sides = {
        s: torch_inputs(host[s], grids[s], device, image_token_id) for s in ("query", "candidate")
    }
    last = {s: torch.tensor(host[s]["last_index"], dtype=torch.long, device=device) for s in sides}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5)
    # g2e's schedule: linear warm-up over 100 steps, linear decay to 0 at 1500.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / 100 if s < 100 else max(0.0, (1500 - s) / 1400)
    )
    labels = torch.arange(len(host["ids"]), device=device)

    def rows(side, start, stop):
        one = {
            k: v[start:stop]
            for k, v in sides[side].items()
            if k not in ("pixel_values", "image_grid_thw")
        }
        grid = grids[side][start:stop]
        if any(grid):
            first = sum(int(np.prod(g)) for row in grids[side][:start] for g in row)
            count = sum(int(np.prod(g)) for row in grid for g in row)
            one["pixel_values"] = sides[side]["pixel_values"][first : first + count]
            one["image_grid_thw"] = torch.tensor([g for row in grid for g in row], device=device)
        else:
            one.pop("mm_token_type_ids", None)
        return one, last[side][start:stop]

    def loss_of(q, c):
        return torch.nn.functional.cross_entropy(q @ c.T / 0.02, labels)

    def step():
        n = len(labels)
        if not chunk:
            with forward_context():
                q = torch_embed(model, *rows("query", 0, n), dtype)
                c = torch_embed(model, *rows("candidate", 0, n), dtype)
                loss = loss_of(q, c)
            loss.backward()
        else:  # GradCache: embed without graphs, loss gradient, re-embed chunk by chunk
            with torch.no_grad(), forward_context():
                embedded = {
                    s: torch.cat(
                        [
                            torch_embed(model, *rows(s, i, i + chunk), dtype)
                            for i in range(0, n, chunk)
                        ]
                    )
                    for s in sides
                }
            reps = {s: e.detach().requires_grad_() for s, e in embedded.items()}
            loss = loss_of(reps["query"], reps["candidate"])
            loss.backward()
            for s in sides:
                for i in range(0, n, chunk):
                    with forward_context():
                        out = torch_embed(model, *rows(s, i, i + chunk), dtype)
                    out.backward(reps[s].grad[i : i + chunk])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad()
        return float(loss.detach())

    return step


def set_dropout(peft_model, rate):
    for module in peft_model.modules():
        if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
            module.lora_dropout["default"] = torch.nn.Dropout(rate) if rate else torch.nn.Identity()


def gemm_peak(device: str, size: int, repeats: int = 10) -> float:
    """Measured FLOP/s of a bf16 [size, size] @ [size, size] product on `device` (random data)."""
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (
        torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
        for _ in range(2)
    )
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2.0 * size**3 * repeats / (time.perf_counter() - start)


def run_side(
    hf: dict,
    host: dict,
    grids: dict,
    *,
    targets: tuple[str, ...],
    gradient_checkpointing: bool,
    chunk: int,
    time_steps: Callable,
    write: Callable[[dict], None],
    gemm_size: int,
) -> dict:
    """Times the torch step in every mode of MODES; `write(result)` after each mode, so a run
    stopped by its timeout still leaves the modes it finished.

    hf: transformers Qwen2VLConfig keyword arguments; host, grids: bench_train's batch.
    """
    import peft
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_config = transformers.Qwen2VLConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    with torch.device(device):
        base = transformers.Qwen2VLForConditionalGeneration._from_config(
            hf_config, attn_implementation="sdpa", torch_dtype=torch.bfloat16
        )
    if gradient_checkpointing:
        base.gradient_checkpointing_enable()  # the Trainer's call, transformers' defaults
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=8,
            lora_alpha=64,
            lora_dropout=0.1,
            use_dora=True,
            init_lora_weights="gaussian",
            target_modules=list(targets),
        ),
    )
    model.train()
    on_gpu = device == "cuda"
    result = dict(
        side="torch",
        device=torch.cuda.get_device_name() if on_gpu else "cpu",
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        gradient_checkpointing=gradient_checkpointing,
        gemm_peak=gemm_peak(device, gemm_size),
    )
    write(result)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    for mode in MODES:
        run = torch_step_fn(
            model,
            host,
            grids,
            device=device,
            dtype=torch.bfloat16,
            image_token_id=hf["image_token_id"],
            chunk=chunk,
            autocast=mode == "autocast",
        )
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        try:
            median, low, high = time_steps(run, sync=sync)
        except torch.OutOfMemoryError as error:
            result[mode] = dict(error=f"out of memory: {str(error)[:200]}")
        else:
            peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0
            result[mode] = dict(seconds=median, low=low, high=high, peak_gib=peak)
        write(result)
    return result
