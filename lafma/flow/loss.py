"""The flow-matching objective and condition dropout (for classifier-free guidance)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor

from lafma.flow.path import OTPath


def sample_times(n: int, kind: str = "uniform", *, mean: float = 0.0, std: float = 1.0,
                 device: torch.device | str | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Training times t ∈ (0, 1), (n,).

    ``uniform``: U[0, 1] (LAFMA, Lipman et al.). ``logit_normal``: sigmoid(N(mean, std²)), SD3's
    and ETTA's choice, which spends the updates on the middle of the path, where the velocity
    is hardest to predict, and few on its ends (mean 0: symmetric, so it reads the same whether
    t = 0 is noise or data).
    """
    if kind == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))
    raise ValueError(f"unknown time sampling {kind!r}: uniform or logit_normal")


def flow_matching_loss(velocity: Callable[..., Tensor], x1: Tensor, path: OTPath, *,
                       t: Tensor | None = None, x0: Tensor | None = None,
                       generator: torch.Generator | None = None, reduction: Literal["mean", "none"] = "mean",
                       **cond: Tensor) -> Tensor:
    """E_{t, x0} ‖u_θ(x_t, t, c) − (x1 − (1 − σ_min) x0)‖², averaged over elements.

    Args:
        velocity: u_θ(x, t, **cond) → (B, …).
        x1: data latents, (B, …).
        path: the probability path.
        t: optional times (B,); drawn from U[0, 1] when omitted.
        x0: optional noise like ``x1``; drawn from N(0, I) when omitted.
        generator: RNG for t and x0.
        reduction: ``mean``, or ``none`` for the squared error of every element, (B, …), which a
            caller averages its own way (e.g. over the latent frames of real audio only).
        **cond: conditioning passed through to ``velocity`` (e.g. ``context``, ``context_mask``).

    Returns:
        Scalar loss, or (B, …) with ``reduction="none"``.
    """
    b = x1.shape[0]
    if t is None:
        t = torch.rand(b, device=x1.device, generator=generator)
    if x0 is None:
        x0 = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
    x_t, target = path.sample(x0, x1, t)
    err = (velocity(x_t, t, **cond) - target) ** 2  # (B, …)
    return err if reduction == "none" else torch.mean(err)


# Seeds of the held-out noise: time bin k of the batch whose first item has offset ``start``
# draws its noise from ``Generator(HELDOUT_SEED_STRIDE * k + start)``. A prime larger than
# any held-out set keeps every (k, start) pair on its own seed.
HELDOUT_SEED_STRIDE = 1_000_003


@torch.no_grad()
def heldout_fm_loss(velocity: Callable[..., Tensor], batches: Iterable[tuple[Tensor, Mapping[str, Tensor]]],
                    path: OTPath, *, times: int, frame_masks: Iterable[Tensor | None] | None = None) -> float:
    """The flow-matching loss with its randomness fixed, so two models scored on the same
    batches see exactly the same problems and differ only by their weights.

    Every item is scored at the midpoints ``(k + 0.5) / times`` of ``times`` equal bins of
    t, with noise seeded by the time bin and the batch's offset in the stream (see
    :data:`HELDOUT_SEED_STRIDE`): the same batches always give the same value, and cutting
    them differently gives other noise.

    Args:
        velocity: u_θ(x, t, **cond) → (B, …).
        batches: ``(x1 (B, …), cond)`` in a fixed order; ``cond`` is passed to ``velocity``
            (e.g. ``context`` (B, L, D), ``context_mask`` (B, L)).
        path: the probability path.
        times: number of t bins.
        frame_masks: per batch, (B, T) bool over the latents' time axis (dim 2), True on frames
            of real audio, or None; an item's error is then averaged over its real frames (the
            padding of a short clip is no target, as in training).

    Returns:
        The mean over items and times of each item's mean squared error
        ‖u_θ(x_t, t, c) − v‖² / numel(x1[i]) (over its real frames with a mask).
    """
    if times < 1:
        raise ValueError(f"times must be >= 1, got {times}")
    total, count, start = 0.0, 0, 0
    masks = iter(frame_masks) if frame_masks is not None else None
    for x1, cond in batches:
        b = x1.shape[0]
        mask = next(masks) if masks is not None else None
        if mask is not None and bool(mask.all()):
            mask = None  # nothing padded: exactly the unmasked score
        for k in range(times):
            t = torch.full((b,), (k + 0.5) / times, device=x1.device)
            g = torch.Generator().manual_seed(HELDOUT_SEED_STRIDE * k + start)
            x0 = torch.randn(x1.shape, generator=g).to(x1.device)  # drawn on the CPU: the same on any device
            if mask is None:
                # Every item of a batch has as many elements, so the batch mean is the mean of
                # the items' means: weight it by the batch size.
                total += float(flow_matching_loss(velocity, x1, path, t=t, x0=x0, **cond)) * b
            else:
                err = flow_matching_loss(velocity, x1, path, t=t, x0=x0, reduction="none", **cond)  # (B, C, T, …)
                m = mask.to(err.device).reshape(b, 1, -1, *([1] * (err.dim() - 3))).expand_as(err)
                per_item = torch.where(m, err, torch.zeros((), dtype=err.dtype, device=err.device)).flatten(1).sum(1)
                total += float((per_item / m.flatten(1).sum(1).clamp_min(1)).sum())
            count += b
        start += b
    if count == 0:
        raise ValueError("heldout_fm_loss needs at least one item")
    return total / count


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
