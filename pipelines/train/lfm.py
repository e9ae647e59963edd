"""The LFM job: flow matching on VAE latents joined with caption embeddings, with an EMA.

With ``train_lfm.mask_padding`` the loss averages over each latent's frames of real audio
(the latents table's ``valid_frames``; a table written before that column existed counts every
frame as real), so the model is not taught the padding of short clips as their content.

With ``train_lfm.variable_duration`` each step's batch is cut to a crop drawn from the job's seed
and the step, up to the whole clip, and the UNet is told the crop's duration
(:mod:`lafma.train.duration`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from lafma.config import MelConfig
from lafma.flow import OTPath
from lafma.models import build_unet, build_vae, build_vocoder
from lafma.pipeline import sample_latents
from lafma.text import pad_embeddings
from lafma.train import EMA, lfm_loss
from lafma.train.duration import crop_latents, draw_crop, mask_seconds
from lafma.train.objectives import valid_mask
from lafma.vae import DiagonalGaussian
from pipelines.core.tracking import RunLogger, mel_image
from pipelines.train.data import epochs, unflatten
from pipelines.train.loop import Job, JobInputs
from pipelines.train.weights import load_weights

# The latents table's shape columns: each row's (C, T', F').
LATENT_DIMS = ("latent_channels", "latent_frames", "latent_bins")


def null_condition(embedding: Sequence[float], dim: int) -> tuple[Tensor, Tensor]:
    """The empty caption's flat embedding → (embedding (1, L0, D), mask (1, L0))."""
    emb = torch.tensor(list(embedding)).reshape(1, -1, dim)  # (L0 · D,) -> (1, L0, D)
    return emb, torch.ones(1, emb.shape[1], dtype=torch.bool)


def lfm_job(inputs: JobInputs) -> Job:
    """The UNet's engine, its EMA, the latent batch stream, the step and the samples.

    ``inputs.extra`` holds ``null_emb`` (the empty caption's flat embedding) and, optionally,
    ``vae_weights`` and ``vocoder_weights`` (without them the samples are latents only) and
    ``init_weights`` (the UNet's starting weights).
    """
    cfg, device, extra = inputs.cfg, inputs.device, inputs.extra
    t, s = cfg.train_lfm, cfg.sampler
    unet = build_unet(cfg)
    if extra.get("init_weights"):  # fine-tuning: the UNet and so its EMA start from them
        unet.load_state_dict(load_weights(extra["init_weights"]))
    engine = inputs.engine(unet, t, t.lr, inputs.bf16)
    ema = EMA(engine.module, t.ema_decay).to(device)
    decoder = vocoder = None
    if extra.get("vae_weights"):
        vae = build_vae(cfg)
        vae.load_state_dict(load_weights(extra["vae_weights"]))
        decoder = vae.to(device).eval().decode
    if extra.get("vocoder_weights"):
        vocoder = build_vocoder(cfg)
        vocoder.load_state_dict(load_weights(extra["vocoder_weights"]))
        vocoder.eval()
    null_ctx, null_mask = (x.to(device) for x in null_condition(extra["null_emb"], cfg.context_dim))
    path = OTPath(cfg.flow.sigma_min)
    scale = cfg.vae.scale_factor
    kept: dict[str, Tensor] = {}

    def batches() -> Iterator[dict[str, Tensor]]:
        for rows in epochs(inputs.shard, t.batch_size, t.seed):
            dims = [rows[c] for c in LATENT_DIMS]
            posterior = DiagonalGaussian(unflatten(rows["mean"], *dims), unflatten(rows["logvar"], *dims))
            # Sample the posterior each time the clip is seen (as LDMs do): cheap augmentation.
            z = posterior.sample()  # (B, C, T', F')
            ctx, mask = pad_embeddings(rows["emb"], rows["length"], cfg.context_dim)  # (B, L, D), (B, L)
            if not kept:  # the first batch's first two items: the same captions in every sample
                kept.update(ctx=ctx[:2].clone(), mask=mask[:2].clone(), latent=posterior.mean[:2].clone())
            batch = {"x1": (z * scale).to(device), "ctx": ctx.to(device), "mask": mask.to(device)}
            if "valid_frames" in rows:  # absent from older tables: every frame is real
                batch["valid"] = torch.as_tensor(rows["valid_frames"], dtype=torch.long)  # (B,) latent frames
                if t.mask_padding:
                    batch["frame_mask"] = valid_mask(batch["valid"], z.shape[2]).to(device)  # (B, T')
            yield batch

    def step(batch: dict[str, Tensor], i: int) -> dict[str, float]:
        def velocity(x, tt, context, context_mask, **extra):
            return engine(x, tt, context=context, context_mask=context_mask, **extra)

        x1, frame_mask, seconds = batch["x1"], batch.get("frame_mask"), None
        if t.variable_duration:  # this step's crop: a function of the seed and the step only
            crop = draw_crop(t.seed, i, x1.shape[0], x1.shape[2], cfg.unet.downsample, batch.get("valid"))
            x1, frame_mask = crop_latents(x1, crop, frame_mask)  # (B, C, grid, F'), (B, grid)
        if cfg.unet.duration_embedding:  # told what each item holds: its crop, or its real audio
            held = torch.ones(x1.shape[0], x1.shape[2], dtype=torch.bool, device=device) if frame_mask is None \
                else frame_mask
            seconds = mask_seconds(held, cfg.latent_seconds)  # (B,)
        loss, logs = lfm_loss(velocity, x1, batch["ctx"], batch["mask"], path=path, null_context=null_ctx,
                              null_mask=null_mask, cond_dropout=cfg.flow.cond_dropout,
                              t_sampling=cfg.flow.t_sampling, t_mean=cfg.flow.t_mean, t_std=cfg.flow.t_std,
                              frame_mask=frame_mask, duration=seconds)
        engine.backward(loss)
        updates = engine.global_steps
        engine.step()
        if engine.global_steps > updates:  # an optimiser step happened (every grad_accum micro-batches)
            ema.update(engine.module)
        norm = engine.get_global_grad_norm()
        return {"loss/fm": float(loss.detach()), "lr": float(engine.get_lr()[0]), **logs,
                **({"grad_norm": float(norm)} if norm is not None else {})}

    def artifacts(i: int, logger: RunLogger) -> None:
        latent = kept["latent"]  # (n, C, T', F') posterior means
        # Fixed noise: the samples of successive steps differ only by the model.
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0)).to(device)
        # A UNet conditioned on duration makes the whole clip, as the reference is.
        seconds = torch.full((latent.shape[0],), latent.shape[2] * cfg.latent_seconds) if cfg.unet.duration_embedding \
            else None
        with torch.no_grad():
            sol = sample_latents(ema.model, noise, kept["ctx"].to(device), kept["mask"].to(device),
                                 guidance=s.guidance, null_condition=(null_ctx, null_mask), solver=s.solver,
                                 steps=s.steps, rtol=s.rtol, atol=s.atol,
                                 grid=s.grid if s.solver == "euler" else "uniform", duration=seconds)
        rmse = (sol.x.float().cpu() - latent * scale).pow(2).mean().sqrt()
        logger.log_metrics({"sample/latent_rmse": float(rmse)}, step=i)
        if decoder is not None:
            _log_decoded(decoder, vocoder, sol.x.float() / scale, latent.to(device), i, logger, cfg.mel)

    return Job({"unet": engine}, step, batches(), t.batch_size, final_weights=lambda: ema.model.state_dict(),
               extra_state=lambda: {"ema": ema.state_dict()},
               load_extra_state=lambda state: state.get("ema") and ema.load_state_dict(state["ema"]),
               artifacts=artifacts)


def _log_decoded(decoder: Callable[[Tensor], Tensor], vocoder: nn.Module | None, generated: Tensor,
                 reference: Tensor, step: int, logger: RunLogger, mel_cfg: MelConfig) -> None:
    """The generated and the reference latents (B, C, T', F', unscaled) as mels, the first as audio."""
    with torch.no_grad():
        mel = decoder(generated).float().cpu()  # (n, n_mels, T)
        real = decoder(reference).float().cpu()
    logger.log_image(mel_image([("generated", mel[0].numpy()), ("reference (decoded latent)", real[0].numpy())],
                               sample_rate=mel_cfg.sample_rate, hop_length=mel_cfg.hop_length),
                     f"samples/step_{step:07d}_mel.png")
    if vocoder is not None:
        with torch.no_grad():
            wav = vocoder(mel)[0].float()  # the vocoder stays on the CPU: one clip is cheap
        logger.log_audio(wav, mel_cfg.sample_rate, f"samples/step_{step:07d}_generated.wav")
