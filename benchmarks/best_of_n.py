"""Best-of-N on a model's held-out captions: attribute accuracy and text-audio score for each N.

    python benchmarks/best_of_n.py --root /tmp/runs/base --model models:/lafma/1 \
        [--scorer DIR] [--evaluate DIR] [--n 1,2,4,8] [--out DIR] [--write benchmarks/results/best_of_n_cpu2.md]

The captions, seeds and sampler settings are the model's ``evaluate`` stage's (found under
``<root>/data/*/evaluate-*`` by the model's version, or ``--evaluate``): every held-out clip's
caption, seeded by its id, at the model's steps, guidance, solver and clip length. For each N
the batch job runs them (:func:`pipelines.generation.run_generation`, what ``pipelines/generate.py
--candidates N`` runs: seeds seed .. seed + N - 1, the clip the scorer ranks highest kept), and
the kept clips are scored as the stage scores its clips:

- attribute accuracy: the stage's attribute classifiers (fitted on the training clips' embeddings
  by its embedder, aisfx by default), applied to each kept clip against its caption's labels;
  per attribute and the mean over attributes;
- text-audio: the scorer's mean score of the kept clips. Best-of-N picks by this score, so it
  rises with N by construction: the attribute accuracy, which owes the scorer nothing, is the
  measure of whether the kept clips follow their captions better.

The N = 1 row is plain generation with the stage's seeds: it reproduces the stage's own
``eval/text_audio`` and attribute accuracies (printed beside it). Every job's output stays in
``--out`` (a temporary folder by default; nothing is written under ``--root``).
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


def main(argv: list[str] | None = None) -> int:
    from benchmarks.heldout import add_model_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--scorer", default=None, help="scorer folder (default: the one the version's evaluation recorded)")
    p.add_argument("--n", default="1,2,4,8", help="candidate counts, comma-separated")
    args = p.parse_args(argv)

    import numpy as np

    from benchmarks.heldout import (
        attribute_scores,
        load_held_out,
        read_clips,
        read_manifest,
        write_captions,
    )
    from pipelines.config import ComputeConfig
    from pipelines.core import storage
    from pipelines.core.cluster import init_ray
    from pipelines.generation import GenerationSettings, run_generation
    from pipelines.scoring import resolve_scorer
    from pipelines.stages import evaluate as ev

    root = storage.absolute(args.root)
    h = load_held_out(root, args.model, args.evaluate)
    ids, names, sampler = h.ids, h.attributes, h.config["sampler"]
    scorer = resolve_scorer(h.model.uri, args.scorer, root=root)
    out = args.out or tempfile.mkdtemp(prefix="best_of_n-")
    counts = [int(n) for n in args.n.split(",")]

    captions = write_captions(h.held, args.seed, os.path.join(out, "captions.jsonl"))
    init_ray(ComputeConfig())
    rows = []
    for n in counts:
        job = os.path.join(out, f"n-{n:02d}")
        settings = GenerationSettings(model=h.model.uri, steps=sampler["steps"], guidance=sampler["guidance"],
                                      solver=sampler["solver"], duration=h.config["audio"]["clip_seconds"],
                                      seed=args.seed, batch_size=args.batch_size, actor_cpus=args.actor_cpus,
                                      candidates=n, scorer=scorer)
        t0 = time.time()
        summary = run_generation(captions, job, settings, root=root)
        wall = time.time() - t0
        manifest = read_manifest(job)
        kept = read_clips(job, manifest, ids)
        acc = attribute_scores(h, ev.embed(h.embedder, kept, h.sample_rate).clips)
        rows.append({"n": n, "attributes": {a: v["accuracy"] for a, v in acc.items()},
                     "mean_accuracy": float(np.mean([v["accuracy"] for v in acc.values()])),
                     "text_audio": float(np.mean([manifest[i]["score"] for i in ids])),
                     "seconds_per_caption": wall / len(ids), "generated_now": summary["generated_now"],
                     "kept_other": sum(manifest[i]["kept"] != 0 for i in ids)})
        print(f"[best_of_n] N={n}: attribute accuracy {rows[-1]['mean_accuracy']:.3f}, text-audio "
              f"{rows[-1]['text_audio']:.4f}, {rows[-1]['seconds_per_caption']:.2f} s/caption", flush=True)

    report = render(args, rows, names, h.stage, scorer, h.evaluate, len(ids), out)
    print(report)
    if args.write:
        Path(args.write).write_text(report)
    return 0


def render(args, rows, names, stage, scorer, evaluate, n_captions, out) -> str:
    from benchmarks.heldout import provenance

    head = "| N | mean attribute accuracy | text-audio (scorer) | " + " | ".join(names) + \
        " | kept a later seed | s / caption |"
    lines = [f"Model {args.model} at {args.root}; evaluation {evaluate}; scorer {scorer}; {n_captions} held-out "
             f"captions; {provenance()}; jobs in {out}.", "",
             head, "|" + " --- |" * (6 + len(names) - 1)]
    for r in rows:
        # An attribute none of the held-out clips is labelled with has no accuracy: a dash.
        lines.append(f"| {r['n']} | {r['mean_accuracy']:.3f} | {r['text_audio']:.4f} | "
                     + " | ".join(_cell(r["attributes"].get(a)) for a in names)
                     + f" | {r['kept_other']} | {r['seconds_per_caption']:.2f} |")
    real = [stage.get(f"attr/{a}/real_accuracy") for a in names]
    chance = [stage.get(f"attr/{a}/chance") for a in names]
    lines.append(f"| real clips | {_mean(real)} | {stage.get('ref/real/text_audio', float('nan')):.4f} | "
                 + " | ".join(map(_cell, real)) + " | | |")
    lines.append(f"| chance | {_mean(chance)} | | " + " | ".join(map(_cell, chance)) + " | | |")
    gen = [stage.get(f"attr/{a}/accuracy") for a in names]
    lines += ["", f"The evaluate stage's own numbers for this model (plain generation, its seeds): mean attribute "
                  f"accuracy {_mean(gen)}, text-audio {stage.get('eval/text_audio', float('nan')):.4f}."]
    return "\n".join(lines) + "\n"


def _cell(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _mean(values: list[float | None]) -> str:
    """The mean over the attributes that have a value (those with no held-out label have none)."""
    known = [v for v in values if v is not None]
    return _cell(sum(known) / len(known) if known else None)


if __name__ == "__main__":
    sys.exit(main())
