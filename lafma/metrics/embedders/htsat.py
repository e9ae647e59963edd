"""HTS-AT (Chen et al., ICASSP 2022): the audio tower of the published LAION-CLAP checkpoints.

A Swin transformer over a log-mel "image". Rebuilt here from the papers (HTS-AT; Swin,
Liu et al. 2021); only the parameter and buffer names follow LAION-CLAP's ``audio_branch.*``
layout, so a ``630k-audioset-best.pt`` loads strictly. The pieces, in forward order:

1. Front end (shared with PANNs, :mod:`lafma.metrics.embedders.panns`): centred Hann STFT as
   two Conv1d banks → Slaney mel matrix → dB (ref 1, amin 1e-10, no top-dB) → ``bn0``, a
   BatchNorm over the mel bins.
2. Time–frequency reshape: the (T, 64) log-mel of a 10 s clip (1001 frames at 48 kHz / 480
   hop) is stretched to 1024 frames (bicubic, along time only), cut into 4 chunks of 256
   frames and the chunks stacked along frequency: a 256 × 256 image whose rows are
   (chunk, mel bin) and whose columns are time within the chunk.
3. Patch embedding (4 × 4 conv, stride 4) + LayerNorm → a 64 × 64 token grid.
4. Four Swin stages: pairs of blocks with window attention (8 × 8 windows, a learnt
   relative-position bias per head), the second of each pair on windows shifted by half a
   window (with a mask so tokens wrapped around by the cyclic shift do not attend to each
   other); patch merging (2 × 2 neighbours concatenated, LayerNorm, linear 4C → 2C) between
   stages. A stage whose grid is no larger than the window uses one unshifted window.
5. Token-semantic head: the final 8 × 8 grid is put back into (frequency, time) order, 2 ×
   32; the mean over it is the ``embedding`` (768-d for tiny) that CLAP projects; a (2, 3)
   conv over it gives 527 AudioSet logits per time step, averaged over time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# The STFT and mel front end are PANNs' (torchlibrosa's), down to their parameter names.
from lafma.metrics.embedders.panns import _LogMel, _Spectrogram

MASK_VALUE = -100.0  # what the reference adds to masked attention logits (exp(-100) ≈ 0)


@dataclass(frozen=True)
class HTSATConfig:
    """Shape of an HTS-AT network and its front end.

    The defaults are LAION-CLAP's ``HTSAT-tiny`` at 48 kHz (its ``model_configs/HTSAT-tiny.json``
    audio settings and ``create_htsat_model("tiny")``). ``HTSAT-base`` is ``embed_dim=128,
    depths=(2, 2, 12, 2)``.
    """

    sample_rate: int = 48000
    window_size: int = 1024
    hop_size: int = 480
    mel_bins: int = 64
    fmin: float = 50.0
    fmax: float = 14000.0
    spec_size: int = 256  # side of the square "image" fed to the transformer
    patch_size: int = 4
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window: int = 8
    mlp_ratio: float = 4.0
    classes: int = 527

    @property
    def freq_ratio(self) -> int:
        """How many time chunks are stacked along frequency: 256 / 64 = 4."""
        return self.spec_size // self.mel_bins

    @property
    def grid(self) -> int:
        """Side of the token grid after patch embedding: 256 / 4 = 64."""
        return self.spec_size // self.patch_size

    @property
    def num_features(self) -> int:
        """Width of the last stage, i.e. of the embedding: 96 · 2³ = 768 for tiny."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor], **front_end) -> HTSATConfig:
        """Read the network's shape off an ``audio_branch`` state dict (prefix removed).

        Widths, depths, heads, window and classes are all implied by parameter shapes; the
        front end (sample rate, hop, band edges) is not, and comes from ``front_end``.
        """
        depths, heads = [], []
        for i in range(len({k.split(".")[1] for k in state if k.startswith("layers.")})):
            blocks = {k.split(".")[3] for k in state if k.startswith(f"layers.{i}.blocks.")}
            depths.append(len(blocks))
            heads.append(state[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1])
        # The bias table of the largest stage has (2w - 1)² rows for window w.
        rows = state["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
        proj = state["patch_embed.proj.weight"]  # (embed_dim, 1, patch, patch)
        return cls(embed_dim=proj.shape[0], patch_size=proj.shape[-1], depths=tuple(depths),
                   num_heads=tuple(heads), window=(round(rows**0.5) + 1) // 2,
                   mel_bins=state["bn0.weight"].shape[0], classes=state["head.weight"].shape[0],
                   window_size=2 * (state["logmel_extractor.melW"].shape[0] - 1), **front_end)


def relative_position_index(window: int) -> Tensor:
    """(w², w²) long: row of the bias table for each (query, key) pair of a w × w window.

    A displacement (dy, dx) ∈ [-(w-1), w-1]² is numbered (dy + w - 1)·(2w - 1) + (dx + w - 1).
    """
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()  # (w²,) token coordinates, row-major
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def shifted_window_mask(side: int, window: int, shift: int) -> Tensor:
    """(nW, w², w²) additive mask for attention in cyclically shifted windows.

    After rolling the grid by ``-shift``, the last window row/column holds tokens from both
    ends of the grid. Each token is labelled by which of three bands ([0, side-w),
    [side-w, side-shift), [side-shift, side)) it falls in along each axis; pairs with
    different labels get :data:`MASK_VALUE`.
    """
    pos = torch.arange(side)
    band = (pos >= side - window).long() + (pos >= side - shift).long()  # (side,) in {0, 1, 2}
    label = (band[:, None] * 3 + band[None, :]).float()  # (side, side)
    windows = partition(label[None, :, :, None], window).flatten(1)  # (nW, w²)
    same = windows[:, :, None] == windows[:, None, :]
    return torch.where(same, 0.0, MASK_VALUE)


def partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) → (B · H/w · W/w, w, w, C): non-overlapping windows, row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


def unpartition(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`partition`: (B · nW, w, w, C) → (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, plus a learnt relative-position bias."""

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        # Derived, but the published checkpoints store it, so it is a (persistent) buffer.
        self.register_buffer("relative_position_index", relative_position_index(window))

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x: (B · nW, N, C), mask: (nW, N, N) or None → (B · nW, N, C)."""
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B·nW, heads, N, head_dim)
        logits = (q * self.scale) @ k.transpose(-2, -1)  # (B·nW, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()]
        logits = logits + bias.view(n, n, -1).permute(2, 0, 1)  # (heads, N, N) broadcast
        if mask is not None:
            nw = mask.shape[0]
            logits = logits.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            logits = logits.view(bw, self.num_heads, n, n)
        out = logits.softmax(dim=-1) @ v  # (B·nW, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm transformer block on a (side × side) token grid, attention in (shifted) windows."""

    def __init__(self, dim: int, side: int, num_heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        if side <= window:  # the grid fits in one window: nothing to shift
            window, shift = side, 0
        self.side, self.window, self.shift = side, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        if shift:  # present in the published state dict only for shifted blocks
            self.register_buffer("attn_mask", shifted_window_mask(side, window, shift))
        else:
            self.attn_mask = None

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, side², C) → (B, side², C)."""
        b, n, c = x.shape
        s, w = self.side, self.window
        y = self.norm1(x).view(b, s, s, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = partition(y, w).view(-1, w * w, c)  # (B·nW, w², C)
        y = self.attn(y, self.attn_mask)
        y = unpartition(y.view(-1, w, w, c), w, s, s)  # (B, s, s, C)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2 × 2 neighbouring tokens → one of twice the width: (B, s², C) → (B, (s/2)², 2C)."""

    def __init__(self, dim: int, side: int):
        super().__init__()
        self.side = side
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        x = x.view(b, self.side, self.side, c)
        # Concatenation order (row offset, column offset): (0,0), (1,0), (0,1), (1,1); the
        # reduction's weights are laid out in this order.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class _Stage(nn.Module):
    def __init__(self, dim: int, side: int, depth: int, num_heads: int, window: int,
                 mlp_ratio: float, merge: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, side, num_heads, window, shift=0 if i % 2 == 0 else window // 2, mlp_ratio=mlp_ratio)
            for i in range(depth))
        self.downsample = PatchMerging(dim, side) if merge else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 1, S, S) → (B, (S/patch)², dim), tokens row-major."""
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class HTSAT(nn.Module):
    """HTS-AT: waveform at ``config.sample_rate`` → (embedding, AudioSet logits).

    Args:
        config: network shape and front end.
        init_frontend: fill the STFT kernels and mel matrix analytically (pointless, and
            impossible on ``meta``, when a checkpoint will overwrite them).
    """

    def __init__(self, config: HTSATConfig = HTSATConfig(), init_frontend: bool = True):
        super().__init__()
        cfg = self.config = config
        if len(cfg.depths) != len(cfg.num_heads):
            raise ValueError(f"HTS-AT: {len(cfg.depths)} stages but {len(cfg.num_heads)} head counts")
        self.spectrogram_extractor = _Spectrogram(cfg.window_size, cfg.hop_size, init_frontend)
        self.logmel_extractor = _LogMel(cfg.sample_rate, cfg.window_size, cfg.mel_bins, cfg.fmin, cfg.fmax,
                                        init_frontend)
        self.bn0 = nn.BatchNorm2d(cfg.mel_bins)
        self.patch_embed = _PatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.layers = nn.ModuleList(
            _Stage(cfg.embed_dim * 2**i, cfg.grid // 2**i, depth, cfg.num_heads[i], cfg.window, cfg.mlp_ratio,
                   merge=i < len(cfg.depths) - 1)
            for i, depth in enumerate(cfg.depths))
        self.norm = nn.LayerNorm(cfg.num_features)
        final = cfg.grid // 2 ** (len(cfg.depths) - 1)  # side of the last token grid: 8
        # The head's kernel spans every frequency row of one time chunk: final / freq_ratio = 2.
        self.tscam_conv = nn.Conv2d(cfg.num_features, cfg.classes, (final // cfg.freq_ratio, 3), padding=(0, 1))
        self.head = nn.Linear(cfg.classes, cfg.classes)  # in the checkpoint; unused by the clip output

    def logmel(self, wave: Tensor) -> Tensor:
        """wave: (B, N) → normalised log-mel (B, 1, T, mel_bins)."""
        x = self.logmel_extractor(self.spectrogram_extractor(wave))  # (B, 1, T, M)
        return self.bn0(x.transpose(1, 3)).transpose(1, 3)  # BatchNorm over mel bins

    def to_image(self, mel: Tensor) -> Tensor:
        """(B, 1, T, M) → (B, 1, S, S): time stretched to S·r frames, r chunks stacked along frequency."""
        cfg = self.config
        r, s = cfg.freq_ratio, cfg.spec_size
        b, _, t, m = mel.shape
        if t > s * r or m != s // r:
            raise ValueError(f"HTS-AT takes at most {s * r} frames of {s // r} mel bins, got ({t}, {m})")
        if t < s * r:  # bicubic along time only (the width is unchanged, so exact there)
            mel = nn.functional.interpolate(mel, (s * r, m), mode="bicubic", align_corners=True)
        x = mel.transpose(2, 3).reshape(b, 1, m, r, s)  # (B, 1, M, chunk, time in chunk)
        return x.transpose(2, 3).reshape(b, 1, r * m, s)  # rows = (chunk, mel bin)

    def forward(self, wave: Tensor) -> tuple[Tensor, Tensor]:
        """wave: (B, N) → (embedding (B, num_features), logits (B, classes), before the sigmoid)."""
        cfg = self.config
        x = self.patch_embed(self.to_image(self.logmel(wave)))  # (B, grid², C0)
        for stage in self.layers:
            x = stage(x)
        x = unstack_chunks(self.norm(x), cfg.freq_ratio)  # (B, C, F', T')
        embedding = x.mean(dim=(2, 3))
        logits = self.tscam_conv(x).flatten(2).mean(dim=2)  # (B, classes, 1, T') → (B, classes)
        return embedding, logits


def unstack_chunks(tokens: Tensor, freq_ratio: int) -> Tensor:
    """Final tokens (B, f², C) on an f × f grid → (B, C, f / r, r · f) in (frequency, time) order.

    The inverse, at the final resolution, of :meth:`HTSAT.to_image`: grid rows are (time chunk,
    frequency), so chunk k's rows are moved to columns [k·f, (k+1)·f).
    """
    b, n, c = tokens.shape
    f, r = round(n**0.5), freq_ratio
    x = tokens.transpose(1, 2).reshape(b, c, r, f // r, f)  # (B, C, chunk, freq, time in chunk)
    return x.transpose(2, 3).reshape(b, c, f // r, r * f)


def htsat_expected_buffers(config: HTSATConfig) -> dict[str, Tensor]:
    """The derived buffers a published checkpoint stores: relative-position indices and shift masks."""
    net_side = [config.grid // 2**i for i in range(len(config.depths))]
    out = {}
    for i, (depth, side) in enumerate(zip(config.depths, net_side, strict=True)):
        window = min(config.window, side)
        for j in range(depth):
            out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = relative_position_index(window)
            if j % 2 and side > config.window:
                out[f"layers.{i}.blocks.{j}.attn_mask"] = shifted_window_mask(side, window, window // 2)
    return out


def mismatched_buffers(state: Mapping[str, Tensor], config: HTSATConfig) -> Sequence[str]:
    """Names of stored derived buffers whose values differ from the architecture's own."""
    return [k for k, v in htsat_expected_buffers(config).items()
            if k in state and (tuple(state[k].shape) != tuple(v.shape) or not torch.equal(state[k].to(v.dtype), v))]
