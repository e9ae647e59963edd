"""AudioLDM's mel VAE: LDM's 2-D convolutional autoencoder applied to a log-mel "image".

The mel arrives as (B, n_mels, T); the VAE sees it as a one-channel image (B, 1, T, n_mels),
time as height and frequency as width, exactly as AudioLDM does, so a 1024 × 64 mel becomes a
(C, T / r, n_mels / r) = 8 × 256 × 16 latent. Submodule names follow LDM's ``Encoder`` /
``Decoder`` / ``AutoencoderKL`` so that a released AudioLDM ``first_stage_model`` state dict
maps onto this one key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lafma.config import VAEConfig
from lafma.vae.distributions import DiagonalGaussian


def mel_to_image(mel: Tensor) -> Tensor:
    """(B, n_mels, T) → (B, 1, T, n_mels): time as height, frequency as width (AudioLDM)."""
    return mel.transpose(1, 2).unsqueeze(1)  # (B, n_mels, T) → (B, T, n_mels) → (B, 1, T, n_mels)


def image_to_mel(img: Tensor) -> Tensor:
    """(B, 1, T, n_mels) → (B, n_mels, T); the inverse of :func:`mel_to_image`."""
    return img.squeeze(1).transpose(1, 2)  # (B, 1, T, n_mels) → (B, T, n_mels) → (B, n_mels, T)


def _norm(channels: int) -> nn.GroupNorm:
    # LDM's Normalize: 32 groups, eps 1e-6.
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, twice, plus a (1×1 when channels change) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                             else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C_in, H, W) → (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(self.dropout(F.silu(self.norm2(h))))


class AttnBlock(nn.Module):
    """Single-head self-attention over all H × W positions, with 1×1 q, k, v and output convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) → (B, C, H, W)."""
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) → (B, 1, H*W, C): one head, positions as tokens.
        q, k, v = (conv(y).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.q, self.k, self.v))
        # SDPA scales by C^-0.5, as LDM's explicit bmm does; it just never builds H*W × H*W in fp32.
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)  # (B, H*W, C) → (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3×3 conv; LDM pads (0, 1, 0, 1) so an even side halves exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) → (B, C, H / 2, W / 2)."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then a 3×3 conv (no transposed-conv checkerboard)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) → (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    """Res – Attn – Res at the lowest resolution (the only attention: attn_resolutions = []).

    With ``attention=False`` it is Res – Res and has no ``attn_1`` (LAFMA's released VAEGAN).
    """

    def __init__(self, channels: int, dropout: float, attention: bool = True):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        if attention:
            self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) → (B, C, H, W)."""
        h = self.block_1(x)
        if hasattr(self, "attn_1"):
            h = self.attn_1(h)
        return self.block_2(h)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) → (B, 2 * z_channels, H / r, W / r) mean and log-variance."""

    def __init__(self, *, in_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 z_channels: int, dropout: float = 0.0, mid_attention: bool = True):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_mult[i], ch * mult
            level = nn.Module()
            level.block = nn.ModuleList(
                ResnetBlock(block_in if j == 0 else block_out, block_out, dropout) for j in range(num_res_blocks))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_out)
            self.down.append(level)
        block_in = ch * ch_mult[-1]
        self.mid = _Mid(block_in, dropout, mid_attention)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, H, W) → (B, 2 * z_channels, H / r, W / r)."""
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) → image (B, out_channels, h * r, w * r).

    Each level has ``num_res_blocks + 1`` res blocks, one more than the encoder, as in LDM.
    """

    def __init__(self, *, out_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 z_channels: int, dropout: float = 0.0, mid_attention: bool = True):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout, mid_attention)
        up = []
        for i in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[i]
            level = nn.Module()
            level.block = nn.ModuleList(
                ResnetBlock(block_in if j == 0 else block_out, block_out, dropout) for j in range(num_res_blocks + 1))
            block_in = block_out
            if i != 0:
                level.upsample = Upsample(block_in)
            up.append(level)
        # LDM stores levels lowest-resolution-last (up[0] is full resolution) and runs them reversed.
        self.up = nn.ModuleList(reversed(up))
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """z: (B, z_channels, h, w) → (B, out_channels, h * r, w * r)."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class MelVAE(nn.Module):
    """AudioLDM's KL autoencoder over log-mels.

    Encoding and decoding work on unscaled latents; the flow model sees ``z * scale_factor``
    (LDM's convention), which the caller applies with :attr:`scale_factor`.

    Args:
        in_channels: image channels, 1 for a mel.
        ch: base width; level ``i`` has ``ch * ch_mult[i]`` channels (a multiple of 32: GroupNorm).
        ch_mult: width multipliers; ``len(ch_mult) - 1`` stride-2 stages give r = 2 ** that.
        num_res_blocks: res blocks per encoder level (the decoder has one more).
        z_channels: latent channels C.
        dropout: inside every res block.
        mid_attention: a self-attention block between the two middle res blocks of the encoder
            and the decoder (AudioLDM, diffusers); False drops it (LAFMA's released VAEGAN).
        scale_factor: latent scale for the flow model (a plain attribute, not in the state dict).
        mel_mean, mel_std: the encoder sees ``(mel - mel_mean) / mel_std`` and the decoder's
            output is mapped back (plain attributes too, so AudioLDM's state dicts load as they
            are; 0 and 1 feed the raw log-mel, as AudioLDM does).
    """

    def __init__(self, *, in_channels: int = 1, ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 8, dropout: float = 0.0, mid_attention: bool = True,
                 scale_factor: float = 1.0, mel_mean: float = 0.0, mel_std: float = 1.0):
        super().__init__()
        kw = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels,
                  dropout=dropout, mid_attention=mid_attention)
        self.encoder = Encoder(in_channels=in_channels, **kw)
        self.decoder = Decoder(out_channels=in_channels, **kw)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        self.z_channels = z_channels
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.scale_factor = scale_factor
        self.mel_mean, self.mel_std = float(mel_mean), float(mel_std)

    @classmethod
    def from_config(cls, cfg: VAEConfig) -> MelVAE:
        return cls(in_channels=cfg.in_channels, ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
                   z_channels=cfg.z_channels, dropout=cfg.dropout, mid_attention=cfg.mid_attention,
                   scale_factor=cfg.scale_factor, mel_mean=cfg.mel_mean, mel_std=cfg.mel_std)

    def encode(self, mel: Tensor) -> DiagonalGaussian:
        """mel: (B, n_mels, T) → posterior over latents (B, C, T / r, n_mels / r)."""
        r = self.downsample
        if mel.dim() != 3 or mel.shape[1] % r or mel.shape[2] % r:
            raise ValueError(f"mel must be (B, n_mels, T) with n_mels and T divisible by {r}, got {tuple(mel.shape)}")
        x = (mel - self.mel_mean) / self.mel_std
        # (B, 1, T, n_mels) image → (B, 2C, T / r, n_mels / r) moments.
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(mel_to_image(x))))

    def decode(self, z: Tensor) -> Tensor:
        """z: (B, C, T / r, n_mels / r) → mel (B, n_mels, T)."""
        return image_to_mel(self.decoder(self.post_quant_conv(z))) * self.mel_std + self.mel_mean

    def forward(self, mel: Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct a mel through a sampled (or, with ``sample=False``, the mean) latent.

        Args:
            mel: (B, n_mels, T).
            sample: draw z from the posterior (training) rather than take its mode.
            generator: RNG for the draw.

        Returns:
            ``(recon, posterior)``: recon (B, n_mels, T), posterior over (B, C, T / r, n_mels / r).
        """
        posterior = self.encode(mel)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def get_last_layer(self) -> Tensor:
        """The decoder's output conv weight, against which the adaptive GAN weight is measured."""
        return self.decoder.conv_out.weight
