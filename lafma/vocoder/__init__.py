"""Vocoders (log-mel → waveform): HiFi-GAN, its discriminators and losses, and Griffin-Lim."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from torch import Tensor

from lafma.config import HiFiGANConfig, MelConfig
from lafma.vocoder.discriminators import (
    HiFiGANDiscriminator,
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
)
from lafma.vocoder.griffinlim import GriffinLimVocoder
from lafma.vocoder.hifigan import HiFiGANGenerator
from lafma.vocoder.losses import (
    discriminator_loss,
    discriminator_losses,
    feature_matching_loss,
    generator_adversarial_loss,
    generator_losses,
    loss_weights,
    mel_l1_loss,
)


@runtime_checkable
class Vocoder(Protocol):
    """Anything that turns a log-mel (B, n_mels, T) into a waveform (B, T * hop)."""

    hop: int

    def __call__(self, mel: Tensor) -> Tensor: ...


def _hifigan(mel: MelConfig, hifigan: HiFiGANConfig | None, n_iter: int) -> Vocoder:
    cfg = hifigan or HiFiGANConfig()
    if cfg.hop != mel.hop_length:
        raise ValueError(f"HiFi-GAN upsamples by {cfg.hop}, but the mel hop is {mel.hop_length}")
    return HiFiGANGenerator.from_config(cfg, n_mels=mel.n_mels)


def _griffinlim(mel: MelConfig, hifigan: HiFiGANConfig | None, n_iter: int) -> Vocoder:
    return GriffinLimVocoder.from_config(mel, n_iter=n_iter)


# Explicit name → builder table: no import-by-string.
VOCODERS: dict[str, Callable[[MelConfig, HiFiGANConfig | None, int], Vocoder]] = {
    "hifigan": _hifigan,
    "griffinlim": _griffinlim,
}


def vocoder_by_kind(kind: str, *, mel: MelConfig, hifigan: HiFiGANConfig | None = None,
                  n_iter: int = 32) -> Vocoder:
    """Build an (untrained, for HiFi-GAN) vocoder by name.

    Args:
        kind: A key of :data:`VOCODERS` (``"hifigan"`` or ``"griffinlim"``).
        mel: The mel definition the vocoder must invert.
        hifigan: Generator settings (HiFi-GAN only); defaults to the paper's.
        n_iter: Griffin-Lim iterations (Griffin-Lim only).

    Raises:
        ValueError: Unknown ``kind``, or a HiFi-GAN whose upsampling is not the mel hop.
    """
    if kind not in VOCODERS:
        raise ValueError(f"unknown vocoder {kind!r}; choose one of {sorted(VOCODERS)}")
    return VOCODERS[kind](mel, hifigan, n_iter)


__all__ = [
    "VOCODERS",
    "GriffinLimVocoder",
    "HiFiGANDiscriminator",
    "HiFiGANGenerator",
    "MultiPeriodDiscriminator",
    "MultiScaleDiscriminator",
    "Vocoder",
    "vocoder_by_kind",
    "discriminator_loss",
    "discriminator_losses",
    "feature_matching_loss",
    "generator_adversarial_loss",
    "generator_losses",
    "loss_weights",
    "mel_l1_loss",
]
