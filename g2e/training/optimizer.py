"""AdamW with linear warm-up and linear decay, and global-norm gradient clipping (docs/method.md §3).

The optimizer only ever sees the trainable parameters (adapters, or all weights for full
fine-tuning), so only they carry Adam moments.
"""

from __future__ import annotations

from typing import Any

import optax


def learning_rate_schedule(lr: float, warmup_steps: int, steps: int) -> optax.Schedule:
    """0 -> lr linearly over warmup_steps, then lr -> 0 linearly at `steps`.

    The same as transformers' get_linear_schedule_with_warmup, which the release uses.
    """
    warmup_steps = min(warmup_steps, steps)
    warmup = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
    decay = optax.linear_schedule(lr, 0.0, max(steps - warmup_steps, 1))
    return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(train_cfg: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW from the `train` config block: lr, warmup_steps, steps, weight_decay, grad_clip.

    Returns:
      (the optax transformation, the learning-rate schedule for logging).
    """
    schedule = learning_rate_schedule(
        float(train_cfg.lr), int(train_cfg.warmup_steps), int(train_cfg.steps)
    )
    parts = []
    if train_cfg.grad_clip and train_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(train_cfg.grad_clip)))
    # b1, b2, eps and the decoupled weight decay of torch.optim.AdamW / the HF Trainer.
    parts.append(
        optax.adamw(
            schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=float(train_cfg.weight_decay)
        )
    )
    return optax.chain(*parts), schedule
