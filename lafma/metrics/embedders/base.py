"""The one interface every audio embedder implements.

An embedder maps waveforms at any sample rate to one vector per clip (and, where the
literature protocol pools frames instead, one vector per frame), and optionally to classifier
logits for KL and the inception score. It carries the name and weight hash that are logged
beside every number it produces, so a metric can never be separated from what measured it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torchaudio
from torch import Tensor, nn

HeadActivation = Literal["softmax", "sigmoid"]
Resampling = Literal["kaiser_best", "torchaudio_default"]


def resample_hq(wave: Tensor, orig_sr: int, target_sr: int) -> Tensor:
    """Kaiser-windowed sinc resampling with resampy's ``kaiser_best`` parameters. wave: (..., N).

    Two reference pipelines resample with resampy's default: audioldm_eval before VGGish, and
    librosa 0.9 in aisfx. torchaudio's default filter leaves images above the source
    Nyquist at a level that log-compressed front ends see (aisfx's ``log10(1e4·x + 1)`` turns
    them into visible bands in otherwise empty octaves); with these settings a 16 kHz clip
    upsampled to 44.1 kHz embeds as the same clip rendered at 44.1 kHz (cosine > 0.999).
    """
    if orig_sr == target_sr:
        return wave
    return torchaudio.functional.resample(
        wave, orig_sr, target_sr, lowpass_filter_width=64, rolloff=0.9475937167399596,
        resampling_method="sinc_interp_kaiser", beta=14.769656459379492)


class AudioEmbedder(nn.Module):
    """Base class: waveforms → embeddings (and logits).

    Subclasses set the attributes below and implement :meth:`frame_embeddings` (and
    :meth:`classify` when they have a classifier head).

    Attributes:
        name: what measured the numbers, logged with them (``aisfx-0.1.2``, ``panns-cnn14-16k``).
        sample_rate: the rate the network expects; inputs are resampled to it.
        dim: embedding width ``D``.
        num_classes: width ``K`` of :meth:`classify`'s logits, 0 without a head.
        head_activation: how the head was trained: ``softmax`` (one class per clip) or
            ``sigmoid`` (multi-label, as PANNs on AudioSet); ``None`` without a head.
        fd_unit: which vectors the literature's Fréchet distance pools: ``clip`` (one per
            clip; PANNs FD) or ``frame`` (every frame of every clip; VGGish FAD).
        resampling: how inputs at another rate are resampled: ``kaiser_best`` (resampy's
            default, :func:`resample_hq`) or ``torchaudio_default``, whichever the reference
            pipeline of the embedder used.
        weights_sha256: SHA-256 of the weight file the embedder was loaded from.
    """

    name: str
    sample_rate: int
    dim: int
    num_classes: int = 0
    head_activation: HeadActivation | None = None
    fd_unit: Literal["clip", "frame"] = "clip"
    resampling: Resampling = "kaiser_best"
    weights_sha256: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def prepare(self, wave: Tensor, sample_rate: int | None = None) -> Tensor:
        """(B, N) or (N,) at ``sample_rate`` → (B, N') float32 at :attr:`sample_rate`, on device."""
        x = torch.as_tensor(wave, dtype=torch.float32)
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.dim() != 2:
            raise ValueError(f"{self.name}: expected waveforms (B, N) or (N,), got shape {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError(f"{self.name}: empty waveform")
        if not torch.isfinite(x).all():
            raise ValueError(f"{self.name}: waveform contains NaN or Inf")
        sr = self.sample_rate if sample_rate is None else int(sample_rate)
        if sr <= 0:
            raise ValueError(f"{self.name}: sample rate must be positive, got {sr}")
        x = x.to(self.device)
        if self.resampling == "torchaudio_default":
            return torchaudio.functional.resample(x, sr, self.sample_rate) if sr != self.sample_rate else x
        return resample_hq(x, sr, self.sample_rate)

    def frame_embeddings(self, wave: Tensor, sample_rate: int | None = None) -> Tensor:
        """Per-frame embeddings ``(B, F, D)`` (``F`` = 1 for clip-level networks)."""
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, wave: Tensor, sample_rate: int | None = None) -> Tensor:
        """Clip embeddings ``(B, D)``: the mean of :meth:`frame_embeddings` over frames."""
        return self.frame_embeddings(wave, sample_rate).mean(dim=1)

    @torch.no_grad()
    def fd_features(self, wave: Tensor, sample_rate: int | None = None) -> Tensor:
        """The rows the literature's Fréchet distance is computed over: ``(M, D)``.

        ``M = B`` for ``fd_unit == "clip"``; ``M = B * F`` (every frame) for ``"frame"``.
        """
        if self.fd_unit == "frame":
            frames = self.frame_embeddings(wave, sample_rate)
            return frames.reshape(-1, frames.shape[-1])  # (B, F, D) -> (B*F, D)
        return self.embed(wave, sample_rate)

    def classify(self, wave: Tensor, sample_rate: int | None = None) -> Tensor:
        """Classifier logits ``(B, K)``; see :attr:`head_activation` for how to read them."""
        raise NotImplementedError(f"{self.name} has no classifier head")

    def embed_and_classify(self, wave: Tensor, sample_rate: int | None = None) -> tuple[Tensor, Tensor]:
        """``(embed(wave), classify(wave))``; networks that share one forward pass override it."""
        return self.embed(wave, sample_rate), self.classify(wave, sample_rate)

    def describe(self) -> dict[str, str | int]:
        """What to log beside every metric this embedder produced."""
        return {"embedder": self.name, "embedder_sha256": self.weights_sha256,
                "embedder_dim": self.dim, "embedder_classes": self.num_classes}
