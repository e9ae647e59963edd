"""The LFM backbone: AudioLDM's UNet with timestep embedding and spatial transformers.

The layout follows LDM/AudioLDM's ``openaimodel.UNetModel`` (so parameter counts and
behaviour are comparable), with one deliberate change: the text attention mask reaches
cross-attention, so padding tokens cannot change the output (the released LAFMA code
attends to them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lafma.config import UNetConfig


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """DDPM sinusoidal embedding of (possibly fractional) timesteps. t: (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def zero_module(m: nn.Module) -> nn.Module:
    """Zero-initialise a residual branch's last layer so each block starts as the identity."""
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


# The duration embedding sees seconds × this (hundredths of a second): its fastest sinusoid then
# tells apart durations a latent frame apart (40 ms in the paper's layout), and its slowest stays
# monotonic far past any clip length (MAX_DURATION_SECONDS).
DURATION_SCALE = 100.0


def positions(x: Tensor) -> Tensor:
    """Each latent cell's place in the clip, (B, C, T', F') → (B, 2, T', F'): time, then
    frequency, each from -1 (start, lowest band) to 1 (end, highest band)."""
    b, _, frames, bands = x.shape
    time = torch.linspace(-1.0, 1.0, frames, device=x.device, dtype=x.dtype)[:, None].expand(frames, bands)
    freq = torch.linspace(-1.0, 1.0, bands, device=x.device, dtype=x.dtype)[None, :].expand(frames, bands)
    return torch.stack([time, freq])[None].expand(b, 2, frames, bands)  # (2, T', F') -> (B, 2, T', F')


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-5)


def pooled(context: Tensor, mask: Tensor | None) -> Tensor:
    """The mean of each caption's real token embeddings: (B, L, D), (B, L) → (B, D)."""
    if mask is None:
        return context.mean(1)
    m = mask.to(context.dtype)[..., None]  # (B, L, 1)
    return (context * m).sum(1) / m.sum(1).clamp_min(1.0)


class ResBlock(nn.Module):
    """Conv res block conditioned on the time embedding (scale-shift or additive)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0,
                 use_scale_shift_norm: bool = False):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_norm = group_norm(out_channels)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, C, H, W); emb: (B, E) → (B, C_out, H, W)."""
        h = self.in_layers(x)
        e = self.emb_layers(emb)[:, :, None, None]  # (B, C', 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head (cross-)attention; ``mask`` (B, L) True marks keys that may be attended."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x: (B, N, Dq); context: (B, L, Dc) or None for self-attention; mask: (B, L) bool."""
        context = x if context is None else context
        b = x.shape[0]
        # (B, N, H·d) -> (B, H, N, d)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        attn_mask = None if mask is None else mask[:, None, None, :].bool()  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(b, x.shape[1], -1)  # (B, H, N, d) -> (B, N, H·d)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention to text, gated feed-forward (pre-norm, residual)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = Attention(dim, heads, dim_head, dropout=dropout)
        self.ff = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim, dropout=dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the (H·W) positions of a feature map, conditioned on text tokens."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.blocks = nn.ModuleList(
            [TransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth)])
        self.proj_out = zero_module(nn.Conv2d(inner, channels, 1))

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        """x: (B, C, H, W); context: (B, L, D); mask: (B, L) → (B, C, H, W)."""
        b, _, h, w = x.shape
        y = self.proj_in(self.norm(x))
        y = y.flatten(2).transpose(1, 2)  # (B, inner, H, W) -> (B, H·W, inner)
        for block in self.blocks:
            y = block(y, context, mask)
        y = y.transpose(1, 2).reshape(b, -1, h, w)  # (B, H·W, inner) -> (B, inner, H, W)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.ModuleList):
    """A sequence of layers; each is called with what it needs (emb for res blocks, text for transformers)."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, mask)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """Velocity model u_θ(x_t, t, c) over VAE latents.

    Args:
        in_channels, out_channels: latent channels (8).
        model_channels: base width; level i has ``model_channels * channel_mult[i]`` channels.
        channel_mult: width multipliers; the UNet downsamples ``len - 1`` times.
        num_res_blocks: res blocks per level on the way down (one more on the way up).
        attention_resolutions: downsample factors at which a spatial transformer follows each res block.
        num_head_channels: channels per attention head.
        num_heads: when > 0, every attention layer has this many heads of width
            ``channels // num_heads`` instead (LDM's "legacy" split; the released LAFMA UNet
            uses 32), and ``num_head_channels`` is ignored.
        transformer_depth: transformer blocks per spatial transformer.
        context_dim: width of the text embeddings.
        use_scale_shift_norm: FiLM-style time conditioning instead of additive (AudioLDM-S: additive).
        dropout: dropout in res blocks and transformers.
        extra_attention: a second spatial transformer at every attention site (released LAFMA code).
        time_scale: t ∈ [0, 1] is multiplied by this before the sinusoidal embedding (999 in
            the released code, which reuses a DDPM embedding tuned to integer steps).
        pooled_context: also condition every res block on the caption as a whole: the mean of
            its real token embeddings, projected and added to the time embedding (AudioLDM
            conditions on a pooled CLAP embedding this way, Stable Audio has the same global
            condition beside cross-attention). Cross-attention alone has to find the caption's
            gist through a few attention layers; a small model trained briefly learns what a
            sound is (kind, register, pace) much faster from the pooled vector, which reaches
            every block. Off in the paper's UNet (the released weights have no such layer).
        duration_embedding: also condition every res block on the clip's duration in seconds
            (:meth:`forward`'s ``duration``): its sinusoidal embedding, projected and added to the
            time embedding, as Stable Audio conditions on ``seconds_total`` and TangoFlux on a
            duration token. A model trained on crops of every length up to its clip length
            (``train_lfm.variable_duration``) then knows how long the clip it is making lasts,
            which a convolution cannot see from the latent's shape. Off in the paper's UNet;
            off, the layers, the initial weights and the outputs are exactly those without it.
        position_channels: give the first convolution two more input channels holding each
            cell's position in time and frequency (CoordConv, Liu et al. 2018). Convolutions
            are translation-equivariant and LDM's transformers have no positional embedding,
            so the UNet otherwise knows where in the clip a cell lies only from the zero
            padding at its edges, which a small UNet's receptive field carries a few frames in:
            "a rising scale" (low notes first, high notes last) and "a swell" (loud in the
            middle) need that place. Time runs over the latent being generated (a pattern
            spans the clip at any duration; with ``duration_embedding`` the model also knows
            how long that is). Off in the paper's UNet (the released weights have no such
            channels); off, the layers and initial weights are exactly those without it.
    """

    def __init__(self, *, in_channels: int = 8, out_channels: int = 8, model_channels: int = 128,
                 channel_mult: tuple[int, ...] = (1, 2, 3, 5), num_res_blocks: int = 2,
                 attention_resolutions: tuple[int, ...] = (8, 4, 2), num_head_channels: int = 32,
                 num_heads: int = 0, transformer_depth: int = 1, context_dim: int = 1024,
                 use_scale_shift_norm: bool = False, dropout: float = 0.0, extra_attention: bool = False, time_scale: float = 999.0,
                 pooled_context: bool = False, duration_embedding: bool = False, position_channels: bool = False):
        super().__init__()
        self.position_channels = position_channels
        self.model_channels = model_channels
        self.time_scale = time_scale
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if pooled_context:
            self.context_embed = nn.Sequential(nn.Linear(context_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, emb_dim, cout, dropout, use_scale_shift_norm)

        def attn(ch: int) -> list[nn.Module]:
            n = 2 if extra_attention else 1
            heads = num_heads or ch // num_head_channels
            return [SpatialTransformer(ch, heads, ch // heads, transformer_depth, context_dim, dropout)
                    for _ in range(n)]

        self.input_blocks = nn.ModuleList([Stage([nn.Conv2d(in_channels + 2 * position_channels, model_channels, 3, padding=1)])])
        skip_channels, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers += attn(ch)
                self.input_blocks.append(Stage(layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Stage([Downsample(ch)]))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = Stage([res(ch, ch), *attn(ch), res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers += attn(ch)
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Stage(layers))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)))
        # Built last, so every other layer draws the initial weights it draws without it.
        self.takes_duration = duration_embedding
        if duration_embedding:
            self.duration_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    @classmethod
    def from_config(cls, cfg: UNetConfig, context_dim: int, time_scale: float) -> UNet:
        return cls(in_channels=cfg.in_channels, out_channels=cfg.out_channels, model_channels=cfg.model_channels,
                   channel_mult=cfg.channel_mult, num_res_blocks=cfg.num_res_blocks,
                   attention_resolutions=cfg.attention_resolutions, num_head_channels=cfg.num_head_channels,
                   num_heads=cfg.num_heads,
                   transformer_depth=cfg.transformer_depth, context_dim=cfg.context_dim or context_dim,
                   use_scale_shift_norm=cfg.use_scale_shift_norm, dropout=cfg.dropout,
                   extra_attention=cfg.extra_attention, time_scale=time_scale, pooled_context=cfg.pooled_context,
                   duration_embedding=cfg.duration_embedding, position_channels=cfg.position_channels)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, context_mask: Tensor | None = None,
                duration: Tensor | None = None) -> Tensor:
        """Velocity at (x, t) given the caption (and, with ``duration_embedding``, the duration).

        Args:
            x: latents (B, C, T', F') with T' and F' divisible by the downsample factor.
            t: times in [0, 1], (B,).
            context: text token embeddings (B, L, D).
            context_mask: (B, L) bool, True on real tokens; None attends to every token.
            duration: seconds of audio each latent holds, (B,); required with
                ``duration_embedding``, refused without it.

        Returns:
            Velocity (B, C, T', F').
        """
        if x.shape[-2] % self.downsample_factor or x.shape[-1] % self.downsample_factor:
            raise ValueError(f"latent {tuple(x.shape[-2:])} is not divisible by {self.downsample_factor}")
        if (duration is None) == self.takes_duration:
            raise ValueError("this UNet is conditioned on duration: pass duration=(B,) seconds" if self.takes_duration
                             else "this UNet has no duration embedding: it takes no duration")
        emb = self.time_embed(timestep_embedding(t * self.time_scale, self.model_channels).to(x.dtype))
        if hasattr(self, "context_embed"):
            emb = emb + self.context_embed(pooled(context, context_mask).to(emb.dtype))
        if duration is not None:
            seconds = duration.to(x.device).expand(x.shape[0]) * DURATION_SCALE  # (B,); one value is shared
            emb = emb + self.duration_embed(timestep_embedding(seconds, self.model_channels).to(emb.dtype))
        h, skips = (torch.cat([x, positions(x)], dim=1) if self.position_channels else x), []
        for block in self.input_blocks:
            h = block(h, emb, context, context_mask)
            skips.append(h)
        h = self.middle_block(h, emb, context, context_mask)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)
