"""Training throughput and peak memory of each job's step, at a given config, against a plain loop.

    python benchmarks/train.py --config configs/lafma_audiocaps.yaml [--jobs vae,vocoder,lfm]
        [--steps 20] [--warmup 3] [--threads N] [--precision fp32,bf16] [key=value ...]

Each job runs in its own process (so its peak memory is its own) on one device with a
1-rank process group, built by its entry in ``pipelines.train.jobs.JOBS`` like the real jobs
(the same engines, batch stream and step), on random batches of the configured shapes
(throughput does not depend on content).

On a CPU the same process then builds the job again on ``PlainEngine`` (``torch.optim``, no
DeepSpeed, no process group) and times the same step on batches already in memory: that is
the plain single-process PyTorch loop, and ``harness_over_plain`` is the harness's
throughput divided by it (what DeepSpeed and the batch stream cost; the issue's floor is
0.85). ``--precision fp32,bf16`` runs each job in both and prints ``bf16_over_fp32``: whether
bf16 autocast pays for that job on this CPU (it needs native bf16; see
``pipelines.train.engines.use_bf16``).
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
    """Stands in for a Ray Train dataset shard: endless random batches of the right shapes.

    Args:
        floats: flat float columns and their per-row length (random values).
        ints: integer columns and their value in every row (shapes, caption lengths).
    """

    def __init__(self, floats: dict[str, int], ints: dict[str, int]):
        self.floats, self.ints = floats, ints

    def iter_batches(self, batch_size: int, **_):
        import numpy as np

        rng = np.random.default_rng(0)
        while True:
            batch = {k: rng.standard_normal((batch_size, n)).astype(np.float32) * 0.1 for k, n in self.floats.items()}
            yield {**batch, **{k: np.full(batch_size, v, np.int32) for k, v in self.ints.items()}}


def random_shard(cfg, job: str, text_len: int = 32) -> RandomShard:
    """Random rows with the columns ``job`` reads, shaped as the config's clips would be."""
    frames, n_mels = cfg.mel_shape()
    if job == "lfm":
        c, t, f = cfg.latent_shape()
        return RandomShard({"mean": c * t * f, "logvar": c * t * f, "emb": text_len * cfg.context_dim},
                           {"latent_channels": c, "latent_frames": t, "latent_bins": f, "length": text_len})
    return RandomShard({"mel": n_mels * frames, "waveform": cfg.clip_samples}, {"n_mels": n_mels, "frames": frames})


def run_job(job: str, config: str, overrides: list[str], steps: int, warmup: int, threads: int) -> dict:
    """The job's step through the harness (its DeepSpeed engines and batch stream) and, on a
    CPU, the same model, batches and step on :class:`~pipelines.train.engines.PlainEngine` with
    the batches already in memory: the plain loop is the baseline the harness is measured
    against. The peak RSS then covers both (the models are small on a CPU).
    """
    import torch
    import torch.distributed as dist

    from pipelines.config import load_pipeline_config
    from pipelines.train.engines import PlainEngine, use_bf16
    from pipelines.train.jobs import JOBS
    from pipelines.train.loop import JobInputs

    torch.set_num_threads(threads)
    cfg = load_pipeline_config(config, overrides)
    spec = JOBS[job]
    t = spec.train_config(cfg)
    cuda = torch.cuda.is_available()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("BENCH_PORT", "29511"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = use_bf16(t, device)
    # A 32-token caption: a typical AudioCaps caption in T5 tokens. No VAE or vocoder weights:
    # the LFM's samples (not timed) would need them.
    null = {"null_emb": [0.0] * cfg.context_dim}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    torch.manual_seed(0)
    built = spec.build(JobInputs(cfg, random_shard(cfg, job), device, bf16, extra=null))
    params = sum(p.numel() for engine in built.engines.values() for p in engine.module.parameters())
    plain = batches = None
    if not cuda:  # the baseline: same model, batches and step, plain torch.optim, data in memory
        torch.manual_seed(0)
        plain = spec.build(JobInputs(cfg, random_shard(cfg, job), device, bf16, extra=null, engine=PlainEngine))
        batches = [next(plain.batches) for _ in range(warmup + steps)]
    for i in range(1, warmup + 1):
        built.step(next(built.batches), i)
        if plain is not None:
            plain.step(batches[i - 1], i)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # Harness and plain loop take turns in rounds of a few steps, so that a slow spell of a
    # shared machine lands on both and their ratio stays a property of the code.
    elapsed = plain_elapsed = 0.0
    rounds = min(5, steps)
    bounds = [warmup + 1 + steps * r // rounds for r in range(rounds + 1)]
    for lo, hi in zip(bounds, bounds[1:]):
        start = time.perf_counter()
        for i in range(lo, hi):
            built.step(next(built.batches), i)
        sync()
        elapsed += time.perf_counter() - start
        if plain is not None:
            start = time.perf_counter()
            for i in range(lo, hi):
                plain.step(batches[i - 1], i)
            plain_elapsed += time.perf_counter() - start
    out = {"job": job, "device": torch.cuda.get_device_name() if cuda else f"cpu x{os.cpu_count()}",
           "threads": torch.get_num_threads(), "precision": "bf16" if bf16 else "fp32", "zero_stage": t.zero_stage,
           "batch_per_device": t.batch_size, "params_trained": params,
           "samples_per_second": round(steps * t.batch_size / elapsed, 3), "seconds_per_step": round(elapsed / steps, 4)}
    if cuda:
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    out["peak_host_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if job == "lfm" and cuda:
        out.update(mfu(cfg, built.engines["unet"].module, t.batch_size, device, out["samples_per_second"]))
    if plain is not None:
        plain_sps = steps * t.batch_size / plain_elapsed
        out["plain_samples_per_second"] = round(plain_sps, 3)
        out["harness_over_plain"] = round(out["samples_per_second"] / plain_sps, 3)
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
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per job (CPU)")
    p.add_argument("--precision", default="", help="comma-separated precisions to compare per job (fp32,bf16): "
                                                  "sets train_<job>.precision; empty: the config's")
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job in this process
    p.add_argument("--out", default="", help="also write the results as JSON here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    if args.job:
        print("RESULT " + json.dumps(run_job(args.job, args.config, args.overrides, args.steps, args.warmup,
                                             args.threads)))
        return
    from pipelines.train.jobs import JOBS

    results = []
    runs = [(job, prec) for job in args.jobs.split(",") for prec in (args.precision.split(",") if args.precision
                                                                      else [""])]
    for i, (job, prec) in enumerate(runs):
        extra = [f"{JOBS[job].section}.precision={prec}"] if prec else []
        cmd = [sys.executable, __file__, "--job", job, "--config", args.config, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), *args.overrides, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BENCH_PORT": str(29511 + i)})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{job}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        res = {**json.loads(line[7:]), "requested_precision": prec or "config"}
        same = [r for r in results if r["job"] == job and r["precision"] == "fp32"]
        if same and res["precision"] == "bf16":  # bf16 against the fp32 run of this job, same sitting
            res["bf16_over_fp32"] = round(res["samples_per_second"] / same[0]["samples_per_second"], 3)
        results.append(res)
        print(" ".join(f"{k}={v}" for k, v in res.items()), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                              "results": results}, indent=2))


if __name__ == "__main__":
    main()
