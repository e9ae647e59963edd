"""Caption files for batch generation: read, validate, seed and name every row.

A caption file is ``.txt`` (one caption per line), ``.csv``, ``.jsonl`` or ``.parquet`` (a
``caption`` column; optional ``id``, ``seed``, ``steps``, ``guidance``, ``solver``,
``duration``), local or remote (fsspec). :func:`plan_generation` turns it into jobs and
rejects: a bad row (empty or non-UTF-8 caption, absurd duration, unknown solver, duplicate
id) becomes a reject with its reason; every good row still comes out.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import fsspec

from lafma.config import MAX_DURATION_SECONDS
from lafma.data.manifest import clean_caption, read_records
from lafma.flow import METHODS as SOLVERS

MAX_STEPS = 1000
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class GenerationRow:
    """One clip to generate. ``name`` is the file stem: safe on any filesystem and unique."""

    id: str
    name: str
    caption: str
    seed: int
    steps: int
    guidance: float
    solver: str
    duration: float

    @property
    def settings(self) -> tuple[int, float, str, float]:
        """What one ``generate`` call shares: (steps, guidance, solver, duration)."""
        return self.steps, self.guidance, self.solver, self.duration

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def derive_seed(job_seed: int, row_id: str) -> int:
    """A row's seed from the job seed and its id: stable across runs, shards and orderings."""
    return int.from_bytes(hashlib.sha256(f"{job_seed}:{row_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def safe_name(row_id: str, max_len: int = 80) -> str:
    """A file stem for ``row_id`` that cannot leave its directory.

    Only ``[A-Za-z0-9_.-]`` survive, leading dots are stripped (no ``..``, no hidden files),
    and any id that had to change gets a hash of the original, so two ids that clean to the
    same text (``../x`` and ``x``) still get different files.
    """
    clean = _UNSAFE.sub("_", row_id).lstrip(".")[:max_len].rstrip(".") or "row"
    if clean != row_id:
        clean = f"{clean}-{hashlib.sha256(row_id.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"
    return clean


def read_caption_records(uri: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Raw records (dicts with at least ``caption``) and rows that could not be parsed.

    ``.txt``: one caption per line, the id is the line number; blank lines are skipped, and a
    line that is not UTF-8 is kept (as bytes) so that it is rejected with its reason.
    """
    if not uri.lower().endswith(".txt"):
        return read_records(uri)
    with fsspec.open(uri, "rb") as f:
        data = f.read()
    records = []
    for n, line in enumerate(data.splitlines(), 1):
        if line.strip():
            records.append({"id": f"line-{n:06d}", "caption": line.lstrip(b"\xef\xbb\xbf") if n == 1 else line})
    return records, []


def _missing(value: Any) -> bool:
    """A cell with no value: None, NaN, pandas' NA (without importing pandas) or ""."""
    return (value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and value == "")
            or type(value).__name__ == "NAType")


def _number(value: Any, cast: type, default: Any) -> Any:
    """``default`` for a missing cell (None, NaN, ""), else ``cast(value)`` (may raise ValueError)."""
    if _missing(value):
        return default
    out = cast(float(value)) if cast is int else cast(value)
    if isinstance(out, float) and not math.isfinite(out):
        raise ValueError(f"{value!r} is not finite")
    if cast is int and float(value) != out:
        raise ValueError(f"{value!r} is not an integer")
    return out


def plan_generation(records: list[dict[str, Any]], *, job_seed: int, steps: int, guidance: float, solver: str,
                    duration: float, max_caption_chars: int = 512) -> tuple[list[GenerationRow], list[dict[str, str]]]:
    """Validate caption records and fill in each row's settings.

    Args:
        records: from :func:`read_caption_records`.
        job_seed: seeds rows that carry none (:func:`derive_seed` of the row id).
        steps, guidance, solver, duration: the job's settings; a row's own columns override them.

    Returns:
        ``(rows, rejects)``; a reject is ``{"id", "reason", "detail"}``.
    """
    rows: list[GenerationRow] = []
    rejects: list[dict[str, str]] = []
    seen: set[str] = set()
    for n, rec in enumerate(records, 1):
        rid = rec.get("id")
        rid = f"row-{n:06d}" if _missing(rid) or str(rid).strip() == "" else str(rid)

        def reject(reason: str, detail: str = "", rid: str = rid) -> None:
            rejects.append({"id": rid.encode("utf-8", "replace").decode("utf-8"), "reason": reason, "detail": detail[:200]})

        caption, why = clean_caption(rec.get("caption"), max_caption_chars)
        if why is not None:
            reject("empty_caption" if why == "missing_caption" else why)
            continue
        if rid in seen:
            reject("duplicate_id", "an earlier row has this id")
            continue
        try:
            row_steps = _number(rec.get("steps"), int, steps)
            row_guidance = _number(rec.get("guidance"), float, guidance)
            row_duration = _number(rec.get("duration"), float, duration)
            seed = _number(rec.get("seed"), int, None)
        except (TypeError, ValueError) as e:
            reject("bad_setting", str(e))
            continue
        row_solver = solver if _missing(rec.get("solver")) else str(rec["solver"])
        if not 0 < row_duration <= MAX_DURATION_SECONDS:
            reject("bad_duration", f"{row_duration} s is outside (0, {MAX_DURATION_SECONDS:g}]")
        elif not 1 <= row_steps <= MAX_STEPS:
            reject("bad_steps", f"{row_steps} is outside [1, {MAX_STEPS}]")
        elif row_guidance < 0:
            reject("bad_guidance", f"{row_guidance} is negative")
        elif row_solver not in SOLVERS:
            reject("bad_solver", f"{row_solver!r}; solvers are {', '.join(SOLVERS)}")
        else:
            seen.add(rid)
            rows.append(GenerationRow(rid, safe_name(rid), caption,
                                      derive_seed(job_seed, rid) if seed is None else seed % 2**31,
                                      row_steps, row_guidance, row_solver, row_duration))
    return rows, rejects


def batches(rows: list[GenerationRow], batch_size: int) -> list[list[GenerationRow]]:
    """Rows grouped by :attr:`GenerationRow.settings` (one ``generate`` call takes one of each),
    each group cut into batches of at most ``batch_size`` rows, groups in sorted order: the same
    rows always give the same batches (a resumed job cuts the shards it cut before)."""
    groups: dict[tuple, list[GenerationRow]] = {}
    for r in rows:
        groups.setdefault(r.settings, []).append(r)
    return [groups[key][i : i + batch_size] for key in sorted(groups) for i in range(0, len(groups[key]), batch_size)]
