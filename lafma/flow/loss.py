"""The flow-matching objective and condition dropout (for classifier-free guidance)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lafma.flow.path import OTPath


def flow_matching_loss(velocity: Callable[..., Tensor], x1: Tensor, path: OTPath, *,
                       t: Tensor | None = None, x0: Tensor | None = None,
                       generator: torch.Generator | None = None, **cond: Tensor) -> Tensor:
    """E_{t, x0} ‖u_θ(x_t, t, c) − (x1 − (1 − σ_min) x0)‖², averaged over elements.

    Args:
        velocity: u_θ(x, t, **cond) → (B, …).
        x1: data latents, (B, …).
        path: the probability path.
        t: optional times (B,); drawn from U[0, 1] when omitted.
        x0: optional noise like ``x1``; drawn from N(0, I) when omitted.
        generator: RNG for t and x0.
        **cond: conditioning passed through to ``velocity`` (e.g. ``context``, ``context_mask``).

    Returns:
        Scalar loss.
    """
    b = x1.shape[0]
    if t is None:
        t = torch.rand(b, device=x1.device, generator=generator)
    if x0 is None:
        x0 = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
    x_t, target = path.sample(x0, x1, t)
    return torch.mean((velocity(x_t, t, **cond) - target) ** 2)


def pad_tokens(emb: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Right-pad token embeddings (B, L, D) and mask (B, L) to ``length`` tokens."""
    extra = length - emb.shape[1]
    if extra <= 0:
        return emb, mask
    emb = torch.nn.functional.pad(emb, (0, 0, 0, extra))
    mask = torch.nn.functional.pad(mask, (0, extra), value=False)
    return emb, mask


def drop_condition(context: Tensor, mask: Tensor, null_context: Tensor, null_mask: Tensor, p: float,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Replace each item's caption by the empty caption with probability ``p``.

    The empty-caption embedding (not zeros) is what the model sees at sampling time as the
    unconditional input, so training must drop to exactly that.

    Args:
        context: (B, L, D) caption embeddings; mask: (B, L) bool.
        null_context: (1, L0, D) or (L0, D) empty-caption embedding; null_mask: (1, L0) or (L0,).
        p: drop probability.

    Returns:
        ``(context, mask, dropped)`` with context (B, max(L, L0), D), mask likewise, dropped (B,) bool.
    """
    b = context.shape[0]
    null_context = null_context.reshape(1, -1, context.shape[-1])  # (1, L0, D)
    null_mask = null_mask.reshape(1, -1).bool()  # (1, L0)
    length = max(context.shape[1], null_context.shape[1])
    context, mask = pad_tokens(context, mask.bool(), length)
    null_context, null_mask = pad_tokens(null_context.to(context), null_mask.to(mask.device), length)
    dropped = torch.rand(b, device=context.device, generator=generator) < p
    context = torch.where(dropped[:, None, None], null_context, context)
    mask = torch.where(dropped[:, None], null_mask, mask)
    return context, mask, dropped
