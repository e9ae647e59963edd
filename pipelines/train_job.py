"""Shared entry point of ``train_vae.py``, ``train_vocoder.py`` and ``train_lfm.py``."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from lafma.config import ConfigError, load_config  # noqa: E402
from pipelines.core.dag import format_summary, run_dag, with_needs  # noqa: E402
from pipelines.stages import STAGES  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def main(stage: str, argv: list[str] | None = None) -> int:
    """Run ``stage`` and whatever it needs (finished inputs are skipped, a stopped run resumes)."""
    p = argparse.ArgumentParser(description=f"Train one component: the '{stage}' stage and its inputs.")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {stage}.steps=2000")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(format_summary(run_dag(cfg, STAGES, only=with_needs(STAGES, stage))))
    return 0
