"""Quick before/after of a recipe change: one job in a plain loop on a finished run's data.

    python benchmarks/recipe.py vae --root .lafma [--steps 300] [--batch 16] [--bf16] [--fd] [--save vae.safetensors] [key=value ...]
    python benchmarks/recipe.py lfm --root .lafma [--vae vae.safetensors] [--steps 500] [--evaluate] [key=value ...]

A whole `make demo` takes a quarter of an hour and one run of it is one draw of the LFM's
training noise; this trains only the job being tuned, for a fixed number of steps, on the
demo's own training rows (the ``audio`` stage's mels for the VAE; for the LFM the ``latents``
stage's latents, or the mels encoded by ``--vae``, with the ``text`` stage's caption
embeddings, all read from ``--root``), with the config's model and optimiser settings plus
the overrides, and scores it on the held-out rows:

- vae: the L1 of the held-out mels' round trip (posterior mean), over all bins and over the
  silent ones (log-mel below -11, i.e. digital silence). ``--fd``: the evaluate stage's
  reference rows on the same held-out clips and embedder: FD of the VAE + vocoder round trip
  and of the vocoder alone against the real clips, and their ratio (issue 11's target: <= 2).
- lfm: the package stage's gate, the held-out flow-matching loss with its randomness fixed
  (``lafma.flow.heldout_fm_loss``), of the EMA weights and of the raw ones. ``--evaluate``:
  the evaluate stage's scores of the EMA model (FD, ``fd_half`` against real vs real,
  attribute accuracy beside the real clips'), generated with the same captions and seeds.

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

    table = storage.read_parquet_dir(directory, columns=[*columns, "split"]).sort_by("id") if "id" in columns else \
        storage.read_parquet_dir(directory, columns=[*columns, "split"])
    return {s: table.filter(pc.equal(table.column("split"), s)) for s in ("train", "validation", "test")}


def progress(step: int, steps: int, start: float) -> None:
    if step % 100 == 0 or step == steps:
        print(f"step {step}/{steps} {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)


def autocast(bf16: bool):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def mels(table):
    from pipelines.train.data import unflatten

    return unflatten(table.column("mel").to_pylist(), table.column("n_mels").to_pylist(),
                     table.column("frames").to_pylist())  # (N, n_mels, T)


class Scorer:
    """The evaluate stage's scoring on the run's held-out clips, with the real and training
    clips embedded once (cached under the root: the embedder and the clips never change)."""

    def __init__(self, cfg, root: Path):
        import numpy as np

        from lafma.metrics import Embedded
        from pipelines.stages.evaluate import (
            HELD_OUT,
            TRAIN_CLIPS,
            attribute_names,
            caption_embeddings,
            embed,
            evaluation_embedder,
            load_clips,
        )

        audio = stage_dir(root, "audio")
        self.cfg, self.sr = cfg, cfg.mel.sample_rate
        self.held = load_clips(audio, HELD_OUT, cfg.evaluate.max_clips)
        self.train = load_clips(audio, ("train",), TRAIN_CLIPS)
        self.embedder = evaluation_embedder(cfg, str(root))
        self._embed = embed
        cache = root / f"recipe-embeddings-{Path(audio).name}.npz"
        if cache.exists():
            z = np.load(cache)
            self.real = Embedded(z["real_fd"], z["real_clips"], z["real_logits"])
            self.train_emb, self.text = z["train_clips"], z["text"]
        else:
            self.real = embed(self.embedder, [c["waveform"] for c in self.held], self.sr)
            self.train_emb = embed(self.embedder, [c["waveform"] for c in self.train], self.sr).clips
            self.text = caption_embeddings(stage_dir(root, "text"),
                                           [c["caption"] for c in self.train] + [c["caption"] for c in self.held])
            np.savez(cache, real_fd=self.real.fd, real_clips=self.real.clips, real_logits=self.real.logits,
                     train_clips=self.train_emb, text=self.text)
        self.names = attribute_names(self.train)

    def seeds(self) -> list[int]:
        from lafma.data.captions import derive_seed

        return [derive_seed(self.cfg.evaluate.seed, c["id"]) for c in self.held]

    def references(self, pipe) -> dict:
        """FD of the vocoder alone and of the VAE + vocoder round trip on the held-out mels."""
        import numpy as np
        import torch

        from lafma.metrics import frechet_distance_from_embeddings

        seeds = self.seeds()
        with torch.no_grad():
            mel = torch.from_numpy(np.stack([c["mel"] for c in self.held]))  # (N, n_mels, T)
            vocoded = [w.numpy() for w in pipe.vocode(mel, seeds)]
            roundtrip = [w.numpy() for w in pipe.vocode(pipe.vae.decode(pipe.vae.encode(mel).mean), seeds)]
        from lafma.metrics.attributes import attribute_accuracy, fit_attribute_classifiers

        fit = fit_attribute_classifiers(torch.from_numpy(self.train_emb),
                                        {a: [c["attributes"].get(a) for c in self.train] for a in self.names})
        held = {a: [c["attributes"].get(a) for c in self.held] for a in self.names}
        out, attrs = {}, {}
        for name, waves in (("vocoder", vocoded), ("roundtrip", roundtrip)):
            e = self._embed(self.embedder, waves, self.sr)
            out[f"{name}_fd"] = frechet_distance_from_embeddings(e.fd, self.real.fd)
            acc = attribute_accuracy(fit, torch.from_numpy(e.clips), held)
            attrs[name] = {a: round(v["accuracy"], 2) for a, v in acc.items()}
        return {**out, "roundtrip_over_vocoder": out["roundtrip_fd"] / out["vocoder_fd"], "attributes": attrs}

    def generated(self, pipe, steps: int, guidance: float, batch: int = 16) -> dict:
        """The evaluate stage's metrics of ``pipe`` on the held-out captions and seeds."""
        import torch

        from lafma.metrics import score_generations

        seeds, waves = self.seeds(), []
        with torch.no_grad():
            for i in range(0, len(self.held), batch):
                part = self.held[i : i + batch]
                gen = pipe.generate([c["caption"] for c in part], seeds=seeds[i : i + batch], steps=steps,
                                    guidance=guidance, duration=self.cfg.audio.clip_seconds)
                waves += list(gen.audio.numpy())
        n = len(self.train)
        scores = score_generations(
            self.real, self._embed(self.embedder, waves, self.sr), train=self.train_emb, train_text=self.text[:n],
            train_captions=[c["caption"] for c in self.train], held_text=self.text[n:],
            train_labels={a: [c["attributes"].get(a) for c in self.train] for a in self.names},
            held_labels={a: [c["attributes"].get(a) for c in self.held] for a in self.names}, seed=self.cfg.evaluate.seed)
        m = scores.metrics
        out = {k.split("/", 1)[1]: round(m[k], 4) for k in ("eval/fd", "eval/fd_half", "ref/real_vs_real/fd",
                                                             "eval/text_audio")}
        out["fd_half_over_real"] = round(m["eval/fd_half"] / m["ref/real_vs_real/fd"], 3)
        out["attributes"] = {k.split("/")[1]: f"{m[k]:.2f}/{m[k.replace('accuracy', 'real_accuracy')]:.2f}"
                             for k in m if k.startswith("attr/") and k.endswith("/accuracy")}
        self.waves = waves
        return out

    def sheet(self, pipe, waves: list, path: str) -> None:
        """The evaluate stage's spectrogram sheet of ``waves`` (generated in held-out order)."""
        import numpy as np
        import torch

        from pipelines.stages.evaluate import spectrogram_sheet

        with torch.no_grad():
            mel = torch.from_numpy(np.stack([c["mel"] for c in self.held]))
            roundtrip = [w.numpy() for w in pipe.vocode(pipe.vae.decode(pipe.vae.encode(mel).mean), self.seeds())]
        Path(path).write_bytes(spectrogram_sheet(self.cfg.mel, self.held, waves, roundtrip))


def vae(cfg, root: Path, steps: int, batch: int, bf16: bool, fd: bool = False, save: str = "") -> dict:
    import torch

    from lafma.models import build_vae
    from lafma.train import warmup_decay
    from lafma.vae import VAELoss
    from pipelines.train.data import random_crop

    parts = rows_by_split(stage_dir(root, "audio"), ["id", "mel", "n_mels", "frames"])
    train, held = mels(parts["train"]), torch.cat([mels(parts["validation"]), mels(parts["test"])])
    model, loss = build_vae(cfg), VAELoss.from_config(cfg.vae_loss)
    t = cfg.train_vae
    opt = torch.optim.Adam([*model.parameters(), *loss.parameters()], lr=t.lr, betas=t.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_decay(t.warmup_steps, steps, t.decay, gamma=t.decay_gamma, every=t.decay_every))
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
        sched.step()
        progress(step, steps, start)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        recon = model(held, sample=False)[0]
    silent = held < SILENT
    out = {"seconds": round(seconds, 1), "samples_per_second": round(steps * batch / seconds, 1),
           "heldout_l1": round(float((recon - held).abs().mean()), 4),
           "silent_l1": round(float((recon - held)[silent].abs().mean()), 4) if silent.any() else None}
    if save:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, save)
    if fd:
        from lafma.models import build_pipeline

        out |= {k: round(v, 3) if isinstance(v, float) else v
                for k, v in Scorer(cfg, root).references(build_pipeline(cfg, vae=model)).items()}
    return out


def latent_rows(cfg, root: Path, vae_weights: str):
    """Per split: (posterior mean, logvar (N, C, T', F'), caption emb (N, L, D), mask (N, L)),
    and the latent scale. From the latents stage, or from the audio stage's mels encoded by
    the VAE in ``vae_weights`` (its scale measured on the training latents as the stage does)."""
    import torch

    from lafma.text import pad_embeddings
    from pipelines.core import storage
    from pipelines.stages.text import caption_key
    from pipelines.train.data import unflatten
    from pipelines.train.lfm import LATENT_DIMS

    out = {}
    if not vae_weights:
        latents = stage_dir(root, "latents")
        scale = cfg.vae.scale_factor or 1.0 / storage.read_json(f"{latents}/_SUCCESS.json")["latent_std"]
        for split, t in rows_by_split(latents, ["id", "mean", "logvar", *LATENT_DIMS, "emb", "length"]).items():
            d = t.to_pydict()
            dims = [d[c] for c in LATENT_DIMS]
            out[split] = (unflatten(d["mean"], *dims), unflatten(d["logvar"], *dims),
                          *pad_embeddings(d["emb"], d["length"], cfg.context_dim))
        return out, scale
    from safetensors.torch import load_file

    from lafma.models import build_vae

    model = build_vae(cfg)
    model.load_state_dict(load_file(vae_weights))
    model.eval()
    texts = {r["caption_key"]: r for r in storage.read_parquet_dir(stage_dir(root, "text"),
                                                                   columns=["caption_key", "emb", "length"]).to_pylist()}
    for split, t in rows_by_split(stage_dir(root, "audio"), ["id", "caption", "mel", "n_mels", "frames"]).items():
        with torch.no_grad():
            post = model.encode(mels(t))
        rows = [texts[caption_key(c)] for c in t.column("caption").to_pylist()]
        out[split] = (post.mean, post.logvar, *pad_embeddings([r["emb"] for r in rows], [r["length"] for r in rows],
                                                              cfg.context_dim))
    return out, cfg.vae.scale_factor or 1.0 / float(out["train"][0].std())


def lfm(cfg, root: Path, steps: int, batch: int, bf16: bool, vae_weights: str = "", evaluate: bool = False,
        save: str = "", load: str = "", sheet: str = "", eval_every: int = 0) -> dict:
    import dataclasses

    import torch

    from lafma.flow import OTPath, heldout_fm_loss
    from lafma.models import build_unet
    from lafma.train import EMA, lfm_loss, warmup_decay
    from lafma.vae import DiagonalGaussian
    from pipelines.core import storage
    from pipelines.train.lfm import null_condition

    data, scale = latent_rows(cfg, root, vae_weights)
    cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, scale_factor=scale))
    mean, logvar, ctx, mask = data["train"]
    texts = storage.read_parquet_dir(stage_dir(root, "text"), columns=["caption", "emb"]).to_pylist()
    null_ctx, null_mask = null_condition(next(r["emb"] for r in texts if r["caption"] == ""), cfg.context_dim)
    t = cfg.train_lfm
    unet = build_unet(cfg)
    if load:  # score saved EMA weights (e.g. under other sampler settings): nothing is trained
        from safetensors.torch import load_file

        unet.load_state_dict(load_file(load))
        steps = 0
    ema = EMA(unet, t.ema_decay)
    opt = torch.optim.Adam(unet.parameters(), lr=t.lr, betas=t.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_decay(t.warmup_steps, steps, t.decay, gamma=t.decay_gamma, every=t.decay_every))
    path, f = OTPath(cfg.flow.sigma_min), cfg.flow
    g = torch.Generator().manual_seed(t.seed)

    def velocity(x, tt, context, context_mask):
        return unet(x, tt, context=context, context_mask=context_mask).float()

    start = time.perf_counter()
    for step in range(1, steps + 1):
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
        progress(step, steps, start)
        if evaluate and eval_every and step % eval_every == 0 and step < steps:
            print(json.dumps({"step": step, **score(cfg, root, ema.model, vae_weights)}), file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    if save:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ema.model.state_dict().items()}, save)
    held = data["validation"] if len(data["validation"][0]) else data["test"]

    def held_batches():
        for i in range(0, len(held[0]), 16):
            yield held[0][i : i + 16] * scale, {"context": held[2][i : i + 16], "context_mask": held[3][i : i + 16]}

    with torch.no_grad():
        scores = {name: heldout_fm_loss(m.eval(), held_batches(), path, times=cfg.generate.gate_times)
                  for name, m in (("ema", ema.model), ("raw", unet))}
    out = {"seconds": round(seconds, 1), "samples_per_second": round(steps * batch / max(seconds, 1e-9), 1),
           **{f"heldout_fm_loss_{k}": round(v, 4) for k, v in scores.items()}}
    if evaluate:
        t0 = time.perf_counter()
        out |= score(cfg, root, ema.model, vae_weights, sheet)
        out["evaluate_seconds"] = round(time.perf_counter() - t0, 1)
    return out


_SCORERS: dict = {}


def score(cfg, root: Path, unet, vae_weights: str, sheet: str = "") -> dict:
    """:meth:`Scorer.generated` of ``unet`` (eval mode) with the run's (or ``vae_weights``') VAE."""
    from safetensors.torch import load_file

    from lafma.models import build_pipeline, build_vae

    vae_model = build_vae(cfg)
    vae_model.load_state_dict(load_file(vae_weights or f"{stage_dir(root, 'train_vae')}/vae.safetensors"))
    pipe = build_pipeline(cfg, unet=unet, vae=vae_model)
    if str(root) not in _SCORERS:  # the held-out and training clips are embedded once per run
        _SCORERS[str(root)] = Scorer(cfg, root)
    scorer = _SCORERS[str(root)]
    training = unet.training
    out = scorer.generated(pipe, cfg.sampler.steps, cfg.sampler.guidance)  # build_pipeline set eval mode
    unet.train(training)
    if sheet:
        scorer.sheet(pipe, scorer.waves, sheet)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", choices=["vae", "lfm"])
    p.add_argument("--root", default=str(ROOT / ".lafma"), help="a finished run's storage root")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--steps", type=int, default=0, help="0: the job's train_*.steps")
    p.add_argument("--batch", type=int, default=0, help="0: the job's batch_size x num_workers (the demo's global batch)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (weights stay fp32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fd", action="store_true", help="vae: FD of the round trip and of the vocoder alone")
    p.add_argument("--save", default="", help="write the trained (lfm: EMA) weights here (safetensors)")
    p.add_argument("--load", default="", help="lfm: score these EMA weights instead of training")
    p.add_argument("--vae", default="", help="lfm: encode the mels with these VAE weights instead of the latents stage's")
    p.add_argument("--evaluate", action="store_true", help="lfm: the evaluate stage's scores of the EMA model")
    p.add_argument("--eval-every", type=int, default=0, help="lfm --evaluate: also score every N steps (to stderr)")
    p.add_argument("--sheet", default="", help="lfm --evaluate: write the spectrogram sheet (PNG) here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args()  # flags and key=value overrides in any order

    import torch

    from pipelines.config import load_pipeline_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_pipeline_config(args.config, args.overrides)
    t = cfg.train_vae if args.job == "vae" else cfg.train_lfm
    batch = args.batch or t.batch_size * t.num_workers
    steps = args.steps or t.steps
    root = Path(args.root)
    if args.job == "vae":
        result = vae(cfg, root, steps, batch, args.bf16, fd=args.fd, save=args.save)
    else:
        result = lfm(cfg, root, steps, batch, args.bf16, vae_weights=args.vae, evaluate=args.evaluate,
                     save=args.save, load=args.load, sheet=args.sheet,
                     eval_every=args.eval_every)
    print(json.dumps({"job": args.job, "steps": steps, "batch": batch, "bf16": args.bf16,
                      "overrides": args.overrides, **result}))


if __name__ == "__main__":
    main()
