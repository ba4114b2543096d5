"""The learning-rate schedule: linear warmup, then cosine decay to a floor (``optim.warmup_steps``,
``optim.min_lr_ratio``), as a multiplier of ``optim.lr`` for ``torch.optim.lr_scheduler.LambdaLR``."""
from __future__ import annotations

import math


def lr_multiplier(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
