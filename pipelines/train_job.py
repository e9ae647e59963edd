"""Shared entry point of ``train_vae.py``, ``train_vocoder.py`` and ``train_lfm.py``."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from pipelines.core.cli import add_config_args, load_or_exit, run_dag_or_exit  # noqa: E402
from pipelines.core.dag import format_summary, with_needs  # noqa: E402
from pipelines.stages import STAGES  # noqa: E402


def main(stage: str, argv: list[str] | None = None) -> int:
    """Run ``stage`` and whatever it needs (finished inputs are skipped, a stopped run resumes)."""
    p = argparse.ArgumentParser(description=f"Train one component: the '{stage}' stage and its inputs.")
    add_config_args(p, example=f"{stage}.steps=2000")
    args = p.parse_args(argv)
    cfg = load_or_exit(args)
    print(format_summary(run_dag_or_exit(cfg, STAGES, only=with_needs(STAGES, stage))))
    return 0
