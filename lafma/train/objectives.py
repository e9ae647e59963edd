"""Training objectives that are more than one library call, and the padding masks they share.

Clips shorter than ``audio.clip_seconds`` are zero-padded, and a padded clip's log-mel is the
log floor there. A loss that counts those frames teaches the model the padding, as if it were
silence that belongs to the clip; the helpers below let the VAE, vocoder and LFM losses count
only the frames that hold the clip. Each reduces to the unmasked loss, bit for bit, when
nothing is padded.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from lafma.flow import OTPath, drop_condition, flow_matching_loss, sample_times


def valid_frames(valid: Tensor | np.ndarray | int, hop: int, frames: int) -> Tensor:
    """Frames of ``hop`` units that hold any real content: ceil(valid / hop), clamped to [0, frames].

    Mel frame k covers samples [k·hop, (k+1)·hop) (:class:`lafma.audio.MelSpectrogram` centres
    it on k·hop + hop/2), so a frame with at least one real sample counts as real. The same
    rule turns valid mel frames into valid latent frames, with ``hop`` the VAE's downsampling r.

    Args:
        valid: (B,) real samples (or mel frames) per clip, or one count.
        hop: units per frame (``mel.hop_length``; or r for latent frames).
        frames: the clip's frames (the count is clamped to it).

    Returns:
        (B,) int64 (0-dim for one count).
    """
    valid = torch.as_tensor(valid, dtype=torch.long)
    return torch.clamp((valid + hop - 1) // hop, 0, frames)


def valid_mask(valid: Tensor, frames: int) -> Tensor:
    """(B,) valid counts → (B, frames) bool, True on the first ``valid[i]`` frames of item i."""
    return torch.arange(frames, device=valid.device) < valid[:, None]


def _scale(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` with its masked-out elements zeroed, and numel / kept (exactly 1 without padding)."""
    mask = mask.expand_as(x)
    # ``where``, not a product: a NaN or Inf in the padding must not leak into the sum.
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)), \
        x.numel() / mask.sum().clamp_min(1)


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """The mean of ``x`` over the elements where ``mask`` is True; ``x.mean()`` itself when
    nothing is masked out (the padded-out mean is rescaled by numel / kept, which is then 1).

    Args:
        x: any shape.
        mask: bool, broadcastable to ``x`` (e.g. (B, 1, T) for (B, n_mels, T)); None: all.
    """
    if mask is None:
        return x.mean()
    kept, scale = _scale(x, mask)
    return kept.mean() * scale


def masked_sum(x: Tensor, mask: Tensor | None) -> Tensor:
    """Σ x over the elements where ``mask`` is True, times numel / kept: the sum ``x`` would have
    if every element were like the kept ones on average, so a loss defined as a sum keeps its
    scale (and is ``x.sum()`` itself without padding).

    Args:
        x: any shape.
        mask: bool, broadcastable to ``x``; None: all.
    """
    if mask is None:
        return x.sum()
    kept, scale = _scale(x, mask)
    return kept.sum() * scale


def fill_padding(fake: Tensor, real: Tensor, mask: Tensor | None) -> Tensor:
    """``fake`` where ``mask`` is True, ``real`` elsewhere.

    What a discriminator sees of a generated clip: on the padding the fake then equals the real
    input, so nothing there tells them apart and no gradient reaches the generator's padding.

    Args:
        fake: generator output (B, …), with its graph.
        real: the real input, like ``fake``.
        mask: bool, broadcastable to ``fake``; None: ``fake`` as it is.
    """
    return fake if mask is None else torch.where(mask, fake, real.to(fake.dtype))


def lfm_loss(unet: nn.Module, latents: Tensor, context: Tensor, mask: Tensor, *, path: OTPath,
             null_context: Tensor, null_mask: Tensor, cond_dropout: float, t_sampling: str = "uniform",
             t_mean: float = 0.0, t_std: float = 1.0, generator: torch.Generator | None = None,
             frame_mask: Tensor | None = None, duration: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """The LFM objective with condition dropout (for classifier-free guidance).

    Args:
        unet: velocity model u(x, t, context, context_mask).
        latents: scaled VAE latents x1, (B, C, T', F').
        context, mask: caption embeddings (B, L, D) and mask (B, L).
        path: the OT path (σ_min).
        null_context, null_mask: the empty caption's embedding, what dropped items see.
        cond_dropout: probability of dropping an item's caption.
        t_sampling, t_mean, t_std: how training times are drawn (:func:`lafma.flow.sample_times`).
        frame_mask: (B, T') bool, True on the latent frames of real audio: the squared error is
            averaged over those only (the padding of short clips is no target). None: all frames.
        duration: (B,) seconds each latent holds, passed to a UNet conditioned on duration
            (:mod:`lafma.train.duration`); None for one without.

    Returns:
        ``(loss, logs)`` with the fraction of dropped captions in ``logs``.
    """
    context, mask, dropped = drop_condition(context, mask, null_context, null_mask, cond_dropout, generator)
    t = sample_times(latents.shape[0], t_sampling, mean=t_mean, std=t_std, device=latents.device,
                     generator=generator)
    cond = {"context": context, "context_mask": mask, **({} if duration is None else {"duration": duration})}
    if frame_mask is None:
        loss = flow_matching_loss(unet, latents, path, t=t, generator=generator, **cond)
    else:
        err = flow_matching_loss(unet, latents, path, t=t, generator=generator, reduction="none", **cond)
        loss = masked_mean(err, frame_mask[:, None, :, None])  # (B, T') -> (B, 1, T', 1) over (B, C, T', F')
    return loss, {"cond_dropped": float(dropped.float().mean())}
