"""The LFM job: flow matching on VAE latents joined with caption embeddings, with an EMA."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lafma.flow import ClassifierFreeGuidance, OTPath, solve
from lafma.text import pad_embeddings
from lafma.train import EMA, lfm_loss
from pipelines.config import PipelineConfig
from pipelines.core.tracking import RunLogger, mel_image
from pipelines.train.data import epochs


def lfm_step(cfg: PipelineConfig, engine, ema: EMA, shard, generator: torch.Generator | None, device: torch.device,
             null: tuple[Tensor, Tensor], decoder=None, vocoder=None):
    """The LFM job's step function, batch stream and artifacts.

    Args:
        engine: the UNet's DeepSpeed engine; ema: its EMA (used for samples and export).
        null: the empty caption's (embedding (1, L0, D), mask (1, L0)).
        decoder: the trained VAE's ``decode`` on ``device``; vocoder: a CPU vocoder. Both optional.
    """
    t = cfg.train_lfm
    shape = cfg.latent_shape()
    dim = cfg.context_dim
    path = OTPath(cfg.flow.sigma_min)
    null_ctx, null_mask = null[0].to(device), null[1].to(device)
    batches = epochs(shard, t.batch_size, t.seed)
    fixed: dict[str, Tensor] = {}

    def batch_iter():
        for b in batches:
            mean = torch.from_numpy(np.stack(b["mean"]).astype(np.float32)).reshape(-1, *shape)
            logvar = torch.from_numpy(np.stack(b["logvar"]).astype(np.float32)).reshape(-1, *shape)
            # Sample the posterior each time the clip is seen (as LDMs do): cheap augmentation.
            z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape, generator=generator)
            ctx, mask = pad_embeddings(b["emb"], b["length"], dim)
            if "ctx" not in fixed:
                fixed.update(ctx=ctx[:2].clone(), mask=mask[:2].clone(), latent=mean[:2].clone())
            yield {"x1": (z * cfg.vae.scale_factor).to(device), "ctx": ctx.to(device), "mask": mask.to(device)}

    def step(batch: dict, i: int) -> dict[str, float]:
        def velocity(x, tt, context, context_mask):
            return engine(x, tt, context=context, context_mask=context_mask)

        loss, logs = lfm_loss(velocity, batch["x1"], batch["ctx"], batch["mask"], path=path, null_context=null_ctx,
                              null_mask=null_mask, cond_dropout=cfg.flow.cond_dropout, generator=None)
        engine.backward(loss)
        updates = engine.global_steps
        engine.step()
        if engine.global_steps > updates:  # an optimiser step happened (every grad_accum micro-batches)
            ema.update(engine.module)
        norm = engine.get_global_grad_norm()
        return {"loss/fm": float(loss), "lr": float(engine.get_lr()[0]), **logs,
                **({"grad_norm": float(norm)} if norm is not None else {})}

    def artifacts(i: int, logger: RunLogger) -> None:
        s = cfg.sampler
        velocity = ClassifierFreeGuidance(ema.model, s.guidance, null_ctx, null_mask)
        n = fixed["ctx"].shape[0]
        noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            sol = solve(velocity, noise, method=s.solver, steps=s.steps, context=fixed["ctx"].to(device),
                        context_mask=fixed["mask"].to(device))
        logger.log_metrics({"sample/latent_rmse": float((sol.x.float().cpu() - fixed["latent"] * cfg.vae.scale_factor)
                                                        .pow(2).mean().sqrt())}, step=i)
        if decoder is None:
            return
        with torch.no_grad():
            mel = decoder(sol.x.float() / cfg.vae.scale_factor).float().cpu()  # (n, n_mels, T)
            real = decoder(fixed["latent"].to(device)).float().cpu()
        logger.log_image(mel_image([("generated", mel[0].numpy()), ("reference (decoded latent)", real[0].numpy())],
                                   sample_rate=cfg.mel.sample_rate, hop_length=cfg.mel.hop_length),
                         f"samples/step_{i:07d}_mel.png")
        if vocoder is not None:
            with torch.no_grad():
                wav = vocoder(mel)[0].float()  # the vocoder stays on the CPU: one clip is cheap
            logger.log_audio(wav, cfg.mel.sample_rate, f"samples/step_{i:07d}_generated.wav")

    return step, batch_iter(), artifacts
