"""Generation at shorter durations on a model's held-out captions: FD and attribute accuracy
against the real clips cropped the same way, for each fraction of the model's clip length.

    python benchmarks/duration.py --root /tmp/runs/base --model models:/lafma/1 \
        [--evaluate DIR] [--fractions 0.25,0.5,1] [--out DIR] [--write benchmarks/results/duration_cpu2.md]

The captions, seeds and sampler settings are the model's ``evaluate`` stage's (as in
best_of_n.py: found under ``<root>/data/*/evaluate-*`` by the model's version, or
``--evaluate``). For each fraction f the batch job (:func:`pipelines.generation.run_generation`,
what ``pipelines/generate.py --duration`` runs) generates every held-out caption at
f × ``audio.clip_seconds`` seconds, and the real held-out clips are cut to their first
f × ``audio.clip_seconds`` seconds (the same ``round(seconds · sample_rate)`` samples the
generated clips have). Both sets are scored by the stage's embedder, as the stage scores:

- FD: generated against real (all clips), generated first half against real second half, and
  real first half against real second half (the stage's halves: FD is biased upwards at small
  N, so the last two are compared at the same size);
- attribute accuracy: the stage's attribute classifiers (fitted on the whole training clips)
  on the generated clips, and on the cropped real clips as the ceiling, beside chance (always
  the training majority class).

A model conditioned on duration (``unet.duration_embedding``) is told each job's duration; one
without it generates the shorter latent unconditioned, which is the baseline this measures
against. The f = 1 row is the stage's own generation: its FD reproduces ``eval/fd`` (printed
beside it).

Short clips and the embedder: aisfx (the default evaluation embedder) embeds blocks of 100
frames of 1024 samples at 44.1 kHz (about 2.32 s) and zero-pads a shorter clip's log-mel to
one block; the padding is silence after its log. A 0.64 s clip (25 % of the demo's 2.56 s) is
therefore accepted, and the generated and real crops of one fraction are padded alike; FD
across fractions is not comparable (each row has its own real reference), only within a row.

Every job's output stays in ``--out`` (a temporary folder by default; nothing is written under
``--root``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fractions(text: str) -> list[float]:
    """``0.25,0.5,1`` -> [0.25, 0.5, 1.0]; each in (0, 1]: a duration past the clip length is
    past what the model (and its real clips) hold."""
    out = [float(f) for f in text.split(",")]
    bad = [f for f in out if not 0 < f <= 1]
    if bad:
        raise SystemExit(f"--fractions must be in (0, 1], got {bad}")
    return out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.heldout import add_model_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--fractions", default="0.25,0.5,1", help="fractions of audio.clip_seconds, comma-separated")
    args = p.parse_args(argv)
    wanted = fractions(args.fractions)

    from benchmarks.heldout import load_held_out, write_captions
    from pipelines.config import ComputeConfig
    from pipelines.core import storage
    from pipelines.core.cluster import init_ray

    root = storage.absolute(args.root)
    h = load_held_out(root, args.model, args.evaluate)
    out = args.out or tempfile.mkdtemp(prefix="duration-")
    captions = write_captions(h.held, args.seed, os.path.join(out, "captions.jsonl"))
    init_ray(ComputeConfig())
    rows = [score_fraction(h, f, captions, os.path.join(out, f"f-{round(f * 100):03d}"), root, args) for f in wanted]

    report = render(args, rows, h, out)
    print(report)
    if args.write:
        Path(args.write).write_text(report)
    return 0


def score_fraction(h, fraction: float, captions: str, job: str, root: str, args) -> dict:
    """Generate the held-out captions at ``fraction`` of the clip length into ``job`` and score
    them, and the real clips cropped alike; the table row (see :func:`render`)."""
    import numpy as np

    from benchmarks.heldout import attribute_scores, read_clips, read_manifest
    from lafma.metrics import frechet_distance_from_embeddings as fd
    from lafma.metrics.evaluation import halves
    from pipelines.generation import GenerationSettings, run_generation
    from pipelines.stages import evaluate as ev

    sampler = h.config["sampler"]
    seconds = fraction * h.config["audio"]["clip_seconds"]
    n = round(seconds * h.sample_rate)  # what generate() returns for ``seconds``
    settings = GenerationSettings(model=h.model.uri, steps=sampler["steps"], guidance=sampler["guidance"],
                                  solver=sampler["solver"], duration=seconds, seed=args.seed,
                                  batch_size=args.batch_size, actor_cpus=args.actor_cpus)
    t0 = time.time()
    run_generation(captions, job, settings, root=root)
    wall = time.time() - t0
    gen = read_clips(job, read_manifest(job), h.ids)
    real = [c["waveform"][:n] for c in h.held]
    lengths = {len(w) for w in gen} | {len(w) for w in real}
    if lengths != {n}:  # a crop past a real clip's end, or a job that ignored the duration
        raise RuntimeError(f"{seconds:g} s should be {n} samples per clip; generated and real clips have {lengths}")
    g, r = ev.embed(h.embedder, gen, h.sample_rate), ev.embed(h.embedder, real, h.sample_rate)
    a, b = halves(len(h.ids))
    on_gen, on_real = attribute_scores(h, g.clips), attribute_scores(h, r.clips)
    row = {"fraction": fraction, "seconds": seconds, "samples": n,
           "fd": fd(g.fd, r.fd), "fd_half": fd(g.clips[a], r.clips[b]), "real_vs_real": fd(r.clips[a], r.clips[b]),
           "accuracy": {k: v["accuracy"] for k, v in on_gen.items()},
           "real_accuracy": {k: v["accuracy"] for k, v in on_real.items()},
           "chance": {k: v["chance"] for k, v in on_gen.items()}, "seconds_per_caption": wall / len(h.ids)}
    for k in ("accuracy", "real_accuracy", "chance"):
        row[f"mean_{k}"] = float(np.mean(list(row[k].values()))) if row[k] else float("nan")
    print(f"[duration] {fraction:g} ({seconds:g} s): FD {row['fd']:.4g} (half {row['fd_half']:.4g}, real vs real "
          f"{row['real_vs_real']:.4g}), attribute accuracy {row['mean_accuracy']:.3f} (real {row['mean_real_accuracy']:.3f})",
          flush=True)
    return row


def render(args, rows: list[dict], h, out: str) -> str:
    """The markdown report: provenance, one row per fraction, the stage's own numbers."""
    from benchmarks.heldout import provenance

    names, nan = h.attributes, float("nan")
    conditioned = "conditioned on duration" if h.config["unet"].get("duration_embedding") else \
        "not conditioned on duration (no unet.duration_embedding)"
    lines = [f"Model {args.model} at {args.root} ({conditioned}); evaluation {h.evaluate}; {len(h.ids)} held-out "
             f"captions, clip length {h.config['audio']['clip_seconds']:g} s; {provenance()}; jobs in {out}.", "",
             "| fraction | seconds | FD | FD half | real vs real | mean attribute accuracy | real (cropped) | chance | "
             + " | ".join(f"{a} (gen / real)" for a in names) + " | s / caption |",
             "|" + " --- |" * (9 + len(names))]
    for r in rows:
        lines.append(f"| {r['fraction']:g} | {r['seconds']:g} | {r['fd']:.4g} | {r['fd_half']:.4g} | "
                     f"{r['real_vs_real']:.4g} | {r['mean_accuracy']:.3f} | {r['mean_real_accuracy']:.3f} | "
                     f"{r['mean_chance']:.3f} | "
                     + " | ".join(f"{r['accuracy'].get(a, nan):.3f} / {r['real_accuracy'].get(a, nan):.3f}" for a in names)
                     + f" | {r['seconds_per_caption']:.2f} |")
    lines += ["", f"The evaluate stage's own numbers for this model (whole clips, its seeds): FD "
                  f"{h.stage.get('eval/fd', nan):.4g}, FD half {h.stage.get('eval/fd_half', nan):.4g}, real vs real "
                  f"{h.stage.get('ref/real_vs_real/fd', nan):.4g}. FD compares within a row only: each fraction "
                  "has its own real reference."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
