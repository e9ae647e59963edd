"""The log-mel spectrogram of the design, shared by preprocessing, the VAE and the vocoder."""

from __future__ import annotations

import torch
import torchaudio
from torch import Tensor, nn

from lafma.config import MelConfig


class MelSpectrogram(nn.Module):
    """Waveform → log-mel, the HiFi-GAN / AudioLDM convention.

    The signal is reflect-padded by ``(n_fft - hop) / 2`` on each side and the STFT is taken
    without centring, so ``N`` samples give exactly ``N // hop`` frames (163 840 → 1024) and
    frame ``k`` is centred on sample ``k * hop + hop / 2``. Magnitude (not power) goes through
    a slaney-scale, slaney-normalised filterbank and then ``log(clamp(x, clamp_min))``.

    Args:
        sample_rate, n_fft, win_length, hop_length, n_mels, f_min, f_max, clamp_min: as in
            :class:`lafma.config.MelConfig`.
    """

    def __init__(self, *, sample_rate: int = 16000, n_fft: int = 1024, win_length: int = 1024,
                 hop_length: int = 160, n_mels: int = 64, f_min: float = 0.0, f_max: float = 8000.0,
                 clamp_min: float = 1e-5):
        super().__init__()
        self.hop_length = hop_length
        self.pad = (n_fft - hop_length) // 2
        self.clamp_min = clamp_min
        # torchaudio owns the STFT and the filterbank; we only own the padding convention.
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, win_length=win_length, hop_length=hop_length,
            f_min=f_min, f_max=f_max, n_mels=n_mels, power=1.0, center=False,
            norm="slaney", mel_scale="slaney",
        )

    @classmethod
    def from_config(cls, cfg: MelConfig) -> MelSpectrogram:
        return cls(sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length,
                   hop_length=cfg.hop_length, n_mels=cfg.n_mels, f_min=cfg.f_min, f_max=cfg.f_max,
                   clamp_min=cfg.clamp_min)

    def forward(self, wav: Tensor) -> Tensor:
        """wav: (B, N) or (N,) float → log-mel (B, n_mels, N // hop) or (n_mels, N // hop)."""
        squeeze = wav.dim() == 1
        x = wav.unsqueeze(0) if squeeze else wav
        x = torch.nn.functional.pad(x.unsqueeze(1), (self.pad, self.pad), mode="reflect").squeeze(1)
        mel = self.mel(x.float())  # (B, n_mels, frames)
        frames = wav.shape[-1] // self.hop_length
        mel = torch.log(torch.clamp(mel[..., :frames], min=self.clamp_min))
        return mel.squeeze(0) if squeeze else mel
