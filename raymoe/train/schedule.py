"""Learning-rate schedules, as a pure function of the optimizer step (so a resumed run continues exactly).

constant: lr after a linear warm-up; cosine: linear warm-up to lr over `warmup_steps`, then cosine decay to
lr * min_lr_ratio at `total_steps` (nanoGPT / Chinchilla practice), held there after.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, schedule: str, warmup_steps: int, total_steps: int,
          min_lr_ratio: float = 0.1) -> float:
    """The learning rate of optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = lr * min_lr_ratio
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value
