"""Run the LAFMA DAG: ``python pipelines/run_all.py [--config FILE] [--only|--from|--until STAGE] [--check] [key=value ...]``.

With no arguments: local Ray, the built-in demo corpus, ``configs/demo.yaml``. Under
``ray job submit`` it runs on the cluster it was submitted to. ``--check`` runs the preflight
alone: which stages would run, what each asks the cluster for, and what would fail (exit 2).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from pipelines.core.cli import add_config_args, check_dag_or_exit, load_or_exit, run_dag_or_exit  # noqa: E402
from pipelines.core.dag import format_summary  # noqa: E402
from pipelines.core.preflight import format_preflight  # noqa: E402
from pipelines.stages import STAGES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated stages to run (their inputs must exist)")
    p.add_argument("--from", dest="start", default=None, help="first stage to run")
    p.add_argument("--until", default=None, help="last stage to run")
    p.add_argument("--check", action="store_true",
                   help="run nothing: print the plan and what the preflight finds; exit 2 if it would fail")
    add_config_args(p)
    args = p.parse_args(argv)
    cfg = load_or_exit(args)
    only = [s for s in args.only.split(",") if s]
    if args.check:
        pf = check_dag_or_exit(cfg, STAGES, only=only, start=args.start, until=args.until)
        print(format_preflight(pf))
        return 0 if pf.ok else 2
    reports = run_dag_or_exit(cfg, STAGES, only=only, start=args.start, until=args.until)
    print(format_summary(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
