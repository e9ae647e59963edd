"""Run the LAFMA DAG: ``python pipelines/run_all.py [--config FILE] [--only|--from|--until STAGE] [key=value ...]``.

With no arguments: local Ray, the built-in demo corpus, ``configs/demo.yaml``. Under
``ray job submit`` it runs on the cluster it was submitted to.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from pipelines.core.cli import add_config_args, load_or_exit, run_dag_or_exit  # noqa: E402
from pipelines.core.dag import format_summary  # noqa: E402
from pipelines.stages import STAGES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated stages to run (their inputs must exist)")
    p.add_argument("--from", dest="start", default=None, help="first stage to run")
    p.add_argument("--until", default=None, help="last stage to run")
    add_config_args(p)
    args = p.parse_args(argv)
    cfg = load_or_exit(args)
    only = [s for s in args.only.split(",") if s]
    reports = run_dag_or_exit(cfg, STAGES, only=only, start=args.start, until=args.until)
    print(format_summary(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
