"""Classifier-free guidance as a wrapper around any conditional velocity model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lafma.flow.loss import pad_tokens


class ClassifierFreeGuidance:
    """u = w·u(x, t, c) + (1 − w)·u(x, t, ∅), with ∅ the empty-caption embedding.

    Conditional and unconditional inputs go through the model as one doubled batch, so one
    call costs two function evaluations; ``evals_per_call`` tells solvers so.

    Args:
        velocity: u(x, t, context=(B, L, D), context_mask=(B, L)) → like x.
        scale: guidance weight w (1 = purely conditional, 0 = unconditional).
        null_context: (L0, D) or (1, L0, D) empty-caption embedding, or (B, L0, D) one per item
            (the released sampler pads the empty caption to each caption's length);
            null_mask: (L0,), (1, L0) or (B, L0) to match.

    Conditioning other than the caption (e.g. ``duration`` (B,) for a UNet conditioned on it)
    passes through as keyword tensors with the batch first, the same in both halves: guidance
    contrasts the caption with the empty one, nothing else.
    """

    evals_per_call = 2

    def __init__(self, velocity: Callable[..., Tensor], scale: float, null_context: Tensor, null_mask: Tensor):
        self.velocity = velocity
        self.scale = scale
        if null_context.dim() == 2:
            null_context, null_mask = null_context[None], null_mask.reshape(1, -1)  # (1, L0, D), (1, L0)
        self.null_context = null_context
        self.null_mask = null_mask.bool()

    def __call__(self, x: Tensor, t: Tensor, *, context: Tensor, context_mask: Tensor, **extra: Tensor) -> Tensor:
        b = x.shape[0]
        length = max(context.shape[1], self.null_context.shape[1])
        cond, cond_mask = pad_tokens(context, context_mask.bool(), length)
        null, null_mask = pad_tokens(self.null_context.to(context), self.null_mask.to(context.device), length)
        ctx = torch.cat([cond, null.expand(b, -1, -1)])  # (2B, L, D); a (1, L, D) null is shared
        msk = torch.cat([cond_mask, null_mask.expand(b, -1)])  # (2B, L)
        extra = {k: torch.cat([e, e]) for k, e in extra.items()}  # (B, ...) -> (2B, ...)
        v = self.velocity(torch.cat([x, x]), torch.cat([t, t]), context=ctx, context_mask=msk, **extra)
        v_cond, v_uncond = v.chunk(2)
        return self.scale * v_cond + (1.0 - self.scale) * v_uncond
