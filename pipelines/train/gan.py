"""The VAE and HiFi-GAN jobs: one GAN update shape, two sets of losses.

descript-audio-codec's loop: update the discriminator on the detached fake, then the
generator with the discriminator frozen. Freezing is not optional with ZeRO-2: its
gradient hooks would see the discriminator's parameters reduced twice and assert.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lafma.audio import MelSpectrogram
from lafma.models import (
    build_vae,
    build_vae_discriminator,
    build_vocoder,
    build_vocoder_discriminator,
)
from lafma.vae import VAELoss, mel_to_image
from lafma.vocoder import (
    GriffinLimVocoder,
    discriminator_losses,
    generator_losses,
    loss_weights,
    weighted_sum,
)
from pipelines.config import PipelineConfig
from pipelines.core.tracking import RunLogger, mel_image
from pipelines.train.data import epochs, random_crop, stack


def gan_update(gen, disc, fake: Tensor, *, disc_losses: Callable[[Tensor], dict] | None,
               gen_losses: Callable[[Tensor], dict]) -> dict[str, float]:
    """One discriminator update (when ``disc_losses`` is given), then one generator update.

    Args:
        gen, disc: DeepSpeed engines.
        fake: the generator's output for this batch (with its graph).
        disc_losses: ``fake.detach() -> {"total": …, …}``; None while the GAN is off.
        gen_losses: ``fake -> {"total": …, …}`` computed with the discriminator frozen.
    """
    logs: dict[str, float] = {}
    if disc_losses is not None:
        d = disc_losses(fake.detach())
        disc.backward(d["total"])
        disc.step()
        logs.update({f"disc/{k}": float(torch.as_tensor(v).detach()) for k, v in d.items()})
    disc.module.requires_grad_(False)
    try:
        g = gen_losses(fake)
        gen.backward(g["total"])
        gen.step()
    finally:
        disc.module.requires_grad_(True)
    logs.update({k: float(torch.as_tensor(v).detach()) for k, v in g.items()})
    logs["lr"] = float(gen.get_lr()[0])
    norm = gen.get_global_grad_norm()
    if norm is not None:
        logs["grad_norm"] = float(norm)
    return logs


class VAEWithLoss(nn.Module):
    """The VAE and its learned output log-variance: one engine optimises both."""

    def __init__(self, cfg: PipelineConfig):
        super().__init__()
        self.vae = build_vae(cfg)
        self.loss = VAELoss.from_config(cfg.vae_loss)

    def forward(self, mel: Tensor):
        return self.vae(mel)


def vae_parts(cfg: PipelineConfig) -> tuple[nn.Module, nn.Module]:
    return VAEWithLoss(cfg), build_vae_discriminator(cfg)


def vae_step(cfg: PipelineConfig, gen, disc, shard, generator: torch.Generator | None, device: torch.device):
    """The VAE job's step function and batch stream: random mel crops, ELBO + PatchGAN."""
    t = cfg.train_vae
    frames, n_mels = cfg.mel_shape()
    crop = t.crop_frames or frames
    batches = epochs(shard, t.batch_size, t.seed)
    fixed: dict[str, Tensor] = {}

    def batch_iter():
        for b in batches:
            mel, _ = random_crop(stack(b["mel"], (n_mels, frames)), crop, generator)
            fixed.setdefault("mel", mel[:2].clone())
            yield {"mel": mel.to(device)}

    def step(batch: dict, i: int) -> dict[str, float]:
        mel = batch["mel"]
        recon, posterior = gen(mel)
        module: VAEWithLoss = gen.module
        on = module.loss.disc_factor_at(i) > 0

        def d_losses(fake: Tensor) -> dict:
            d = module.loss.discriminator_losses(disc(mel_to_image(mel)), disc(mel_to_image(fake)), i)
            return {**d, "total": d["adv/disc"]}

        def g_losses(fake: Tensor) -> dict:
            frozen = disc.module  # the raw module: the engine would book this backward as its own
            logits = frozen(mel_to_image(fake)) if on else None
            weight = None
            if on:
                # LDM balances the two losses by their gradient norms at the decoder's end.
                # DeepSpeed hooks the engine's outputs, so a second backward through ``fake``
                # would run its gradient reduction mid-step; differentiate a leaf copy instead.
                leaf = fake.detach().requires_grad_(True)
                weight = module.loss.generator_losses(mel, leaf, posterior, frozen(mel_to_image(leaf)), i,
                                                      last_layer=leaf)["adv/weight"]
            return module.loss.generator_losses(mel, fake, posterior, logits, i, adv_weight=weight)

        return gan_update(gen, disc, recon, disc_losses=d_losses if on else None, gen_losses=g_losses)

    def artifacts(i: int, logger: RunLogger) -> None:
        module: VAEWithLoss = gen.module
        with torch.no_grad():
            mel = fixed["mel"].to(device)
            recon = module.vae(mel, sample=False)[0].float().cpu()
        logger.log_image(mel_image([("input", mel[0].cpu().numpy()), ("reconstruction", recon[0].numpy())],
                                   sample_rate=cfg.mel.sample_rate, hop_length=cfg.mel.hop_length),
                         f"samples/step_{i:07d}_mel.png")
        wav = GriffinLimVocoder.from_config(cfg.mel)(recon[:1])[0]  # no trained vocoder yet: a baseline
        logger.log_audio(wav, cfg.mel.sample_rate, f"samples/step_{i:07d}_reconstruction_griffinlim.wav")

    return step, batch_iter(), artifacts


def vocoder_parts(cfg: PipelineConfig) -> tuple[nn.Module, nn.Module]:
    return build_vocoder(cfg, "hifigan"), build_vocoder_discriminator(cfg)


def vocoder_step(cfg: PipelineConfig, gen, disc, shard, generator: torch.Generator | None, device: torch.device):
    """The HiFi-GAN job's step function: aligned mel/waveform segments, mel-L1 + LSGAN + FM."""
    t = cfg.train_vocoder
    frames, n_mels = cfg.mel_shape()
    hop = cfg.mel.hop_length
    mel_fn = MelSpectrogram.from_config(cfg.mel).to(device)
    weights = loss_weights(cfg.vocoder_loss)
    batches = epochs(shard, t.batch_size, t.seed)
    fixed: dict[str, Tensor] = {}

    def batch_iter():
        for b in batches:
            mel = stack(b["mel"], (n_mels, frames))
            wav = stack(b["waveform"], (cfg.clip_samples,))
            mel, wav = random_crop(mel, t.crop_frames or frames, generator, hop=hop, wav=wav)
            fixed.setdefault("mel", mel[:1].clone())
            fixed.setdefault("wav", wav[:1].clone())
            yield {"mel": mel.to(device), "wav": wav.to(device)}

    def step(batch: dict, i: int) -> dict[str, float]:
        fake = gen(batch["mel"])  # (B, N)

        def d_losses(f: Tensor) -> dict:
            d = discriminator_losses(disc, batch["wav"], f)
            return {**d, "total": weighted_sum(d, weights)}

        def g_losses(f: Tensor) -> dict:
            g = generator_losses(disc.module, mel_fn, batch["wav"], f, batch["mel"])  # frozen, raw module
            return {**g, "total": weighted_sum(g, weights)}

        return gan_update(gen, disc, fake, disc_losses=d_losses, gen_losses=g_losses)

    def artifacts(i: int, logger: RunLogger) -> None:
        with torch.no_grad():
            wav = gen.module(fixed["mel"].to(device)).float().cpu()
        vocoded = mel_fn(wav.to(device))[0].cpu().numpy()
        logger.log_image(mel_image([("real", fixed["mel"][0].numpy()), ("vocoded", vocoded)],
                                   sample_rate=cfg.mel.sample_rate, hop_length=hop), f"samples/step_{i:07d}_mel.png")
        logger.log_audio(wav[0], cfg.mel.sample_rate, f"samples/step_{i:07d}_vocoded.wav")

    return step, batch_iter(), artifacts
