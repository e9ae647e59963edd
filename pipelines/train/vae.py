"""The VAE job: random mel crops, ELBO + adaptively weighted PatchGAN (LDM's recipe).

With ``train_vae.mask_padding`` the crops stay inside each clip's real audio, the
reconstruction counts real frames only, and the discriminator sees the reconstruction with
its padded frames replaced by the input's, so the VAE is never asked to reproduce padding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lafma.models import build_vae, build_vae_discriminator
from lafma.train.objectives import fill_padding, valid_frames, valid_mask
from lafma.vae import VAELoss, mel_to_image
from lafma.vocoder import GriffinLimVocoder
from pipelines.config import PipelineConfig
from pipelines.core.tracking import RunLogger, mel_image
from pipelines.train.data import batch_valid, random_crop, unflatten, valid_crop
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
        if not self.train.mask_padding:
            mel, _ = random_crop(mel, self.train.crop_frames)  # (B, n_mels, crop)
            return {"mel": mel}
        hop = self.cfg.mel.hop_length
        valid = batch_valid(rows, "valid_samples", mel.shape[-1] * hop)  # (B,) samples
        mel, _, valid = valid_crop(mel, self.train.crop_frames, valid, hop)  # (B, n_mels, crop), (B,)
        return {"mel": mel, "valid_frames": valid_frames(valid, hop, mel.shape[-1])}

    @staticmethod
    def mask(batch: dict[str, Tensor]) -> Tensor | None:
        """(B, T) bool, True on the batch's real mel frames; None without ``mask_padding``."""
        if "valid_frames" not in batch:
            return None
        return valid_mask(batch["valid_frames"].to(batch["mel"].device), batch["mel"].shape[-1])

    def judged(self, fake: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """What the discriminator sees of ``fake``: (B, 1, T, n_mels), the input's own padding."""
        mask = self.mask(batch)
        return mel_to_image(fill_padding(fake, batch["mel"], None if mask is None else mask[:, None, :]))

    def forward(self, gen, batch: dict[str, Tensor]) -> dict[str, Any]:
        recon, posterior = gen(batch["mel"])  # (B, n_mels, T), over (B, C, T / r, n_mels / r)
        return {"fake": recon, "posterior": posterior}

    def adversarial(self, generator: VAEWithLoss, step: int) -> bool:
        return generator.loss.disc_factor_at(step) > 0

    def discriminator_losses(self, generator: VAEWithLoss, disc, batch: dict[str, Tensor], fake: Tensor,
                             step: int) -> Losses:
        loss = generator.loss
        terms = loss.discriminator_losses(disc(mel_to_image(batch["mel"])), disc(self.judged(fake, batch)))
        return terms, loss.loss_weights(step)

    def generator_losses(self, generator: VAEWithLoss, discriminator: Callable[..., Any], batch: dict[str, Tensor],
                         out: dict[str, Any], step: int) -> Losses:
        loss, mel, fake, posterior = generator.loss, batch["mel"], out["fake"], out["posterior"]
        mask = self.mask(batch)
        logits, weight = None, None
        if self.adversarial(generator, step):
            logits = discriminator(self.judged(fake, batch))
            # LDM balances the two losses by their gradient norms at the decoder's end.
            # DeepSpeed hooks the engine's outputs, so a second backward through ``fake``
            # would run its gradient reduction mid-step; differentiate a leaf copy instead.
            leaf = fake.detach().requires_grad_(True)
            weight = loss.generator_losses(mel, leaf, posterior, discriminator(self.judged(leaf, batch)), step,
                                           last_layer=leaf, mask=mask)["adv/weight"]
        terms = loss.generator_losses(mel, fake, posterior, logits, step, adv_weight=weight, mask=mask)
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
