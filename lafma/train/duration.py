"""Variable-duration training: each batch cut to a length drawn from the seed and the step.

A UNet conditioned on duration (:class:`lafma.unet.UNet` with ``duration_embedding``) must see
clips of every length it will be asked for. The latents table holds clips of one length, so the
LFM job cuts each batch to a crop of ``length`` latent frames, drawn uniformly from 1 to the
clip's full length, and tells the UNet that duration. The UNet halves the time axis
``downsample`` times, so the crop lies on a grid rounded up to a multiple of that: the frames
past ``length`` are zeros and masked out of the loss, exactly the frames that inference
generates past a requested duration and cuts off (:meth:`lafma.pipeline.LafmaPipeline.latent_shape`).
Where the job masks the padding of short clips (``train_lfm.mask_padding``), a clip whose real
audio ends inside the crop is zeros and masked from there on too, and its duration is what it
holds: the model learns it as the shorter clip it is.

The draw depends on nothing but the seed and the step (not on the global RNG), so a run and its
resumption cut every step's batch alike, and another run with the same seed does too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Crop:
    """One batch's cut.

    Attributes:
        length: latent frames of the clip kept, in [1, frames].
        grid: latent frames the UNet sees: ``length`` rounded up to its downsampling.
        starts: (B,) int64, the first frame of each item's crop; start + grid <= frames.
    """

    length: int
    grid: int
    starts: Tensor


def draw_crop(seed: int, step: int, batch: int, frames: int, multiple: int,
              valid: Tensor | None = None) -> Crop:
    """The crop of step ``step``'s batch, drawn from ``(seed, step)`` alone.

    Args:
        seed, step: the job's seed and the step the batch trains (>= 0).
        batch: items in the batch.
        frames: the clips' latent frames T' (a multiple of ``multiple``).
        multiple: the UNet's downsample factor; the grid is a multiple of it.
        valid: (B,) latent frames of real audio per clip (the rest is padding), or None: all.
            Each crop starts inside the real audio where the clip is long enough to hold it,
            at 0 where it is not.

    Returns:
        The :class:`Crop`: ``length`` uniform in [1, frames]; each start uniform among those
        that keep the crop inside the clip's real audio and the grid inside the clip.
    """
    if frames < 1 or frames % multiple:
        raise ValueError(f"{frames} latent frames are not a positive multiple of the UNet's {multiple}")
    rng = np.random.default_rng([seed & (2**64 - 1), step])
    length = int(rng.integers(1, frames + 1))
    grid = math.ceil(length / multiple) * multiple
    real = np.full(batch, frames) if valid is None else np.clip(np.asarray(valid, dtype=np.int64), 0, frames)
    last = np.minimum(np.maximum(real - length, 0), frames - grid)  # (B,) the latest start that fits
    starts = rng.integers(0, last + 1)  # (B,) uniform in [0, last]
    return Crop(length, grid, torch.as_tensor(starts, dtype=torch.long))


def crop_latents(x1: Tensor, crop: Crop, frame_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Cut latents to ``crop``: each item's crop, zeros on the frames the loss does not count,
    and the mask of those it counts.

    Args:
        x1: (B, C, T', F') latents.
        crop: from :func:`draw_crop`.
        frame_mask: (B, T') bool, True on frames of real audio, or None: all real.

    Returns:
        ``(x1, mask)``: (B, C, grid, F') latents and (B, grid) bool, True on the frames within
        ``crop.length`` that hold real audio. Every other frame is zeros: what lay outside the
        crop or past a clip's real audio reaches neither the UNet nor the loss.
    """
    b, c, _, f = x1.shape
    idx = crop.starts.to(x1.device)[:, None] + torch.arange(crop.grid, device=x1.device)  # (B, grid)
    out = x1.gather(2, idx[:, None, :, None].expand(b, c, crop.grid, f))  # (B, C, grid, F')
    mask = (torch.arange(crop.grid, device=x1.device) < crop.length).expand(b, -1)  # (B, grid)
    if frame_mask is not None:
        mask = mask & frame_mask.to(x1.device).gather(1, idx)
    out = torch.where(mask[:, None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out, mask


def mask_seconds(mask: Tensor, latent_seconds: float) -> Tensor:
    """(B, grid) mask of :func:`crop_latents` → (B,) float32 seconds each item holds: what the
    UNet is told. The crop's length, or less for a clip whose real audio ends inside it (with
    its padding masked, the model learns the clip as long as what it is trained on)."""
    return mask.sum(dim=1).float() * latent_seconds
