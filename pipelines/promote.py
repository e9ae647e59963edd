"""Move the registry's ``champion`` alias by hand, with a record of who and why.

    python pipelines/promote.py --version 7 --reason "listening test: fewer artefacts"
    python pipelines/promote.py --gate                       # the metric gate, as the pipeline runs it
    python pipelines/promote.py --rollback --reason "v7 clips at the end"
    python pipelines/promote.py --show                       # versions, aliases, gate metrics, stack

``--gate`` prints ``v<N> <outcome>: <reason>``, the outcome one of ``promoted``, ``kept``,
``not_comparable``, ``already_champion``, ``nan`` (see :class:`pipelines.core.registry.Decision`).
Each ``--rollback`` goes one version further down the champion stack.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from pipelines.config import StorageConfig  # noqa: E402
from pipelines.core import registry, storage, tracking  # noqa: E402


def show(root: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri(root))
    lines = [f"{'version':>8}  {'aliases':<20} {'gate metric':<20} {'value':>10}  promoted by / why"]
    for v in sorted(client.search_model_versions(f"name='{registry.MODEL_NAME}'"), key=lambda v: int(v.version)):
        t = v.tags
        lines.append(f"{v.version:>8}  {','.join(v.aliases):<20} {t.get(registry.GATE_METRIC_TAG, ''):<20} "
                     f"{float(t.get(registry.GATE_VALUE_TAG, 'nan')):>10.5g}  "
                     f"{t.get('lafma.promoted_by', '')} {t.get('lafma.promoted_reason', '')}".rstrip())
    return "\n".join([*lines, _stack_line(root)])


def _stack_line(root: str) -> str:
    stack = registry.champion_stack(root=root)
    if not stack:
        return "champion stack: empty (no champion)"
    below = f"rollback returns to v{stack[-2]}" if len(stack) > 1 else "nothing to roll back to"
    return f"champion stack (oldest first): {' > '.join(f'v{v}' for v in stack)} ({below})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--version", help="make this version the champion, whatever its metric")
    what.add_argument("--gate", action="store_true", help="promote the candidate only if it beats the champion")
    what.add_argument("--rollback", action="store_true", help="give champion back to the version it replaced "
                      "(again: one further back)")
    what.add_argument("--show", action="store_true", help="list versions, aliases, gate metrics and the champion stack")
    p.add_argument("--reason", default="", help="why (recorded on the version; required by hand)")
    p.add_argument("--by", default=getpass.getuser(), help="who (recorded; default: the current user)")
    p.add_argument("--root", default=StorageConfig().root, help="storage root of the MLflow store (default: .lafma)")
    args = p.parse_args(argv)
    root = storage.absolute(args.root)
    if (args.version or args.rollback) and not args.reason.strip():
        p.error("--reason is required when promoting or rolling back by hand")
    try:
        if args.show:
            print(show(root))
        elif args.gate:
            d = registry.gate(root=root)
            print(f"v{d.candidate} {d.outcome}: {d.reason}")
        elif args.rollback:
            v = registry.rollback(root=root, reason=args.reason, by=args.by)
            print(f"champion -> v{v} (rolled back by {args.by}: {args.reason})")
        else:
            prev = registry.promote(args.version, root=root, reason=args.reason, by=args.by)
            print(f"champion -> v{args.version} (was {f'v{prev}' if prev else 'none'}; by {args.by}: {args.reason})")
    except Exception as e:  # a missing version or alias: one line, no traceback
        print(f"promote: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
