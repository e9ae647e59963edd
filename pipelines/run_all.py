"""Run the LAFMA DAG: ``python pipelines/run_all.py [--config FILE] [--only|--from|--until STAGE] [key=value ...]``.

With no arguments: local Ray, the built-in demo corpus, ``configs/demo.yaml``. Under
``ray job submit`` it runs on the cluster it was submitted to.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from lafma.config import ConfigError, load_config  # noqa: E402
from pipelines.core.dag import format_summary, run_dag  # noqa: E402
from pipelines.stages import STAGES  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: configs/demo.yaml)")
    p.add_argument("--only", default="", help="comma-separated stages to run (their inputs must exist)")
    p.add_argument("--from", dest="start", default=None, help="first stage to run")
    p.add_argument("--until", default=None, help="last stage to run")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. storage.root=s3://b/x")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    only = [s for s in args.only.split(",") if s]
    reports = run_dag(cfg, STAGES, only=only, start=args.start, until=args.until)
    print(format_summary(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
