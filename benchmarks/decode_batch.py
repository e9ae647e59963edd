"""How many latents to decode and vocode at a time after sampling (``LafmaPipeline.decode_batch``).

Times ``LafmaPipeline.decode`` (VAE decoder + vocoder) on one batch of sampled-shape latents,
chunked into each ``--chunks`` size, in interleaved rounds in one process, and prints seconds
per clip and each chunk size's speed against decoding the whole batch at once. Random weights:
speed, not quality. What it found sets ``lafma.pipeline.CPU_DECODE_BATCH``.

    python benchmarks/decode_batch.py                     # configs/demo.yaml, batch 16, 2 threads
    python benchmarks/decode_batch.py --batch 32 --chunks 1,4,8,32 vocoder.kind=hifigan
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--batch", type=int, default=16, help="latents decoded per call")
    p.add_argument("--chunks", default="1,2,4,8,16", help="chunk sizes to compare (the batch itself is added)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=5, help="rounds; medians are reported")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()

    import torch

    from lafma.models import build_pipeline
    from pipelines.config import load_pipeline_config

    torch.set_num_threads(args.threads)
    cfg = load_pipeline_config(args.config, [*args.overrides, "vae.scale_factor=1.0"])
    torch.manual_seed(0)
    pipe = build_pipeline(cfg)
    latents = torch.randn(args.batch, *pipe.latent_shape(cfg.sampler.duration), generator=torch.Generator().manual_seed(0))
    seeds = list(range(args.batch))
    chunks = sorted({*(int(c) for c in args.chunks.split(",") if int(c) <= args.batch), args.batch})
    load_at_start = os.getloadavg()[0]

    def timed(n: int) -> float:
        pipe.decode_batch = n
        start = time.perf_counter()
        with torch.no_grad():
            pipe.decode(latents, seeds)
        return (time.perf_counter() - start) / args.batch

    for n in chunks:  # warm-up: first calls allocate
        timed(n)
    times = {n: [] for n in chunks}
    for _ in range(args.repeats):
        for n in chunks:
            times[n].append(timed(n))
    whole = statistics.median(times[args.batch])
    print(f"{cfg.sampler.duration:g} s clips, latent {'x'.join(map(str, pipe.latent_shape(cfg.sampler.duration)))}, "
          f"vocoder {cfg.vocoder.kind}, batch {args.batch}, {torch.get_num_threads()} threads, medians of "
          f"{args.repeats}; 1-min load average {load_at_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    print("| decode_batch | s/clip | speed vs whole batch |")
    print("| ---: | ---: | ---: |")
    for n in chunks:
        m = statistics.median(times[n])
        print(f"| {n} | {m:.4f} | {whole / m:.2f}x |")


if __name__ == "__main__":
    main()
