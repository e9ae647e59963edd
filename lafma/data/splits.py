"""Held-out splits for a dataset whose manifest does not give them.

A clip's side is decided by a hash of the clip itself (its audio path), not by row order or
a random draw: the same file lands on the same side on every machine and every re-run, a
clip listed once per caption (AudioCaps' layout) never has captions on both sides, and
adding files to a dataset moves none of the old ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

HELD_OUT = ("validation", "test")


@dataclass(frozen=True)
class SplitReport:
    """What :func:`assign_splits` did: clips per split, how many clips it drew a side for, and
    why, in words."""

    counts: dict[str, int]
    reason: str
    drawn: int = 0


def clip_key(row: dict[str, Any]) -> str:
    """The identity of a clip: its audio, so every caption row of one file shares a side."""
    return row.get("audio_uri") or row["id"]


def _position(key: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by ``key`` (and ``salt``)."""
    h = hashlib.sha256(f"{salt}\x1f{key}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def assign_splits(rows: Sequence[dict[str, Any]], *, fraction: float, min_clips: int,
                  salt: str = "lafma-heldout") -> SplitReport:
    """Give every row whose ``split`` is empty a side: ``validation``, ``test`` or ``train``.

    Each clip gets a position in [0, 1) from a hash of :func:`clip_key`: below ``fraction`` it
    is validation, below ``2 * fraction`` test, else train — a clip's side depends on the clip
    alone, so growing a dataset never moves an old training clip into evaluation. A held-out
    split with fewer than ``min_clips`` is topped up with the training clips of lowest position
    (never beyond a quarter of the clips each, so training keeps at least half). Rows that
    already have a split keep it. ``rows`` is changed in place.

    Args:
        rows: manifest rows (``id``, ``audio_uri``, ``split``; ``""`` = not given).
        fraction: share of the unassigned clips for each held-out split.
        min_clips: the least a held-out split gets (evaluation needs a few clips to score).
        salt: changes which clips are held out, for a second, independent draw.

    Returns:
        The clips per split over all rows, how many clips were drawn, and a sentence saying how.
    """
    open_keys = sorted({clip_key(r) for r in rows if not r["split"]}, key=lambda k: (_position(k, salt), k))
    n = len(open_keys)
    position = {k: _position(k, salt) for k in open_keys}
    held = {"validation": [k for k in open_keys if position[k] < fraction],
            "test": [k for k in open_keys if fraction <= position[k] < 2 * fraction]}
    rest = [k for k in open_keys if position[k] >= 2 * fraction]  # in position order
    for split in HELD_OUT:
        need = max(0, min(min_clips, n // 4) - len(held[split]))
        held[split], rest = held[split] + rest[:need], rest[need:]
    side = {k: split for split in HELD_OUT for k in held[split]}
    for r in rows:
        if not r["split"]:
            r["split"] = side.get(clip_key(r), "train")
    clips: dict[str, set[str]] = {}
    for r in rows:
        clips.setdefault(r["split"], set()).add(clip_key(r))
    counts = {s: len(clips.get(s, ())) for s in ("train", *HELD_OUT)}
    if n == 0:
        reason = "splits as the manifest gives them"
    else:
        which = "no split in the manifest" if n == len({clip_key(r) for r in rows}) else \
            f"{n} clips without a split in the manifest"
        reason = (f"{which}: {len(held['validation'])} validation and {len(held['test'])} test clips drawn by a "
                  f"hash of each clip; data.heldout_fraction={fraction:g}, data.heldout_min={min_clips}")
    return SplitReport(counts, reason, n)
