"""Learning-rate schedules as multipliers for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math
from collections.abc import Callable

DECAYS = ("constant", "linear", "cosine", "exponential")


def warmup_decay(warmup_steps: int, total_steps: int, decay: str = "cosine",
                 min_ratio: float = 0.0, gamma: float | None = None,
                 every: int = 1) -> Callable[[int], float]:
    """Linear warm-up from 0 to 1 over ``warmup_steps``, then a decay.

    ``constant``, ``linear`` and ``cosine`` decay to ``min_ratio`` at ``total_steps``.
    ``exponential`` is ``torch.optim.lr_scheduler.ExponentialLR`` after the warm-up: the
    multiplier is ``gamma ** k`` once ``k * every`` steps have passed since the warm-up ended
    (``every`` = the steps of one epoch reproduces a per-epoch ExponentialLR, as HiFi-GAN and
    the released LAFMA configs step it); it ignores ``total_steps`` and never stops decaying.

    Args:
        warmup_steps: steps of linear warm-up (0: none).
        total_steps: the step at which ``linear``/``cosine`` reach ``min_ratio``.
        decay: one of :data:`DECAYS`.
        min_ratio: the floor every decay tends to (``exponential``: ``min_ratio + (1 -
            min_ratio) * gamma ** k``).
        gamma: the factor per ``every`` steps, in (0, 1); ``exponential`` only, and required there.
        every: steps per factor of ``gamma`` (>= 1).

    Returns:
        ``f(step) -> multiplier`` of the base learning rate.
    """
    if decay not in DECAYS:
        raise ValueError(f"unknown decay {decay!r} (one of {', '.join(DECAYS)})")
    if decay == "exponential" and (gamma is None or not 0.0 < gamma < 1.0):
        raise ValueError(f"exponential decay needs gamma in (0, 1), got {gamma!r}")
    if every < 1:
        raise ValueError(f"every must be >= 1 step, got {every!r}")

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        if decay == "exponential":
            shape = gamma ** ((step - warmup_steps) // every)
        elif total_steps <= warmup_steps:
            return 1.0
        else:
            progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
            shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_ratio + (1.0 - min_ratio) * shape

    return f
