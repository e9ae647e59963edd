"""Griffin-Lim's settings against what they cost: FD of real mels vocoded, and seconds a clip.

    python benchmarks/griffinlim.py [--root /tmp/gl] [--config configs/demo.yaml] [--clips 60]
        [--iters 8,16,32,64] [--momentum 0,0.99] [--inverse 8,32] [--write results.md]

The demo renders every generated mel with Griffin-Lim (``vocoder.kind: griffinlim``), so its
iterations bound what any generator can sound like, and its time is a fixed cost of every clip.
This runs the held-out clips' real log-mels through Griffin-Lim at each setting and scores them
as the evaluate stage scores generated clips: vocoded clips of one half of the held-out set
against the real clips of the other half (``eval/fd_half``'s halves), beside real against real
on the same halves — the floor no vocoder goes under. The clips come from the audio stage of
``--root`` (run up to it first when missing: the config's corpus, the same split).
Seconds a clip are for the whole held-out set vocoded as one batch, in this process.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/tmp/lafma-griffinlim", help="storage root whose audio stage holds the clips")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--clips", type=int, default=60, help="held-out clips (the evaluation's first N by id)")
    p.add_argument("--iters", default="8,16,32,64", help="Griffin-Lim iterations to try")
    p.add_argument("--momentum", default="0,0.99", help="momenta to try (0: plain Griffin-Lim)")
    p.add_argument("--inverse", default="32", help="mel-inversion updates to try")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", default="", help="also write the table here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)

    from benchmarks.heldout import provenance
    from lafma.data.captions import derive_seed
    from lafma.metrics import frechet_distance_from_embeddings
    from lafma.metrics.evaluation import halves
    from lafma.vocoder import GriffinLimVocoder
    from pipelines.config import load_pipeline_config
    from pipelines.core import storage
    from pipelines.core.dag import run_dag
    from pipelines.stages import STAGES
    from pipelines.stages import evaluate as ev

    root = storage.absolute(args.root)
    cfg = load_pipeline_config(args.config, [f"storage.root={root}", *args.overrides])
    audio = {r.name: r for r in run_dag(cfg, STAGES, until="audio")}["audio"].path
    held = ev.load_clips(audio, ev.HELD_OUT, args.clips)
    embedder = ev.evaluation_embedder(cfg, root)
    sr = cfg.mel.sample_rate
    first, second = halves(len(held))
    real = ev.embed(embedder, [c["waveform"] for c in held], sr).fd
    floor = frechet_distance_from_embeddings(real[first], real[second])
    mel = torch.from_numpy(np.stack([c["mel"] for c in held]))  # (N, n_mels, T)
    seeds = [derive_seed(args.seed, c["id"]) for c in held]
    threads = torch.get_num_threads()

    rows = []
    grid = itertools.product([int(i) for i in args.iters.split(",")], [float(m) for m in args.momentum.split(",")],
                             [int(i) for i in args.inverse.split(",")])
    for n_iter, momentum, inverse in grid:
        gl = GriffinLimVocoder.from_config(cfg.mel, n_iter=n_iter, inverse_iters=inverse, momentum=momentum)
        t0 = time.perf_counter()
        waves = [w.numpy() for w in gl(mel, seeds=seeds)]
        seconds = (time.perf_counter() - t0) / len(held)
        vocoded = ev.embed(embedder, waves, sr).fd
        fd = frechet_distance_from_embeddings(vocoded[first], real[second])
        rows.append((n_iter, momentum, inverse, fd, fd / floor, seconds))
        print(f"[griffinlim] iters {n_iter}, momentum {momentum}, inverse {inverse}: FD {fd:.1f} ({fd / floor:.2f}x real "
              f"vs real), {seconds * 1000:.0f} ms a clip", flush=True)

    lines = [f"{len(held)} held-out clips of {cfg.audio.clip_seconds} s from {audio}; embedder {embedder.name}; "
             f"real vs real (the same halves) FD {floor:.1f}; {threads} threads; {provenance()}.", "",
             "| iterations | momentum | mel-inversion updates | FD (vocoded half vs real half) | ÷ real vs real | ms / clip |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {n} | {m:g} | {i} | {fd:.1f} | {r:.2f} | {s * 1000:.0f} |" for n, m, i, fd, r, s in rows]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.write:
        Path(args.write).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
