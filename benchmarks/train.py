"""Training throughput and peak memory of each job's step, at a given config.

    python benchmarks/train.py --config configs/lafma_audiocaps.yaml [--jobs vae,vocoder,lfm]
        [--steps 20] [--warmup 3] [key=value ...]

Each job runs in its own process (so its peak memory is its own) on one device with a
1-rank process group, through the same DeepSpeed engines and step functions as the real
jobs, on random batches of the configured shapes (throughput does not depend on content).
On a GPU it also prints the LFM's model-FLOPs utilisation: FLOPs of one forward+backward
counted by ``torch.utils.flop_counter`` against the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16 peak FLOP/s by device name fragment (vendor datasheets).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


class RandomShard:
    """Stands in for a Ray Train dataset shard: endless random batches of the right shapes."""

    def __init__(self, columns: dict[str, tuple[int, ...]]):
        self.columns = columns

    def iter_batches(self, batch_size: int, **_):
        import numpy as np

        rng = np.random.default_rng(0)
        while True:
            batch = {k: (rng.standard_normal((batch_size, *shape)).astype(np.float32) * 0.1 if shape
                         else np.full(batch_size, 0)) for k, shape in self.columns.items()}
            if "length" in batch:
                batch["length"] = np.full(batch_size, self.text_len)
            yield batch


def run_job(job: str, config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    import torch
    import torch.distributed as dist

    from pipelines.config import load_pipeline_config
    from pipelines.train.gan import vae_parts, vae_step, vocoder_parts, vocoder_step
    from pipelines.train.lfm import lfm_step
    from pipelines.train.worker import SECTIONS, _engine

    cfg = load_pipeline_config(config, overrides)
    t = getattr(cfg, SECTIONS[job])
    cuda = torch.cuda.is_available()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("BENCH_PORT", "29511"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = t.precision == "bf16" or (t.precision == "auto" and cuda)
    frames, n_mels = cfg.mel_shape()
    if job == "lfm":
        from lafma.models import build_unet
        from lafma.train import EMA

        shard = RandomShard({"mean": (int(torch.tensor(cfg.latent_shape()).prod()),),
                             "logvar": (int(torch.tensor(cfg.latent_shape()).prod()),),
                             "emb": (32 * cfg.context_dim,), "length": ()})
        shard.text_len = 32  # a typical AudioCaps caption in T5 tokens
        engine = _engine(build_unet(cfg), t, t.lr, bf16)
        ema = EMA(engine.module, t.ema_decay).to(device)
        null = (torch.zeros(1, 1, cfg.context_dim), torch.ones(1, 1, dtype=torch.bool))
        step, batches, _ = lfm_step(cfg, engine, ema, shard, None, device, null)
        params = sum(p.numel() for p in engine.module.parameters())
    else:
        shard = RandomShard({"mel": (n_mels * frames,), "waveform": (cfg.clip_samples,)})
        gen, disc = (vae_parts if job == "vae" else vocoder_parts)(cfg)
        gen_e, disc_e = _engine(gen, t, t.lr, bf16), _engine(disc, t, t.disc_lr or t.lr, bf16)
        step, batches, _ = (vae_step if job == "vae" else vocoder_step)(cfg, gen_e, disc_e, shard, None, device)
        engine = gen_e
        params = sum(p.numel() for p in gen.parameters()) + sum(p.numel() for p in disc.parameters())
    for i in range(1, warmup + 1):
        step(next(batches), i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(warmup + 1, warmup + steps + 1):
        step(next(batches), i)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out = {"job": job, "device": torch.cuda.get_device_name() if cuda else f"cpu x{os.cpu_count()}",
           "precision": "bf16" if bf16 else "fp32", "zero_stage": t.zero_stage, "batch_per_device": t.batch_size,
           "params_trained": params, "samples_per_second": round(steps * t.batch_size / elapsed, 3),
           "seconds_per_step": round(elapsed / steps, 4)}
    if cuda:
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    out["peak_host_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if job == "lfm" and cuda:
        out.update(mfu(cfg, engine.module, t.batch_size, device, out["samples_per_second"]))
    return out


def mfu(cfg, unet, batch: int, device, samples_per_second: float) -> dict:
    """Model FLOPs of one forward+backward per sample, and their share of the device's peak."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, *cfg.latent_shape(), device=device, requires_grad=False)
    t = torch.rand(batch, device=device)
    ctx = torch.randn(batch, 32, cfg.context_dim, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16), FlopCounterMode(display=False) as counter:
        unet(x, t, ctx).float().pow(2).mean().backward()
    flops_per_sample = counter.get_total_flops() / batch
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    res = {"model_tflops_per_sample": round(flops_per_sample / 1e12, 4),
           "achieved_tflops": round(flops_per_sample * samples_per_second / 1e12, 2)}
    if peak:
        res["mfu"] = round(flops_per_sample * samples_per_second / peak, 4)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--jobs", default="vae,vocoder,lfm")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job in this process
    p.add_argument("--out", default="", help="also write the results as JSON here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    if args.job:
        print("RESULT " + json.dumps(run_job(args.job, args.config, args.overrides, args.steps, args.warmup)))
        return
    results = []
    for i, job in enumerate(args.jobs.split(",")):
        cmd = [sys.executable, __file__, "--job", job, "--config", args.config, "--steps", str(args.steps),
               "--warmup", str(args.warmup), *args.overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BENCH_PORT": str(29511 + i)})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{job}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        res = json.loads(line[7:])
        results.append(res)
        print(" ".join(f"{k}={v}" for k, v in res.items()), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                              "results": results}, indent=2))


if __name__ == "__main__":
    main()
