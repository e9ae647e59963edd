"""Audio-stage throughput: Ray Data tasks against a plain single-process loop, same files.

    python benchmarks/preprocess.py [--files 160] [--seconds 10] [--rate 44100]

Both do the same work per file — decode, downmix, resample to 16 kHz, cut clips, log-mel,
write Parquet shards — and report seconds of audio per wall second. Ray start-up is
excluded (a cluster is started once and serves every stage); the stage's own scheduling
overhead is included.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.config import load_pipeline_config  # noqa: E402
from pipelines.core import storage  # noqa: E402
from pipelines.core.cluster import init_ray  # noqa: E402
from pipelines.core.dag import run_dag  # noqa: E402
from pipelines.core.stage import chunk  # noqa: E402
from pipelines.stages import STAGES  # noqa: E402
from pipelines.stages.audio import process_shard  # noqa: E402


def make_files(root: Path, n: int, seconds: float, rate: int) -> Path:
    rng = np.random.default_rng(0)
    (root / "audio").mkdir(parents=True)
    lines = ["id,audio,caption"]
    for i in range(n):
        t = np.arange(int(seconds * rate)) / rate
        x = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(t.shape)
        sf.write(root / "audio" / f"{i}.wav", np.stack([x, x], 1).astype(np.float32), rate, subtype="PCM_16")
        lines.append(f"f{i},audio/{i}.wav,clip {i}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=160)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rate", type=int, default=44100, help="source sample rate (stereo, 16-bit)")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "lafma_audiocaps.yaml"))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.shard_size=16")
    args = p.parse_args()
    os.environ.setdefault("LAFMA_PROGRESS", "0")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = make_files(tmp / "in", args.files, args.seconds, args.rate)
        cfg = load_pipeline_config(args.config, [f"data.manifest={manifest}", f"storage.root={tmp / 'ray'}",
                                        "data.long_clips=crop", *args.overrides])
        audio_seconds = args.files * args.seconds

        # Plain loop: the very same per-shard function, called in this process, one shard after another.
        reports = run_dag(load_pipeline_config(args.config, [f"data.manifest={manifest}", f"storage.root={tmp / 'loop'}",
                                                    *args.overrides]), STAGES, only=["ingest"])
        rows = storage.read_parquet_dir(reports[0].path).to_pylist()

        def loop(out: str) -> float:
            t0 = time.perf_counter()
            for i, shard in enumerate(chunk(rows, cfg.data.shard_size)):
                process_shard({"shard": i, "rows": shard}, out_dir=out, mel=cfg.mel, data=cfg.data,
                              clip_samples=cfg.clip_samples)
            return time.perf_counter() - t0

        import torch

        loop_s = loop(str(tmp / "loop" / "audio"))  # torch's default: intra-op threads on every core
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        loop1_s = loop(str(tmp / "loop1" / "audio"))
        torch.set_num_threads(threads)

        init_ray(cfg.compute)
        # Warm-up pass into another root: Ray starts its worker processes and they import torch
        # once, as they would have for any earlier stage of a long-lived cluster.
        run_dag(load_pipeline_config(args.config, [f"data.manifest={manifest}", f"storage.root={tmp / 'warm'}",
                                          "data.long_clips=crop", *args.overrides]), STAGES, until="audio")
        t0 = time.perf_counter()
        reports = {r.name: r for r in run_dag(cfg, STAGES, until="audio")}
        ray_s = time.perf_counter() - t0
        assert reports["audio"].info["rows"] == args.files, reports["audio"].info

    print(f"files: {args.files} x {args.seconds:.2f} s stereo @ {args.rate} Hz = {audio_seconds:.0f} s of audio, "
          f"{os.cpu_count()} cores, shard_size {cfg.data.shard_size}, audio_task_cpus {cfg.compute.audio_task_cpus}")
    print(f"plain loop ({threads} torch threads): {loop_s:7.2f} s  {audio_seconds / loop_s:8.1f} x real time")
    print(f"plain loop (1 torch thread) : {loop1_s:7.2f} s  {audio_seconds / loop1_s:8.1f} x real time")
    print(f"ray audio stage             : {ray_s:7.2f} s  {audio_seconds / ray_s:8.1f} x real time")
    print(f"speed-up vs loop            : {loop_s / ray_s:.2f}x ({loop1_s / ray_s:.2f}x vs the 1-thread loop)")


if __name__ == "__main__":
    main()
