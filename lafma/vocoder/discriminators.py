"""HiFi-GAN's discriminators: multi-period (MPD) and multi-scale (MSD).

Each sub-discriminator returns its logits and the activations of every layer; the generator
is trained to match the latter (feature matching). Every forward takes a single batch of
waveforms, real or fake, so the training loop decides what to detach and what to batch.
``width_mult`` scales every channel count (1.0 is the paper size) so tests can run tiny ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from lafma.vocoder.hifigan import LRELU_SLOPE

Logits = list[Tensor]
FeatureMaps = list[list[Tensor]]


def _width(channels: int, width_mult: float) -> int:
    return max(1, round(channels * width_mult))


class PeriodDiscriminator(nn.Module):
    """Folds (B, N) into (B, 1, N / p, p) and applies 2-D convs along time only.

    Sampling every p-th sample lets the convs see periodic structure at period p.
    """

    def __init__(self, period: int, width_mult: float = 1.0, kernel_size: int = 5, stride: int = 3):
        super().__init__()
        self.period = period
        chans = [1] + [_width(c, width_mult) for c in (32, 128, 512, 1024, 1024)]
        pad = ((kernel_size - 1) // 2, 0)
        self.convs = nn.ModuleList(
            # The last conv keeps the resolution; the others stride along time.
            weight_norm(nn.Conv2d(c_in, c_out, (kernel_size, 1), (stride if i < 4 else 1, 1), pad))
            for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:]))
        )
        self.conv_post = weight_norm(nn.Conv2d(chans[-1], 1, (3, 1), 1, (1, 0)))

    def forward(self, wav: Tensor) -> tuple[Tensor, list[Tensor]]:
        """wav: (B, N) → logits (B, L), feature maps [(B, C_i, N_i, period)]."""
        b, n = wav.shape
        if n % self.period:
            # Reflect-pad to a whole number of periods, as in the reference implementation.
            wav = F.pad(wav.unsqueeze(1), (0, self.period - n % self.period), mode="reflect").squeeze(1)
        x = wav.view(b, 1, -1, self.period)  # (B, 1, N / p, p)
        return _conv_stack(self.convs, self.conv_post, x)  # logits (B, N' * p)


def _conv_stack(convs: nn.ModuleList, conv_post: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Leaky-ReLU conv stack then a 1-channel conv: (flattened logits, every layer's output)."""
    fmaps = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LRELU_SLOPE)
        fmaps.append(x)
    x = conv_post(x)
    fmaps.append(x)
    return x.flatten(1), fmaps


class ScaleDiscriminator(nn.Module):
    """Strided, grouped 1-D convs over a (possibly average-pooled) waveform."""

    # (out channels, kernel, stride, groups) of the reference implementation.
    LAYERS = ((128, 15, 1, 1), (128, 41, 2, 4), (256, 41, 2, 16), (512, 41, 4, 16),
              (1024, 41, 4, 16), (1024, 41, 1, 16), (1024, 5, 1, 1))

    def __init__(self, use_spectral_norm: bool = False, width_mult: float = 1.0):
        super().__init__()
        norm = spectral_norm if use_spectral_norm else weight_norm
        self.convs = nn.ModuleList()
        c_in = 1
        for c, k, s, g in self.LAYERS:
            c_out = _width(c, width_mult)
            # Narrow widths may not divide by the reference group count: use the largest
            # group count that still divides both sides.
            groups = math.gcd(g, math.gcd(c_in, c_out))
            self.convs.append(norm(nn.Conv1d(c_in, c_out, k, s, groups=groups, padding=(k - 1) // 2)))
            c_in = c_out
        self.conv_post = norm(nn.Conv1d(c_in, 1, 3, 1, padding=1))

    def forward(self, wav: Tensor) -> tuple[Tensor, list[Tensor]]:
        """wav: (B, N) → logits (B, L), feature maps [(B, C_i, N_i)]."""
        x = wav.unsqueeze(1)  # (B, 1, N)
        return _conv_stack(self.convs, self.conv_post, x)


class MultiPeriodDiscriminator(nn.Module):
    """One :class:`PeriodDiscriminator` per period; primes avoid overlapping periods.

    Args:
        periods: The periods, (2, 3, 5, 7, 11) in the paper.
        width_mult: Channel multiplier (1.0 = paper size).
    """

    def __init__(self, periods: Sequence[int] = (2, 3, 5, 7, 11), width_mult: float = 1.0):
        super().__init__()
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p, width_mult) for p in periods)

    def forward(self, wav: Tensor) -> tuple[Logits, FeatureMaps]:
        """wav: (B, N) → one logits tensor and one feature-map list per period."""
        outs = [d(wav) for d in self.discriminators]
        return [o[0] for o in outs], [o[1] for o in outs]


class MultiScaleDiscriminator(nn.Module):
    """Three :class:`ScaleDiscriminator` on the raw, x2- and x4-average-pooled waveform.

    The raw-scale one uses spectral norm (the paper found it stabilises training), the
    others weight norm.

    Args:
        width_mult: Channel multiplier (1.0 = paper size).
    """

    def __init__(self, width_mult: float = 1.0):
        super().__init__()
        self.discriminators = nn.ModuleList([
            ScaleDiscriminator(use_spectral_norm=True, width_mult=width_mult),
            ScaleDiscriminator(width_mult=width_mult),
            ScaleDiscriminator(width_mult=width_mult),
        ])
        self.pool = nn.AvgPool1d(4, 2, padding=2)

    def forward(self, wav: Tensor) -> tuple[Logits, FeatureMaps]:
        """wav: (B, N) → one logits tensor and one feature-map list per scale."""
        logits, fmaps = [], []
        x = wav.unsqueeze(1)  # (B, 1, N): AvgPool1d wants a channel axis
        for i, d in enumerate(self.discriminators):
            if i > 0:
                x = self.pool(x)  # (B, 1, ~N / 2^i)
            out, fm = d(x.squeeze(1))
            logits.append(out)
            fmaps.append(fm)
        return logits, fmaps


class HiFiGANDiscriminator(nn.Module):
    """MPD and MSD together; outputs are the two lists concatenated (MPD first).

    Args:
        periods: MPD periods.
        width_mult: Channel multiplier for both (1.0 = paper size).
    """

    def __init__(self, periods: Sequence[int] = (2, 3, 5, 7, 11), width_mult: float = 1.0):
        super().__init__()
        self.mpd = MultiPeriodDiscriminator(periods, width_mult)
        self.msd = MultiScaleDiscriminator(width_mult)

    def forward(self, wav: Tensor) -> tuple[Logits, FeatureMaps]:
        """wav: (B, N) → len(periods) + 3 logits tensors and feature-map lists."""
        p_logits, p_fmaps = self.mpd(wav)
        s_logits, s_fmaps = self.msd(wav)
        return p_logits + s_logits, p_fmaps + s_fmaps
