"""Quick before/after of a recipe change: one job in a plain loop on a finished run's data.

    python benchmarks/recipe.py vae --root .lafma [--steps 300] [--batch 16] [--bf16] [key=value ...]
    python benchmarks/recipe.py lfm --root .lafma [--steps 300] [--batch 32] [--bf16] [key=value ...]

A whole `make demo` takes 13 minutes and one run of it is one draw of the LFM's training
noise; this trains only the job being tuned, for a fixed number of steps, on the demo's own
training rows (the ``audio`` stage's mels for the VAE, the ``latents`` stage's latents and
caption embeddings for the LFM, read from ``--root``), with the config's model and optimiser
settings plus the overrides, and scores it on the held-out rows:

- vae: the L1 of the held-out mels' round trip (posterior mean), over all bins and over the
  silent ones (log-mel below -11, i.e. digital silence: the floor the demo VAE used to add).
- lfm: the package stage's gate, the held-out flow-matching loss with its randomness fixed
  (``lafma.flow.heldout_fm_loss``), of the EMA weights and of the raw ones.

Runs with the same seed and settings train the same weights, so two runs differ only by the
change under test. Results: benchmarks/results/demo_cpu2.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SILENT = -11.0  # log-mel below this is digital silence (log 1e-5 = -11.5)


def stage_dir(root: Path, stage: str) -> str:
    """The newest output folder of ``stage`` under the run's data folder."""
    found = sorted((root / "data").glob(f"*/{stage}-*/_SUCCESS.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no finished {stage} stage under {root}/data: run `make demo` (or run_all.py) first")
    return str(found[-1].parent)


def rows_by_split(directory: str, columns: list[str]):
    import pyarrow.compute as pc

    from pipelines.core import storage

    table = storage.read_parquet_dir(directory, columns=[*columns, "split"])
    return {s: table.filter(pc.equal(table.column("split"), s)) for s in ("train", "validation", "test")}


def autocast(bf16: bool):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def vae(cfg, root: Path, steps: int, batch: int, bf16: bool) -> dict:
    import torch

    from lafma.models import build_vae
    from lafma.vae import VAELoss
    from pipelines.train.data import random_crop, unflatten

    parts = rows_by_split(stage_dir(root, "audio"), ["mel", "n_mels", "frames"])

    def mels(t):
        return unflatten(t.column("mel").to_pylist(), t.column("n_mels").to_pylist(), t.column("frames").to_pylist())

    train, held = mels(parts["train"]), torch.cat([mels(parts["validation"]), mels(parts["test"])])
    model, loss = build_vae(cfg), VAELoss.from_config(cfg.vae_loss)
    t = cfg.train_vae
    opt = torch.optim.Adam([*model.parameters(), *loss.parameters()], lr=t.lr, betas=t.betas)
    g = torch.Generator().manual_seed(t.seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x, _ = random_crop(train[torch.randint(0, len(train), (batch,), generator=g)], t.crop_frames)
        with autocast(bf16):
            recon, posterior = model(x)
        terms = loss.generator_losses(x, recon.float(), posterior, None, step)
        total = terms["rec/nll"] + loss.kl_weight * terms["kl"]
        opt.zero_grad()
        total.backward()
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        recon = model(held, sample=False)[0]
    silent = held < SILENT
    return {"samples_per_second": round(steps * batch / seconds, 1), "heldout_l1": round(float((recon - held).abs().mean()), 4),
            "silent_l1": round(float((recon - held)[silent].abs().mean()), 4) if silent.any() else None}


def lfm(cfg, root: Path, steps: int, batch: int, bf16: bool) -> dict:
    import dataclasses

    import torch

    from lafma.flow import OTPath, heldout_fm_loss
    from lafma.models import build_unet
    from lafma.text import pad_embeddings
    from lafma.train import EMA, lfm_loss, warmup_decay
    from lafma.vae import DiagonalGaussian
    from pipelines.core import storage
    from pipelines.stages.release import heldout_batches
    from pipelines.train.data import unflatten
    from pipelines.train.lfm import LATENT_DIMS, null_condition

    latents = stage_dir(root, "latents")
    # The scale the latents stage measured (vae.scale_factor: 0 in the demo).
    scale = cfg.vae.scale_factor or 1.0 / storage.read_json(f"{latents}/_SUCCESS.json")["latent_std"]
    cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, scale_factor=scale))
    parts = rows_by_split(latents, ["mean", "logvar", *LATENT_DIMS, "emb", "length"])
    train = parts["train"].to_pydict()
    dims = [train[c] for c in LATENT_DIMS]
    mean, logvar = unflatten(train["mean"], *dims), unflatten(train["logvar"], *dims)
    ctx, mask = pad_embeddings(train["emb"], train["length"], cfg.context_dim)
    texts = storage.read_parquet_dir(stage_dir(root, "text"), columns=["caption", "emb"]).to_pylist()
    null_ctx, null_mask = null_condition(next(r["emb"] for r in texts if r["caption"] == ""), cfg.context_dim)
    t = cfg.train_lfm
    unet = build_unet(cfg)
    ema = EMA(unet, t.ema_decay)
    opt = torch.optim.Adam(unet.parameters(), lr=t.lr, betas=t.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay(t.warmup_steps, t.steps, t.decay))
    path, f = OTPath(cfg.flow.sigma_min), cfg.flow
    g = torch.Generator().manual_seed(t.seed)

    def velocity(x, tt, context, context_mask):
        return unet(x, tt, context=context, context_mask=context_mask).float()

    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(mean), (batch,), generator=g)
        z = DiagonalGaussian(mean[idx], logvar[idx]).sample() * scale
        with autocast(bf16):
            loss, _ = lfm_loss(velocity, z, ctx[idx], mask[idx], path=path, null_context=null_ctx, null_mask=null_mask,
                               cond_dropout=f.cond_dropout, t_sampling=f.t_sampling, t_mean=f.t_mean, t_std=f.t_std)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        ema.update(unet)
    seconds = time.perf_counter() - start
    held = parts["validation"] if parts["validation"].num_rows else parts["test"]
    with torch.no_grad():
        scores = {name: heldout_fm_loss(m.eval(), heldout_batches(held, cfg, torch.device("cpu")), path,
                                        times=cfg.generate.gate_times) for name, m in (("ema", ema.model), ("raw", unet))}
    return {"samples_per_second": round(steps * batch / seconds, 1),
            **{f"heldout_fm_loss_{k}": round(v, 4) for k, v in scores.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", choices=["vae", "lfm"])
    p.add_argument("--root", default=str(ROOT / ".lafma"), help="a finished run's storage root")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=0, help="0: the job's batch_size x num_workers (the demo's global batch)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (weights stay fp32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args()  # flags and key=value overrides in any order

    import torch

    from pipelines.config import load_pipeline_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_pipeline_config(args.config, args.overrides)
    t = cfg.train_vae if args.job == "vae" else cfg.train_lfm
    batch = args.batch or t.batch_size * t.num_workers
    result = (vae if args.job == "vae" else lfm)(cfg, Path(args.root), args.steps, batch, args.bf16)
    print(json.dumps({"job": args.job, "steps": args.steps, "batch": batch, "bf16": args.bf16,
                      "overrides": args.overrides, **result}))


if __name__ == "__main__":
    main()
