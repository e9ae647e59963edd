"""The HiFi-GAN job: aligned mel/waveform segments, mel-L1 + LSGAN + feature matching.

With ``train_vocoder.mask_padding`` the segments are cut inside each clip's real audio and,
where a clip is shorter than a segment, the losses ignore its padding (the generated waveform
there is replaced by the real zeros: :mod:`lafma.vocoder.losses`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lafma.audio import MelSpectrogram
from lafma.models import build_vocoder, build_vocoder_discriminator
from lafma.vocoder import discriminator_losses, generator_losses, loss_weights
from pipelines.config import PipelineConfig
from pipelines.core.tracking import RunLogger, mel_image
from pipelines.train.data import batch_valid, random_crop, unflatten, valid_crop
from pipelines.train.gan import GANTask, Losses, gan_job
from pipelines.train.loop import Job, JobInputs


class VocoderTask(GANTask):
    """The HiFi-GAN generator against its multi-period and multi-scale discriminators."""

    sample_items = 1

    def __init__(self, cfg: PipelineConfig, device: torch.device):
        self.cfg, self.train, self.device = cfg, cfg.train_vocoder, device
        self.hop = cfg.mel.hop_length
        # The mel of the generated waveform, computed like the training mels (mel L1, samples).
        self.mel_fn = MelSpectrogram.from_config(cfg.mel).to(device)
        self.weights = loss_weights(cfg.vocoder_loss)

    def models(self) -> tuple[nn.Module, nn.Module]:
        return build_vocoder(self.cfg, "hifigan"), build_vocoder_discriminator(self.cfg)

    def batch(self, rows: dict[str, np.ndarray]) -> dict[str, Tensor]:
        mel = unflatten(rows["mel"], rows["n_mels"], rows["frames"])  # (B, n_mels, T)
        wav = unflatten(rows["waveform"])  # (B, N)
        if not self.train.mask_padding:
            mel, wav = random_crop(mel, self.train.crop_frames, hop=self.hop, wav=wav)  # (B, n_mels, c), (B, c·hop)
            return {"mel": mel, "wav": wav}
        valid = batch_valid(rows, "valid_samples", wav.shape[-1])  # (B,)
        mel, wav, valid = valid_crop(mel, self.train.crop_frames, valid, self.hop, wav=wav)
        return {"mel": mel, "wav": wav, "valid_samples": valid}  # (B, n_mels, c), (B, c·hop), (B,)

    def forward(self, gen, batch: dict[str, Tensor]) -> dict[str, Any]:
        return {"fake": gen(batch["mel"])}  # (B, N)

    def discriminator_losses(self, generator: nn.Module, disc, batch: dict[str, Tensor], fake: Tensor,
                             step: int) -> Losses:
        return discriminator_losses(disc, batch["wav"], fake, batch.get("valid_samples")), self.weights

    def generator_losses(self, generator: nn.Module, discriminator: Callable[..., Any], batch: dict[str, Tensor],
                         out: dict[str, Any], step: int) -> Losses:
        return generator_losses(discriminator, self.mel_fn, batch["wav"], out["fake"], batch["mel"],
                                batch.get("valid_samples")), self.weights

    def samples(self, generator: nn.Module, batch: dict[str, Tensor], step: int, logger: RunLogger) -> None:
        sr = self.cfg.mel.sample_rate
        with torch.no_grad():
            wav = generator(batch["mel"].to(self.device)).float().cpu()  # (n, N)
        vocoded = self.mel_fn(wav.to(self.device))[0].cpu().numpy()  # (n_mels, T)
        logger.log_image(mel_image([("real", batch["mel"][0].numpy()), ("vocoded", vocoded)],
                                   sample_rate=sr, hop_length=self.hop), f"samples/step_{step:07d}_mel.png")
        logger.log_audio(wav[0], sr, f"samples/step_{step:07d}_vocoded.wav")


def vocoder_job(inputs: JobInputs) -> Job:
    return gan_job(VocoderTask(inputs.cfg, inputs.device), inputs)
