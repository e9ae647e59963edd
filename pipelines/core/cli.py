"""What every pipeline entry point shares: ``--config FILE`` and ``key=value`` overrides."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lafma.config import ConfigError
from pipelines.config import PipelineConfig, load_pipeline_config
from pipelines.core.dag import StageReport, check_dag, run_dag
from pipelines.core.preflight import Preflight
from pipelines.core.stage import Stage

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "demo.yaml")


def add_config_args(p: argparse.ArgumentParser, example: str = "storage.root=s3://bucket/lafma") -> None:
    p.add_argument("--config", action="append",
                   help="YAML config (default: configs/demo.yaml); repeat it to layer another on top, "
                        "e.g. --config configs/lafma_audiocaps.yaml --config configs/cluster/gpu8.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {example}")


def load_or_exit(args: argparse.Namespace) -> PipelineConfig:
    """The validated config, or exit 2 with the offending key named (no traceback)."""
    try:
        return load_pipeline_config(args.config or [DEFAULT_CONFIG], args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run_dag_or_exit(cfg: PipelineConfig, stages: Sequence[Stage], **selection) -> list[StageReport]:
    """:func:`~pipelines.core.dag.run_dag`, with a config found wrong on the way (a stage's
    check, e.g. the text width against ``unet.context_dim``) reported like one found at load:
    the key named, exit 2, no traceback."""
    try:
        return run_dag(cfg, stages, **selection)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def check_dag_or_exit(cfg: PipelineConfig, stages: Sequence[Stage], **selection) -> Preflight:
    """:func:`~pipelines.core.dag.check_dag`, with a source found wrong (``resolve_sources``)
    reported like any config error."""
    try:
        return check_dag(cfg, stages, **selection)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
