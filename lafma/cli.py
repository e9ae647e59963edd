"""The ``lafma`` command: ``lafma describe --config PATH [--json]``.

``lafma generate`` needs the model registry, so it is added by ``pipelines.lafma_cli`` (the
installed entry point); this module stays free of MLflow.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from lafma.config import ConfigError, LafmaConfig, load_config
from lafma.describe import describe, format_description


def _describe(args: argparse.Namespace) -> int:
    cfg: LafmaConfig = load_config(args.config, args.overrides, cls=args.config_cls)
    info = describe(cfg, load_text_encoder=args.load_text_encoder)
    info["config_path"] = args.config
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def build_parser(extend: Callable[[argparse._SubParsersAction], None] | None = None) -> argparse.ArgumentParser:
    """The parser; ``extend`` adds more subcommands (``pipelines.lafma_cli`` adds ``generate``)."""
    parser = argparse.ArgumentParser(prog="lafma", description="LAFMA: text-to-audio by latent flow matching.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("describe", help="every component's parameter count and a clip's mel/latent shapes")
    d.add_argument("--config", required=True, help="YAML config, e.g. configs/lafma_audiocaps.yaml")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.add_argument("--load-text-encoder", action="store_true",
                   help="load the text encoder to count it (needs its weights locally)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    d.set_defaults(func=_describe)
    if extend is not None:
        extend(sub)
    return parser


def main(argv: Sequence[str] | None = None,
         extend: Callable[[argparse._SubParsersAction], None] | None = None,
         config_cls: type[LafmaConfig] = LafmaConfig) -> int:
    """Run the command line; ``config_cls`` reads ``--config`` (the installed command passes the
    pipeline's, so a pipeline config with its data and training sections describes its model)."""
    args = build_parser(extend).parse_args(argv)
    args.config_cls = config_cls
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"lafma: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
