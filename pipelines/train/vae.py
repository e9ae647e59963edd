"""The VAE job: random mel crops, ELBO + adaptively weighted PatchGAN (LDM's recipe)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lafma.models import build_vae, build_vae_discriminator
from lafma.vae import VAELoss, mel_to_image
from lafma.vocoder import GriffinLimVocoder
from pipelines.config import PipelineConfig
from pipelines.core.tracking import RunLogger, mel_image
from pipelines.train.data import random_crop, unflatten
from pipelines.train.gan import GANTask, Losses, gan_job
from pipelines.train.loop import Job, JobInputs


class VAEWithLoss(nn.Module):
    """The VAE and its learned output log-variance: one engine optimises both."""

    def __init__(self, cfg: PipelineConfig):
        super().__init__()
        self.vae = build_vae(cfg)
        self.loss = VAELoss.from_config(cfg.vae_loss)

    def forward(self, mel: Tensor):
        return self.vae(mel)


class VAETask(GANTask):
    """The VAE (with its loss's log-variance) against a PatchGAN on mel images."""

    sample_items = 2

    def __init__(self, cfg: PipelineConfig, device: torch.device):
        self.cfg, self.train, self.device = cfg, cfg.train_vae, device

    def models(self) -> tuple[nn.Module, nn.Module]:
        return VAEWithLoss(self.cfg), build_vae_discriminator(self.cfg)

    def batch(self, rows: dict[str, np.ndarray]) -> dict[str, Tensor]:
        mel = unflatten(rows["mel"], rows["n_mels"], rows["frames"])  # (B, n_mels, T)
        mel, _ = random_crop(mel, self.train.crop_frames)  # (B, n_mels, crop)
        return {"mel": mel}

    def forward(self, gen, batch: dict[str, Tensor]) -> dict[str, Any]:
        recon, posterior = gen(batch["mel"])  # (B, n_mels, T), over (B, C, T / r, n_mels / r)
        return {"fake": recon, "posterior": posterior}

    def adversarial(self, generator: VAEWithLoss, step: int) -> bool:
        return generator.loss.disc_factor_at(step) > 0

    def discriminator_losses(self, generator: VAEWithLoss, disc, batch: dict[str, Tensor], fake: Tensor,
                             step: int) -> Losses:
        loss = generator.loss
        terms = loss.discriminator_losses(disc(mel_to_image(batch["mel"])), disc(mel_to_image(fake)))
        return terms, loss.loss_weights(step)

    def generator_losses(self, generator: VAEWithLoss, discriminator: Callable[..., Any], batch: dict[str, Tensor],
                         out: dict[str, Any], step: int) -> Losses:
        loss, mel, fake, posterior = generator.loss, batch["mel"], out["fake"], out["posterior"]
        logits, weight = None, None
        if self.adversarial(generator, step):
            logits = discriminator(mel_to_image(fake))
            # LDM balances the two losses by their gradient norms at the decoder's end.
            # DeepSpeed hooks the engine's outputs, so a second backward through ``fake``
            # would run its gradient reduction mid-step; differentiate a leaf copy instead.
            leaf = fake.detach().requires_grad_(True)
            weight = loss.generator_losses(mel, leaf, posterior, discriminator(mel_to_image(leaf)), step,
                                           last_layer=leaf)["adv/weight"]
        terms = loss.generator_losses(mel, fake, posterior, logits, step, adv_weight=weight)
        return terms, loss.loss_weights(step, terms["adv/weight"])

    def samples(self, generator: VAEWithLoss, batch: dict[str, Tensor], step: int, logger: RunLogger) -> None:
        mel_cfg = self.cfg.mel
        with torch.no_grad():
            recon = generator.vae(batch["mel"].to(self.device), sample=False)[0].float().cpu()  # (n, n_mels, T)
        logger.log_image(mel_image([("input", batch["mel"][0].numpy()), ("reconstruction", recon[0].numpy())],
                                   sample_rate=mel_cfg.sample_rate, hop_length=mel_cfg.hop_length),
                         f"samples/step_{step:07d}_mel.png")
        wav = GriffinLimVocoder.from_config(mel_cfg)(recon[:1])[0]  # no trained vocoder yet: a baseline
        logger.log_audio(wav, mel_cfg.sample_rate, f"samples/step_{step:07d}_reconstruction_griffinlim.wav")

    def exported(self, generator: VAEWithLoss) -> nn.Module:
        return generator.vae


def vae_job(inputs: JobInputs) -> Job:
    return gan_job(VAETask(inputs.cfg, inputs.device), inputs)
