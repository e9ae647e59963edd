"""Do the data stages scale flat? ingest → audio → text → latents at N clips, for several N.

    python benchmarks/data_scale.py [--sizes 500 1000 2000 4000] [--baseline] [key=value ...]

For each N: an AudioCaps-shaped corpus (:mod:`benchmarks.audiocaps_like`: 10 s clips, one to
five captions each) on a fresh storage root, then the DAG's own stages, one ``run_dag`` call
each, on one Ray cluster shared by every N (started once and warmed up on a small corpus first,
so no N pays for starting workers and importing torch in them). The latents stage needs a VAE:
a small one (below) at the full 10.24 s clip length, with random weights written once and
imported through ``vae.pretrained`` (so ``train_vae`` exports them instead of training: the
encoder's cost per clip is what a trained one's is, and no Ray Train job runs).

Per stage it prints the stage's own wall time (``StageReport.seconds``: ``Stage.run``, without
the DAG's bookkeeping), time per clip, and peak memory, then each against the smallest N: time
linear in N means a time ratio near the N ratio, flat memory a memory ratio near 1.

How memory is measured: a thread samples resident set sizes (psutil RSS) every 0.2 s while a
stage runs — the driver's own, and that of every Ray worker process of this cluster (the
processes under this driver that Ray titles ``ray::…`` — tasks, the actor pools, idle pooled
workers — or that still run as ``default_worker.py``, starting). "worker" is the largest single worker seen, which is what
an actor loading a table grows; "workers" the largest sum over workers at one sample. RSS
counts the pages of Ray's shared-memory object store that a worker has touched, so the sum
over-counts shared pages; a peak shorter than 0.2 s can be missed. Ray's own daemons (GCS,
raylet, dashboard) are not counted.

``--baseline`` runs the latents stage a second time on the same inputs with the actor it
replaced, which loaded the whole text-embedding table into every actor (:class:`WholeTable`),
so the two can be compared on one machine in one process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.audiocaps_like import captions_for, write_corpus  # noqa: E402
from pipelines.config import load_pipeline_config  # noqa: E402
from pipelines.core import storage  # noqa: E402
from pipelines.core.cluster import init_ray  # noqa: E402
from pipelines.core.dag import StageReport, run_dag  # noqa: E402
from pipelines.stages import STAGES  # noqa: E402
from pipelines.stages import train as train_stages  # noqa: E402
from pipelines.stages.text import caption_key  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA_STAGES = ("ingest", "audio", "text", "train_vae", "latents")
# Full-length clips and shards of the default size. The text encoder is a one-layer random T5
# at FLAN-T5-Large's width (1024-d, byte tokens), so the embedding table weighs what a paper-
# scale one does per caption; the VAE is 32 channels at every level, one res block, no mid
# attention (its attention over 256 x 16 latent cells took ~2 GB an actor and most of the
# stage's time), since the point is how the stages scale with N, not the encoders' cost.
OVERRIDES = ["audio.clip_seconds=10.24", "sampler.duration=10.24", "data.shard_size=64", "text.kind=tiny_t5",
             "text.tiny_dim=1024", "text.tiny_layers=1", "text.max_length=64", "vae.ch=32", "vae.ch_mult=[1,1,1]",
             "vae.num_res_blocks=1", "vae.mid_attention=false"]
MB = 2**20


@dataclass
class Peak:
    driver: int = 0
    worker: int = 0
    workers: int = 0


class MemorySampler:
    """Peak RSS of this process and of its Ray workers while a ``with`` block runs (see the
    module docstring for what is and is not counted)."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak = every, Peak()
        self._stop = threading.Event()
        self._me = psutil.Process()

    def _workers(self) -> list[psutil.Process]:
        out = []
        for p in self._me.children(recursive=True):
            try:
                # Ray retitles a worker "ray::<task or actor>" (also "ray::IDLE") once it runs.
                args = p.cmdline()
                if args and (args[0].startswith("ray::") or any("default_worker.py" in a for a in args)):
                    out.append(p)
            except psutil.Error:  # exited between the listing and the look
                pass
        return out

    def _sample(self) -> None:
        rss = []
        for p in self._workers():
            try:
                rss.append(p.memory_info().rss)
            except psutil.Error:
                pass
        self.peak.driver = max(self.peak.driver, self._me.memory_info().rss)
        self.peak.worker = max(self.peak.worker, max(rss, default=0))
        self.peak.workers = max(self.peak.workers, sum(rss))

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class WholeTable:
    """The lookup the latents actor used before :class:`~pipelines.stages.text.EmbeddingLookup`:
    the whole text table read into a dict in each actor (the baseline of ``--baseline``)."""

    def __init__(self, text_dir: str):
        text = storage.read_parquet_dir(text_dir, columns=["caption_key", "emb", "length"])
        self.table = {k: (e, n) for k, e, n in zip(*(text.column(c).to_numpy(zero_copy_only=False)
                                                    for c in ("caption_key", "emb", "length")))}

    def rows(self, captions: list[str]) -> dict[str, tuple]:
        return {caption_key(c): self.table[caption_key(c)] for c in captions}


class WholeTableLatents(train_stages.EncodeLatents):
    def __init__(self, cfg: dict, vae_weights: str, text_dir: str, out_dir: str, batch_size: int = 16):
        super().__init__(cfg, vae_weights, text_dir, out_dir, batch_size)
        self.text = WholeTable(text_dir)


def random_vae(cfg, out: Path) -> Path:
    """The config's VAE with seeded random weights, exported as the pipeline exports a trained one."""
    import torch

    from lafma.models import build_vae
    from pipelines.train.weights import export_weights

    torch.manual_seed(0)
    export_weights(build_vae(cfg).state_dict(), cfg, str(out), "vae")
    return out / "vae.safetensors"


def run_stage(cfg, name: str) -> tuple[float, Peak, StageReport]:
    with MemorySampler() as mem:
        (report,) = [r for r in run_dag(cfg, STAGES, only=[name]) if r.name == name]
    assert report.status == "ran", (name, report.status)
    return report.seconds, mem.peak, report


def measure(n: int, work: Path, config: str, overrides: list[str], baseline: bool) -> dict[str, tuple]:
    """``{stage: (seconds, Peak)}`` for one corpus of ``n`` clips on a fresh root under ``work``."""
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    manifest = write_corpus(work / "corpus", n)
    print(f"[scale] N={n}: corpus written in {time.perf_counter() - t0:.1f} s", flush=True)
    cfg = load_pipeline_config(config, [*OVERRIDES, f"data.manifest={manifest}", f"storage.root={work / 'root'}",
                                        *overrides])
    out = {}
    for name in DATA_STAGES:
        seconds, peak, last = run_stage(cfg, name)
        out[name] = (seconds, peak)
        print(f"[scale] N={n} {name}: {seconds:.1f} s, driver {peak.driver / MB:.0f} MB, worker {peak.worker / MB:.0f} MB, "
              f"workers {peak.workers / MB:.0f} MB", flush=True)
    if baseline:  # the same stage again, into the same (emptied) output, with the old actor
        shutil.rmtree(last.path)
        streaming, train_stages.EncodeLatents = train_stages.EncodeLatents, WholeTableLatents
        try:
            seconds, peak, again = run_stage(cfg, "latents")
        finally:
            train_stages.EncodeLatents = streaming
        assert again.info["rows"] == last.info["rows"], (again.info["rows"], last.info["rows"])
        out["latents (whole table)"] = (seconds, peak)
        print(f"[scale] N={n} latents (whole table): {seconds:.1f} s, worker {peak.worker / MB:.0f} MB", flush=True)
    return out


def report(sizes: list[int], results: dict[int, dict[str, tuple]]) -> None:
    base = sizes[0]
    print(f"\n{os.cpu_count()} cores; ratios against N={base} (linear time: the N ratio; flat memory: 1.00)")
    print(f"{'stage':<22}{'N':>6}{'wall s':>9}{'ms/clip':>9}{'t ratio':>9}{'N ratio':>9}"
          f"{'driver MB':>11}{'worker MB':>11}{'workers MB':>12}{'drv ratio':>11}{'wkr ratio':>11}")
    for stage in results[base]:
        s0, p0 = results[base][stage]
        for n in sizes:
            s, p = results[n][stage]
            print(f"{stage:<22}{n:>6}{s:>9.1f}{1000 * s / n:>9.1f}{s / s0:>9.2f}{n / base:>9.2f}"
                  f"{p.driver / MB:>11.0f}{p.worker / MB:>11.0f}{p.workers / MB:>12.0f}"
                  f"{p.driver / p0.driver:>11.2f}{p.worker / max(p0.worker, 1):>11.2f}")


def write_text_table(out: Path, captions: int, tokens: int = 16, dim: int = 1024, seed: int = 0) -> list[str]:
    """A text stage's table of ``captions`` random (tokens x dim) embeddings, laid out as the
    stage lays it out (sorted captions, ``4 x 32`` to a shard, small row groups); returns the captions."""
    import numpy as np

    from pipelines.core.stage import arrow_table, chunk, shard_name
    from pipelines.stages.text import ROW_GROUP_ROWS, SCHEMA

    rng = np.random.default_rng(seed)
    names = sorted({f"{c} ({i})" for i, c in enumerate(captions_for(rng, captions))} | {""})
    for i, part in enumerate(chunk(names, 4 * 32)):
        rows = [{"caption_key": caption_key(c), "caption": c, "length": tokens, "dim": dim,
                 "emb": rng.standard_normal(tokens * dim, dtype=np.float32)} for c in part]
        storage.write_parquet(str(out / shard_name(i)), arrow_table(rows, SCHEMA), row_group_size=ROW_GROUP_ROWS)
    return names


def lookup_cost(text_dir: str, kind: str, shard_captions: int = 192) -> None:
    """Run in a fresh process: how far RSS rises above where it started (sampled every 0.2 s
    and at the ends, :class:`MemorySampler`) while ``kind``'s lookup is built and serves one
    shard's captions (64 clips x 3), and the seconds each takes; prints one JSON line."""
    import json
    import random

    from pipelines.stages.text import EmbeddingLookup

    names = [c for c in storage.read_parquet_dir(text_dir, ["caption"]).column("caption").to_pylist() if c]
    want = random.Random(0).sample(names, min(shard_captions, len(names)))
    del names
    start = psutil.Process().memory_info().rss
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        lookup = WholeTable(text_dir) if kind == "whole" else EmbeddingLookup(text_dir)
        t1 = time.perf_counter()
        got = lookup.rows(want)
        t2 = time.perf_counter()
    assert len(got) == len(set(want))
    print(json.dumps({"kind": kind, "peak_mb": (mem.peak.driver - start) / MB, "init_s": t1 - t0, "shard_s": t2 - t1}))


def table_only(sizes: list[int], work: Path) -> None:
    """``--table-only``: the latents actor's text lookup alone, old against new, for each N
    (three captions a clip, 16 tokens x 1024 each: FLAN-T5-Large's width at AudioCaps' length)."""
    import json
    import subprocess

    print(f"{'N':>6}{'captions':>10}{'table MB':>10}{'lookup':>8}{'peak MB':>9}{'init s':>8}{'shard s':>9}")
    for n in sizes:
        out = work / f"text{n}"
        shutil.rmtree(out, ignore_errors=True)
        names = write_text_table(out, 3 * n)
        size = sum(f.stat().st_size for f in out.glob("*.parquet")) / MB
        for kind in ("whole", "lookup"):
            code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.data_scale import lookup_cost; "
                    f"lookup_cost({str(out)!r}, {kind!r})")
            r = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                          text=True).stdout.strip().splitlines()[-1])
            print(f"{n:>6}{len(names):>10}{size:>10.0f}{kind:>8}{r['peak_mb']:>9.0f}{r['init_s']:>8.2f}{r['shard_s']:>9.3f}",
                  flush=True)
        shutil.rmtree(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    p.add_argument("--work", type=Path, default=Path("/tmp/lafma_data_scale"),
                   help="corpora and storage roots (each N's is deleted once measured unless --keep)")
    p.add_argument("--config", default=str(ROOT / "configs" / "test.yaml"))
    p.add_argument("--baseline", action="store_true", help="also time the latents stage's old whole-table actor")
    p.add_argument("--warmup", type=int, default=32, help="clips of the unreported warm-up run")
    p.add_argument("--keep", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--table-only", action="store_true",
                   help="measure only the latents actor's text lookup, old against new, on synthetic tables")
    args = p.parse_args()
    os.environ.setdefault("LAFMA_PROGRESS", "0")
    sizes = sorted(args.sizes)
    if args.table_only:
        return table_only(sizes, args.work)
    cfg = load_pipeline_config(args.config, [*OVERRIDES, *args.overrides])
    overrides = [f"vae.pretrained={random_vae(cfg, args.work / 'vae')}", *args.overrides]
    init_ray(cfg.compute)
    measure(args.warmup, args.work / "warmup", args.config, overrides, args.baseline)
    shutil.rmtree(args.work / "warmup")
    results = {}
    for n in sizes:
        results[n] = measure(n, args.work / f"n{n}", args.config, overrides, args.baseline)
        if not args.keep:
            shutil.rmtree(args.work / f"n{n}")
        report(sorted(results), results)  # after each N: a run cut short still reports


if __name__ == "__main__":
    main()
