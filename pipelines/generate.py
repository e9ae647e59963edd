"""Batch generation: ``python pipelines/generate.py --captions FILE --model URI --out DIR``.

FILE is txt (one caption per line), csv, jsonl or Parquet with a ``caption`` column and
optional ``id``, ``seed``, ``steps``, ``guidance``, ``solver``, ``duration``, ``candidates``,
and, to start from a clip, ``audio`` (a path, relative to FILE's folder, or URI) with ``start``
and ``end`` (seconds to regenerate) or ``strength`` (audio-to-audio); local or s3://.
Writes ``DIR/plan.json``, ``DIR/wavs/*.wav``, ``DIR/manifest.{parquet,csv}`` (with each clip's
``model_version``: ``--model`` resolved, an alias to its version number; best-of-N rows list
every candidate's seed and score) and ``DIR/rejects/``.
Re-running an interrupted job generates only what is missing; re-running into a DIR planned
otherwise (another model version, edited captions, other settings) stops with exit code 2 and
says what changed.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from lafma.config import ConfigError  # noqa: E402
from lafma.flow.solvers import METHODS  # noqa: E402
from pipelines.config import StorageConfig  # noqa: E402
from pipelines.core import storage  # noqa: E402
from pipelines.generation import GenerationSettings, run_generation  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", required=True, help="caption file: .txt, .csv, .jsonl or .parquet")
    p.add_argument("--model", default="models:/lafma@champion",
                   help="models:/lafma@champion (default), models:/lafma/<version>, runs:/<id>/model, or a bundle dir")
    p.add_argument("--out", default=None, help="output root, local or s3:// (default: <root>/generations/<name>)")
    p.add_argument("--root", default=StorageConfig().root,
                   help="storage root whose MLflow store resolves models:/ URIs (default: .lafma)")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance weight (default: the model's)")
    p.add_argument("--solver", default=None, choices=METHODS, help="ODE solver (default: the model's)")
    p.add_argument("--duration", type=float, default=None, help="seconds per clip (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="job seed: rows without a seed get one from it and their id")
    p.add_argument("--candidates", type=int, default=1,
                   help="best-of-N for rows without a candidates column: seeds seed, seed+1, ... generated, the "
                        "clip the text-audio scorer ranks highest kept (default 1)")
    p.add_argument("--scorer", default=None,
                   help="scorer folder for best-of-N (default: the one the model's evaluation recorded)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per model call (and per resumable shard)")
    p.add_argument("--actors", type=int, default=1, help="model replicas (Ray actors)")
    p.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs per actor")
    p.add_argument("--actor-gpus", type=float, default=None, help="GPUs per actor (default: 1 when the cluster has GPUs)")
    args = p.parse_args(argv)

    import ray

    from pipelines.config import ComputeConfig
    from pipelines.core.cluster import init_ray

    root = storage.absolute(args.root)
    name = os.path.splitext(os.path.basename(args.captions.rstrip("/")))[0] or "captions"
    out = storage.absolute(args.out) if args.out else storage.join(root, "generations", name)
    init_ray(ComputeConfig())
    gpus = args.actor_gpus if args.actor_gpus is not None else (1.0 if ray.cluster_resources().get("GPU") else 0.0)
    settings = GenerationSettings(model=args.model, steps=args.steps, guidance=args.guidance, solver=args.solver,
                                  duration=args.duration, seed=args.seed, batch_size=args.batch_size,
                                  actors=args.actors, actor_cpus=args.actor_cpus, actor_gpus=gpus,
                                  candidates=args.candidates, scorer=args.scorer)
    try:
        summary = run_generation(args.captions, out, settings, root=root)
    except ConfigError as e:  # another plan in --out, an unknown model, no scorer: one line, no traceback
        print(f"generate: {e}", file=sys.stderr)
        return 2
    print(f"{summary['rows']} clips in {out}/wavs; manifest {out}/manifest.csv; "
          f"{summary['rejected']} rejected {summary['reasons'] or ''}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
