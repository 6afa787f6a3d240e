"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float = 0.1) -> Callable[[int], float]:
    """The lr multiplier for step `step` (0-based): ramps to 1 over `warmup_steps`, then follows a cosine
    from 1 down to `floor` at `total_steps` and stays there."""
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor is a fraction of the peak lr in [0, 1], got {floor}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            # (step + 1): the first update already moves the weights; the last warmup step reaches the peak.
            return (step + 1) / warmup_steps
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                            floor: float = 0.1) -> LambdaLR:
    return LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps, floor))
