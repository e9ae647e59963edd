"""PANNs Cnn14 (Kong et al., 2020) from a user-supplied checkpoint: FD, KL and IS as AudioLDM reports them.

The published 16 kHz checkpoint ``Cnn14_16k_mAP=0.438.pth`` is a dict whose ``"model"``
entry is the state dict of the network below, front end included: an STFT written as two
Conv1d kernel banks (``spectrogram_extractor.stft.conv_{real,imag}.weight``), a mel matrix
(``logmel_extractor.melW``), ``bn0``, six conv blocks, ``fc1`` and ``fc_audioset``. The
network is rebuilt here from the paper's description; only its parameter names follow the
published layout so the file loads strictly.

audioldm_eval's protocol, which this reproduces: 16 kHz input (resampled with torchaudio's
default filter), the clip's mean removed, clips shorter than 2 s zero-padded to 2 s; FD over
the 2048-d ``fc1`` output (one vector per clip); KL and IS over the 527 AudioSet logits (see
:mod:`lafma.metrics.classifier_metrics` for the softmax / sigmoid readings).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchaudio
from torch import Tensor, nn

from lafma.metrics.embedders.base import AudioEmbedder
from lafma.metrics.embedders.checkpoints import (
    CheckpointFormatError,
    load_checked,
    load_torch_file,
    require_file,
    sha256_file,
)

_AMIN = 1e-10  # power floor before the dB conversion (torchlibrosa's default)
_MIN_SECONDS = 2.0  # audioldm_eval zero-pads shorter clips to 2 s before Cnn14
CNN14_CHANNELS = (64, 128, 256, 512, 1024, 2048)


@dataclass(frozen=True)
class Cnn14Preset:
    """Front-end settings of a published Cnn14 checkpoint."""

    sample_rate: int
    window_size: int
    hop_size: int
    mel_bins: int = 64
    fmin: float = 50.0
    fmax: float = 8000.0
    classes: int = 527


PRESETS = {
    "16k": Cnn14Preset(16000, 512, 160, fmax=8000.0),  # Cnn14_16k_mAP=0.438.pth
    "32k": Cnn14Preset(32000, 1024, 320, fmax=14000.0),  # Cnn14_mAP=0.431.pth
}


class _STFT(nn.Module):
    """A Hann-windowed real DFT as two Conv1d banks (the published front end stores them)."""

    def __init__(self, n_fft: int, hop: int, init: bool = True):
        super().__init__()
        bins = n_fft // 2 + 1
        self.conv_real = nn.Conv1d(1, bins, n_fft, stride=hop, bias=False)
        self.conv_imag = nn.Conv1d(1, bins, n_fft, stride=hop, bias=False)
        if not init:
            return
        n = torch.arange(n_fft, dtype=torch.float64)
        k = torch.arange(bins, dtype=torch.float64).unsqueeze(1)
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
        angle = 2 * math.pi * k * n / n_fft  # (bins, n_fft)
        with torch.no_grad():  # correct values even before a checkpoint overwrites them
            self.conv_real.weight.copy_((torch.cos(angle) * window).unsqueeze(1))
            self.conv_imag.weight.copy_((-torch.sin(angle) * window).unsqueeze(1))


class _Spectrogram(nn.Module):
    def __init__(self, n_fft: int, hop: int, init: bool = True):
        super().__init__()
        self.n_fft = n_fft
        self.stft = _STFT(n_fft, hop, init)

    def forward(self, wave: Tensor) -> Tensor:
        """wave: (B, N) → power spectrogram (B, 1, T, n_fft // 2 + 1), centred frames."""
        x = nn.functional.pad(wave.unsqueeze(1), (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        real, imag = self.stft.conv_real(x), self.stft.conv_imag(x)  # (B, bins, T)
        return (real**2 + imag**2).transpose(1, 2).unsqueeze(1)


class _LogMel(nn.Module):
    def __init__(self, sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float,
                 init: bool = True):
        super().__init__()
        # librosa's default filterbank (Slaney scale, Slaney area norm), as PANNs used.
        fb = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, fmin, fmax, n_mels, sample_rate,
                                                   norm="slaney", mel_scale="slaney") \
            if init else torch.empty(n_fft // 2 + 1, n_mels)
        self.melW = nn.Parameter(fb, requires_grad=False)  # (bins, n_mels)

    def forward(self, power: Tensor) -> Tensor:
        """(B, 1, T, bins) → dB log-mel (B, 1, T, n_mels), ref 1.0, no top-dB clipping."""
        return 10.0 * torch.log10(torch.clamp(power @ self.melW, min=_AMIN))


class _ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor, pool: int) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return nn.functional.avg_pool2d(x, pool) if pool > 1 else x


class Cnn14(nn.Module):
    """Cnn14: log-mel → six VGG-like blocks (64…2048 channels) → 2048-d ``fc1`` → 527 logits.

    Args:
        preset: front-end settings.
        init_frontend: fill the STFT kernels and mel matrix with their analytic values
            (pointless when a checkpoint will overwrite them, impossible on ``meta``).
        channels: output widths of the six conv blocks; the last is the embedding width.
            Published checkpoints all use the default; narrower ones serve tests.
    """

    def __init__(self, preset: Cnn14Preset, init_frontend: bool = True,
                 channels: Sequence[int] = CNN14_CHANNELS):
        super().__init__()
        p = preset
        if len(channels) != 6:
            raise ValueError(f"Cnn14 has six conv blocks, got {len(channels)} widths")
        self.spectrogram_extractor = _Spectrogram(p.window_size, p.hop_size, init_frontend)
        self.logmel_extractor = _LogMel(p.sample_rate, p.window_size, p.mel_bins, p.fmin, p.fmax,
                                        init_frontend)
        self.bn0 = nn.BatchNorm2d(p.mel_bins)
        chans = [1, *channels]
        for i in range(6):
            self.add_module(f"conv_block{i + 1}", _ConvBlock(chans[i], chans[i + 1]))
        self.dim = chans[-1]
        self.fc1 = nn.Linear(self.dim, self.dim)
        self.fc_audioset = nn.Linear(self.dim, p.classes)

    def forward(self, wave: Tensor) -> tuple[Tensor, Tensor]:
        """wave: (B, N) → (embedding (B, dim), logits (B, classes)); dim = 2048 when published."""
        x = self.logmel_extractor(self.spectrogram_extractor(wave))  # (B, 1, T, M)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # normalise per mel bin
        for i in range(6):
            x = getattr(self, f"conv_block{i + 1}")(x, pool=2 if i < 5 else 1)
        x = x.mean(dim=3)  # (B, dim, T') average over frequency
        x = x.amax(dim=2) + x.mean(dim=2)  # max + mean over time, as PANNs pools
        emb = torch.relu(self.fc1(x))
        return emb, self.fc_audioset(emb)


class PannsCnn14Embedder(AudioEmbedder):
    """Cnn14 from a published checkpoint file as an :class:`AudioEmbedder`.

    Args:
        checkpoint: a ``Cnn14_16k_mAP=0.438.pth``-style file: ``{"model": state_dict, …}``
            (a bare state dict is accepted too).
        preset: ``16k`` (the AudioLDM / Tango protocol) or ``32k``.
    """

    dim = 2048
    head_activation = "sigmoid"
    fd_unit = "clip"
    resampling = "torchaudio_default"  # what audioldm_eval's WaveDataset does before Cnn14

    def __init__(self, checkpoint: str | os.PathLike, preset: str = "16k"):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"Cnn14 preset {preset!r} unknown; choose one of {sorted(PRESETS)}")
        p = PRESETS[preset]
        path = require_file(checkpoint, f"PANNs Cnn14 ({preset})")
        layout = f"PANNs Cnn14 {preset}"
        raw = load_torch_file(path)
        if not isinstance(raw, dict):
            raise CheckpointFormatError(path, layout, detail=f"file holds a {type(raw).__name__}, not a dict")
        state = raw["model"] if "model" in raw else raw
        if not isinstance(state, dict):
            raise CheckpointFormatError(path, layout, detail="its 'model' entry is not a state dict")
        with torch.device("meta"):  # every tensor comes from the file
            self.net = Cnn14(p, init_frontend=False)
        load_checked(self.net, state, path, layout)
        self.net.eval().requires_grad_(False)
        self.sample_rate = p.sample_rate
        self.num_classes = p.classes
        self.name = f"panns-cnn14-{preset}"
        self.weights_sha256 = sha256_file(path)
        self.min_samples = round(_MIN_SECONDS * p.sample_rate)

    def _forward(self, wave: Tensor, sample_rate: int | None) -> tuple[Tensor, Tensor]:
        x = self.prepare(wave, sample_rate)
        x = x - x.mean(dim=1, keepdim=True)  # DC removed per clip, as audioldm_eval reads files
        if x.shape[1] < self.min_samples:
            x = nn.functional.pad(x, (0, self.min_samples - x.shape[1]))
        return self.net(x)

    @torch.no_grad()
    def frame_embeddings(self, wave: Tensor, sample_rate: int | None = None) -> Tensor:
        """The clip's 2048-d ``fc1`` output as a single frame: (B, 1, 2048)."""
        return self._forward(wave, sample_rate)[0].unsqueeze(1)

    @torch.no_grad()
    def classify(self, wave: Tensor, sample_rate: int | None = None) -> Tensor:
        """AudioSet logits (B, 527), before the sigmoid."""
        return self._forward(wave, sample_rate)[1]

    @torch.no_grad()
    def embed_and_classify(self, wave: Tensor, sample_rate: int | None = None) -> tuple[Tensor, Tensor]:
        """Both outputs of one forward pass: ((B, 2048), (B, 527))."""
        return self._forward(wave, sample_rate)
