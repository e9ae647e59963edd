"""Learning-rate schedules as multipliers for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_decay(warmup_steps: int, total_steps: int, decay: str = "cosine",
                 min_ratio: float = 0.0) -> Callable[[int], float]:
    """Linear warm-up from 0 to 1 over ``warmup_steps``, then ``constant``, ``linear`` or
    ``cosine`` decay to ``min_ratio`` at ``total_steps``.

    Returns:
        ``f(step) -> multiplier`` of the base learning rate.
    """
    if decay not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown decay {decay!r}")

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_ratio + (1.0 - min_ratio) * shape

    return f
