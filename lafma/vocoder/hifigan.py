"""HiFi-GAN V1 generator (Kong et al., 2020) for 16 kHz audio at hop 160.

The layout follows the reference implementation (``jik876/hifi-gan``): a 7-tap input conv,
one transposed conv per upsampling stage (channels halve each stage), a multi-receptive-field
fusion (MRF) after each stage that averages ``ResBlock1`` outputs of several kernel sizes, and
a 7-tap output conv with ``tanh``. The 16 kHz / hop-160 variant used by AudioLDM and LAFMA
upsamples by (5, 4, 2, 2, 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from lafma.config import HiFiGANConfig

# The reference implementation's slope for every leaky ReLU except the last one.
LRELU_SLOPE = 0.1


def _same_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def _init_conv(module: nn.Module) -> None:
    # N(0, 0.01) as in the reference: it keeps the initial output tiny, so early training
    # is not dominated by a loud random waveform.
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
        module.weight.data.normal_(0.0, 0.01)


class ResBlock1(nn.Module):
    """Three (dilated conv, conv) pairs with residual connections; length-preserving.

    Args:
        channels: Input and output channels.
        kernel_size: Kernel size of every conv in the block.
        dilations: Dilation of the first conv of each pair (one pair per entry).
    """

    def __init__(self, channels: int, kernel_size: int = 3, dilations: Sequence[int] = (1, 3, 5)):
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, dilation=d,
                                  padding=_same_padding(kernel_size, d)))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, padding=_same_padding(kernel_size)))
            for _ in dilations
        )
        self.apply(_init_conv)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, L) → (B, C, L)."""
        for c1, c2 in zip(self.convs1, self.convs2):
            xt = c1(F.leaky_relu(x, LRELU_SLOPE))
            xt = c2(F.leaky_relu(xt, LRELU_SLOPE))
            x = x + xt
        return x


class HiFiGANGenerator(nn.Module):
    """Log-mel → waveform. ``hop`` (the product of ``upsample_rates``) samples per mel frame.

    Args:
        upsample_rates: Stride of each transposed conv; their product is the mel hop.
        upsample_kernel_sizes: Kernel of each transposed conv (>= its rate).
        upsample_initial_channel: Channels after the input conv; halved at every stage.
        resblock_kernel_sizes: Kernel sizes of the MRF's parallel ``ResBlock1``s.
        resblock_dilation_sizes: Dilations of each of those blocks.
        n_mels: Mel bins of the input.
        upsample_padding: ``"exact"`` pads each transposed conv so that it upsamples by exactly
            its rate; ``"reference"`` uses the reference implementation's padding (whose stage
            overshoots by a sample when kernel - rate is odd) and crops the output, so weights
            imported from it give its waveform sample for sample. Both return T * hop samples.
    """

    def __init__(self, *, upsample_rates: Sequence[int] = (5, 4, 2, 2, 2),
                 upsample_kernel_sizes: Sequence[int] = (16, 16, 8, 4, 4),
                 upsample_initial_channel: int = 1024,
                 resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
                 resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5),) * 3,
                 n_mels: int = 64, upsample_padding: Literal["exact", "reference"] = "exact"):
        super().__init__()
        if upsample_padding not in ("exact", "reference"):
            raise ValueError(f"upsample_padding must be 'exact' or 'reference', not {upsample_padding!r}")
        if len(upsample_rates) != len(upsample_kernel_sizes):
            raise ValueError("need one upsample kernel size per upsample rate")
        if len(resblock_kernel_sizes) != len(resblock_dilation_sizes):
            raise ValueError("need one dilation list per resblock kernel size")
        self.n_mels = n_mels
        self.hop = 1
        for u in upsample_rates:
            self.hop *= u
        self.num_kernels = len(resblock_kernel_sizes)

        self.conv_pre = weight_norm(nn.Conv1d(n_mels, upsample_initial_channel, 7, padding=3))
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        ch = upsample_initial_channel
        for u, k in zip(upsample_rates, upsample_kernel_sizes):
            # ConvTranspose1d gives (L - 1) u - 2 p + k + op samples. The reference uses
            # p = (k - u) // 2, which yields L u + 1 when k - u is odd (k=16, u=5), so the
            # output overshoots T * hop. Rounding p up and adding the odd sample back as
            # output_padding gives exactly L u for every (k, u) with the same weights; but it
            # shifts that stage by one sample, so imported weights need the reference padding.
            if upsample_padding == "exact":
                pad, out_pad = (k - u + 1) // 2, (k - u) % 2
            else:
                pad, out_pad = (k - u) // 2, 0
            self.ups.append(weight_norm(nn.ConvTranspose1d(ch, ch // 2, k, u, padding=pad,
                                                           output_padding=out_pad)))
            ch //= 2
            self.resblocks.extend(ResBlock1(ch, rk, rd)
                                  for rk, rd in zip(resblock_kernel_sizes, resblock_dilation_sizes))
        self.conv_post = weight_norm(nn.Conv1d(ch, 1, 7, padding=3))
        self.ups.apply(_init_conv)
        self.conv_post.apply(_init_conv)

    @classmethod
    def from_config(cls, cfg: HiFiGANConfig, n_mels: int) -> HiFiGANGenerator:
        return cls(upsample_rates=cfg.upsample_rates, upsample_kernel_sizes=cfg.upsample_kernel_sizes,
                   upsample_initial_channel=cfg.upsample_initial_channel,
                   resblock_kernel_sizes=cfg.resblock_kernel_sizes,
                   resblock_dilation_sizes=cfg.resblock_dilation_sizes, n_mels=n_mels,
                   upsample_padding=cfg.upsample_padding)

    def forward(self, mel: Tensor) -> Tensor:
        """Vocode.

        Args:
            mel: (B, n_mels, T) log-mel, as made by :class:`lafma.audio.mel.MelSpectrogram`.

        Returns:
            (B, T * hop) waveform in [-1, 1].
        """
        x = self.conv_pre(mel)  # (B, C, T)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))  # (B, C / 2^(i+1), T * prod(rates[:i+1]))
            # MRF: average of parallel resblocks with different receptive fields.
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        # Default slope 0.01 here, as in the reference implementation.
        x = torch.tanh(self.conv_post(F.leaky_relu(x)))  # (B, 1, >= T * hop)
        # A no-op for "exact"; for "reference" it drops the overshoot, which the reference
        # leaves at the end (every stage pads its start by the same (k - u) // 2).
        return x[..., :mel.shape[-1] * self.hop].squeeze(1)  # (B, T * hop)

    def remove_weight_norm(self) -> HiFiGANGenerator:
        """Fold weight norm into plain weights for inference (same outputs, less compute)."""
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        return self
