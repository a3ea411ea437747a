"""The PyTorch side of bench/bench_train.py: transformers' Qwen2-VL with peft's DoRA, the same
step as g2e's (last-token embeddings, InfoNCE at 0.02, clipping, AdamW with g2e's schedule),
by direct backprop or GradCache."""

from __future__ import annotations

import numpy as np
import torch


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


def torch_step_fn(model, host, grids, *, device, dtype, image_token_id, chunk=0):
    """A torch train step on the batch: direct backprop, or GradCache over `chunk` rows."""
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
            q = torch_embed(model, *rows("query", 0, n), dtype)
            c = torch_embed(model, *rows("candidate", 0, n), dtype)
            loss = loss_of(q, c)
            loss.backward()
        else:  # GradCache: embed without graphs, loss gradient, re-embed chunk by chunk
            with torch.no_grad():
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
