"""HiFi-GAN losses: LSGAN adversarial terms, feature matching and mel L1.

Each term is an unweighted scalar; :func:`generator_losses` and :func:`discriminator_losses`
return them in a dict keyed like descript-audio-codec (``"mel/l1"``, ``"adv/gen"``,
``"adv/feat"``, ``"adv/disc"``) so they can be logged as-is, and
:func:`lafma.train.losses.weighted_sum` (shared with the VAE) applies the lambdas that
:func:`loss_weights` reads from :class:`HiFiGANLossConfig`.

Padding: a clip shorter than ``audio.clip_seconds`` is zero-padded. Given each item's
``valid_samples``, the generated waveform past them is replaced by the real one (zeros)
before the discriminators and the mel see it (:func:`lafma.train.objectives.fill_padding`),
so the padding is no target of any term and no gradient reaches it, and the mel L1 counts
only the frames of real audio. A frame at the boundary reaches into the padding with its
window: the real mel there was made from the zero-padded waveform too, so the filled fake is
compared like with like.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lafma.config import HiFiGANLossConfig
from lafma.train.objectives import fill_padding, masked_mean, valid_frames, valid_mask


def feature_matching_loss(fmaps_real: Sequence[Sequence[Tensor]],
                          fmaps_fake: Sequence[Sequence[Tensor]]) -> Tensor:
    """Sum over discriminators and layers of mean |real - fake| activations.

    Args:
        fmaps_real: Per discriminator, its layer activations on real audio (targets; detached).
        fmaps_fake: The same on generated audio.

    Returns:
        Scalar loss.
    """
    terms = [torch.mean(torch.abs(r.detach() - f))
             for d_real, d_fake in zip(fmaps_real, fmaps_fake, strict=True)
             for r, f in zip(d_real, d_fake, strict=True)]
    return torch.stack(terms).sum()


def discriminator_loss(real_logits: Sequence[Tensor], fake_logits: Sequence[Tensor]) -> Tensor:
    """LSGAN discriminator loss, summed over discriminators: mean((1 - r)^2) + mean(f^2).

    Args:
        real_logits: Per discriminator, (B, L_i) logits on real audio.
        fake_logits: The same on generated audio (detach the generator before calling).

    Returns:
        Scalar loss; 0 for a perfect discriminator (real → 1, fake → 0).
    """
    terms = [torch.mean((1 - r) ** 2) + torch.mean(f ** 2)
             for r, f in zip(real_logits, fake_logits, strict=True)]
    return torch.stack(terms).sum()


def generator_adversarial_loss(fake_logits: Sequence[Tensor]) -> Tensor:
    """LSGAN generator loss, summed over discriminators: mean((1 - f)^2).

    Args:
        fake_logits: Per discriminator, (B, L_i) logits on generated audio.

    Returns:
        Scalar loss.
    """
    return torch.stack([torch.mean((1 - f) ** 2) for f in fake_logits]).sum()


def mel_l1_loss(mel_fn: Callable[[Tensor], Tensor], wav_fake: Tensor, mel_real: Tensor,
                mask: Tensor | None = None) -> Tensor:
    """Mean absolute log-mel error of the generated waveform.

    Args:
        mel_fn: Waveform (B, N) → log-mel (B, n_mels, N // hop), e.g. ``MelSpectrogram``.
        wav_fake: (B, N) generated waveform.
        mel_real: (B, n_mels, N // hop) target log-mel (the generator's input).
        mask: (B, N // hop) bool, True on the frames of real audio: the mean runs over those
            only. None: every frame.

    Returns:
        Scalar loss.
    """
    if mask is None:
        return F.l1_loss(mel_fn(wav_fake), mel_real)
    return masked_mean((mel_fn(wav_fake) - mel_real).abs(), mask[:, None, :])  # (B, T) -> (B, 1, T)


def _sample_mask(wav: Tensor, valid_samples: Tensor | None) -> Tensor | None:
    """(B, N) bool, True on each item's first ``valid_samples`` samples; None without them."""
    return None if valid_samples is None else valid_mask(valid_samples.to(wav.device), wav.shape[-1])


def generator_losses(disc: nn.Module, mel_fn: Callable[[Tensor], Tensor], wav_real: Tensor,
                     wav_fake: Tensor, mel_real: Tensor, valid_samples: Tensor | None = None) -> dict[str, Tensor]:
    """The generator step's unweighted terms.

    Args:
        disc: Waveform (B, N) → (logits list, feature-map lists), e.g. ``HiFiGANDiscriminator``.
            Freeze it (``requires_grad_(False)``) around the generator step.
        mel_fn: Waveform → log-mel, the same one that made ``mel_real``.
        wav_real: (B, N) ground-truth waveform.
        wav_fake: (B, N) generator output (not detached).
        mel_real: (B, n_mels, N // hop) log-mel of ``wav_real``.
        valid_samples: (B,) real samples per item, the rest zero padding (see the module's
            docstring); None: every sample is real.

    Returns:
        ``{"mel/l1", "adv/gen", "adv/feat"}`` scalars.
    """
    frames = None
    if valid_samples is not None:  # N = T · hop: the mel has one frame per hop samples
        t = mel_real.shape[-1]
        frames = valid_mask(valid_frames(valid_samples, wav_real.shape[-1] // t, t).to(mel_real.device), t)
    wav_fake = fill_padding(wav_fake, wav_real, _sample_mask(wav_real, valid_samples))  # (B, N)
    with torch.no_grad():  # real activations are fixed targets
        _, fmaps_real = disc(wav_real)
    fake_logits, fmaps_fake = disc(wav_fake)
    return {
        "mel/l1": mel_l1_loss(mel_fn, wav_fake, mel_real, frames),
        "adv/gen": generator_adversarial_loss(fake_logits),
        "adv/feat": feature_matching_loss(fmaps_real, fmaps_fake),
    }


def discriminator_losses(disc: nn.Module, wav_real: Tensor, wav_fake: Tensor,
                         valid_samples: Tensor | None = None) -> dict[str, Tensor]:
    """The discriminator step's loss; ``wav_fake`` is detached here.

    Args:
        disc: Waveform (B, N) → (logits list, feature-map lists).
        wav_real: (B, N) ground-truth waveform.
        wav_fake: (B, N) generator output.
        valid_samples: (B,) real samples per item: past them the fake is the real padding, so
            the discriminators learn nothing from it. None: every sample is real.

    Returns:
        ``{"adv/disc"}`` scalar.
    """
    wav_fake = fill_padding(wav_fake, wav_real, _sample_mask(wav_real, valid_samples))  # (B, N)
    real_logits, _ = disc(wav_real)
    fake_logits, _ = disc(wav_fake.detach())
    return {"adv/disc": discriminator_loss(real_logits, fake_logits)}


def loss_weights(cfg: HiFiGANLossConfig) -> dict[str, float]:
    """Lambdas for :func:`lafma.train.losses.weighted_sum`, keyed like the loss dicts (one dict
    serves both steps)."""
    return {"mel/l1": cfg.lambda_mel, "adv/feat": cfg.lambda_feat, "adv/gen": cfg.lambda_adv,
            "adv/disc": 1.0}
