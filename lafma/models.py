"""Builders: a typed config → the modules it describes, through explicit tables.

Every job (training, latents, packaging, describe) builds its networks here, so the
mapping from config to architecture lives in one place and is never import-by-string.
"""

from __future__ import annotations

from torch import nn

from lafma.config import LafmaConfig
from lafma.pipeline import LafmaPipeline
from lafma.text import TextEncoder, build_text_encoder
from lafma.unet import UNet
from lafma.vae import MelVAE, NLayerDiscriminator
from lafma.vocoder import HiFiGANDiscriminator, vocoder_by_kind


def build_unet(cfg: LafmaConfig) -> UNet:
    return UNet.from_config(cfg.unet, context_dim=cfg.context_dim, time_scale=cfg.flow.time_scale)


def build_vae(cfg: LafmaConfig) -> MelVAE:
    return MelVAE.from_config(cfg.vae)


def build_vae_discriminator(cfg: LafmaConfig) -> NLayerDiscriminator:
    return NLayerDiscriminator(input_nc=cfg.vae.in_channels, ndf=cfg.vae_loss.disc_ndf,
                               n_layers=cfg.vae_loss.disc_layers)


def build_vocoder(cfg: LafmaConfig, kind: str | None = None) -> nn.Module:
    """``hifigan`` (trained by the vocoder job) or ``griffinlim`` (no training: a baseline);
    by default the config's ``vocoder.kind``."""
    return vocoder_by_kind(kind or cfg.vocoder.kind, mel=cfg.mel, hifigan=cfg.vocoder)


def build_vocoder_discriminator(cfg: LafmaConfig) -> HiFiGANDiscriminator:
    return HiFiGANDiscriminator(periods=cfg.vocoder.mpd_periods, width_mult=cfg.vocoder.disc_width_mult)


def build_pipeline(cfg: LafmaConfig, *, text_encoder: TextEncoder | None = None, unet: nn.Module | None = None,
                   vae: nn.Module | None = None, vocoder: nn.Module | None = None) -> LafmaPipeline:
    """A pipeline from trained components; any left out is built fresh (random weights)."""
    s = cfg.sampler
    return LafmaPipeline(
        text_encoder=text_encoder if text_encoder is not None else build_text_encoder(cfg.text),
        unet=(unet if unet is not None else build_unet(cfg)).eval(),
        vae=(vae if vae is not None else build_vae(cfg)).eval(),
        vocoder=(vocoder if vocoder is not None else build_vocoder(cfg)).eval(),
        sample_rate=cfg.mel.sample_rate, hop_length=cfg.mel.hop_length, n_mels=cfg.mel.n_mels,
        latent_channels=cfg.vae.z_channels, vae_downsample=cfg.vae.downsample, scale_factor=cfg.vae.scale_factor,
        unet_downsample=cfg.unet.downsample, solver=s.solver, steps=s.steps, guidance=s.guidance,
        duration=s.duration, peak_normalize=s.peak_normalize, rtol=s.rtol, atol=s.atol, peak=s.peak, grid=s.grid,
        null_caption=s.null_caption, mel=cfg.mel, sigma_min=cfg.flow.sigma_min, max_duration=cfg.max_duration,
    )
