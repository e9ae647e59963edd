"""Training objectives that are more than one library call."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lafma.flow import OTPath, drop_condition, flow_matching_loss, sample_times


def lfm_loss(unet: nn.Module, latents: Tensor, context: Tensor, mask: Tensor, *, path: OTPath,
             null_context: Tensor, null_mask: Tensor, cond_dropout: float, t_sampling: str = "uniform",
             t_mean: float = 0.0, t_std: float = 1.0,
             generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
    """The LFM objective with condition dropout (for classifier-free guidance).

    Args:
        unet: velocity model u(x, t, context, context_mask).
        latents: scaled VAE latents x1, (B, C, T', F').
        context, mask: caption embeddings (B, L, D) and mask (B, L).
        path: the OT path (σ_min).
        null_context, null_mask: the empty caption's embedding, what dropped items see.
        cond_dropout: probability of dropping an item's caption.
        t_sampling, t_mean, t_std: how training times are drawn (:func:`lafma.flow.sample_times`).

    Returns:
        ``(loss, logs)`` with the fraction of dropped captions in ``logs``.
    """
    context, mask, dropped = drop_condition(context, mask, null_context, null_mask, cond_dropout, generator)
    t = sample_times(latents.shape[0], t_sampling, mean=t_mean, std=t_std, device=latents.device,
                     generator=generator)
    loss = flow_matching_loss(unet, latents, path, t=t, generator=generator, context=context, context_mask=mask)
    return loss, {"cond_dropped": float(dropped.float().mean())}
