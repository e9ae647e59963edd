"""Caption files for batch generation: read, validate, seed and name every row.

A caption file is ``.txt`` (one caption per line), ``.csv``, ``.jsonl`` or ``.parquet`` (a
``caption`` column; optional ``id``, ``seed``, ``steps``, ``guidance``, ``solver``,
``duration``, ``candidates``, and to start from a clip ``audio`` with ``start`` and ``end``
or ``strength``), local or remote (fsspec). :func:`plan_generation` turns it into jobs and
rejects: a bad row (empty or non-UTF-8 caption, absurd duration, unknown solver, duplicate
id, a region that cannot be regenerated) becomes a reject with its reason; every good row
still comes out. What can only be known by reading a row's clip (missing, undecodable, too
long) is rejected where the clip is read.
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
# Best-of-N: candidates generated per row. Each costs a full generation; past a few, the
# scorer's own noise decides more than the candidates differ.
MAX_CANDIDATES = 16
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class GenerationRow:
    """One clip to generate. ``name`` is the file stem: safe on any filesystem and unique.

    The fields after ``duration`` are optional (:data:`OPTIONAL_FIELDS`): a row that leaves
    them at their defaults is the row older jobs planned, and :meth:`to_dict` leaves them out,
    so its hash in an older ``plan.json`` still matches and such a job still resumes.

    Attributes:
        duration: seconds; None for a row with an input clip and no ``duration`` of its own:
            the clip's length, known once it is read.
        audio: the input clip's path or URI (or, in a served request, a reference to the
            clip the request carries).
        start, end: seconds to regenerate (inpainting; continuation past the clip's end).
        strength: audio-to-audio (SDEdit) strength in [0, 1]; None: not audio-to-audio.
        candidates: best-of-N: seeds ``seed, seed + 1, ...`` generated, the best-scored kept.
    """

    id: str
    name: str
    caption: str
    seed: int
    steps: int
    guidance: float
    solver: str
    duration: float | None
    audio: str | None = None
    start: float | None = None
    end: float | None = None
    strength: float | None = None
    candidates: int = 1

    @property
    def settings(self) -> tuple[int, float, str, float | None]:
        """(steps, guidance, solver, duration): the sampler settings one ``generate`` call shares."""
        return self.steps, self.guidance, self.solver, self.duration

    @property
    def region(self) -> tuple[float, float] | None:
        """``(start, end)`` seconds to regenerate, or None."""
        return None if self.start is None or self.end is None else (self.start, self.end)

    @property
    def batch_key(self) -> tuple:
        """What rows batched into one ``generate`` call share: the sampler settings, the
        strength, the region and whether they start from a clip (None sorts first)."""
        return (self.steps, self.guidance, self.solver, *(_sortable(v) for v in (self.duration, self.strength,
                                                                                 self.start, self.end)),
                self.audio is not None)

    def extras(self) -> dict[str, Any]:
        """The optional fields this row sets (those not at their defaults)."""
        return {k: getattr(self, k) for k, default in OPTIONAL_FIELDS.items() if getattr(self, k) != default}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in OPTIONAL_FIELDS.keys() - self.extras().keys():
            del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationRow:
        """The row :meth:`to_dict` gave, also from a table whose other rows set more fields (an
        optional field that is null here takes its default)."""
        return cls(**{k: v for k, v in d.items() if not (k in OPTIONAL_FIELDS and v is None)})


# GenerationRow's optional fields and their defaults.
OPTIONAL_FIELDS: dict[str, Any] = {"audio": None, "start": None, "end": None, "strength": None, "candidates": 1}


def _sortable(value: float | None) -> tuple[bool, float]:
    return (value is not None, 0.0 if value is None else float(value))


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


class _Refused(ValueError):
    """A row that cannot be generated: ``reason`` (a rejects-table code) and a detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _clip_fields(rec: dict[str, Any], *, solver: str, duration: float | None) -> dict[str, Any]:
    """A record's input-clip columns (``audio``, ``start``, ``end``, ``strength``), checked.

    What can be checked without the clip is: a region is ``0 <= start < end`` and both are
    given, it lies before the row's own ``duration`` when the row has one, it needs a
    fixed-step solver (dopri5 chooses its own steps, the known frames are put back after each);
    ``strength`` is in [0, 1]; a region and a strength below 1 are not combined in one row; and
    either needs a clip, which does nothing without one of them.

    Raises:
        _Refused: with the reason.
    """
    audio = rec.get("audio")
    if _missing(audio):
        audio = None
    elif not isinstance(audio, str) or not audio.strip():
        raise _Refused("bad_audio", f"audio must be a path or URI, got {audio!r}"[:200])
    try:
        start, end = _number(rec.get("start"), float, None), _number(rec.get("end"), float, None)
        strength = _number(rec.get("strength"), float, None)
    except (TypeError, ValueError) as e:
        raise _Refused("bad_setting", str(e)) from None
    if (start is None) != (end is None):
        raise _Refused("bad_region", "give both start and end (seconds), or neither")
    region = start is not None
    if audio is None and (region or strength is not None):
        raise _Refused("no_audio", "start, end and strength regenerate part of an input clip: give its audio")
    if strength is not None and not 0.0 <= strength <= 1.0:
        raise _Refused("bad_strength", f"{strength} is outside [0, 1]")
    if region:
        if not 0.0 <= start < end:
            raise _Refused("bad_region", f"{start}:{end}: need 0 <= start < end seconds")
        if duration is not None and start >= duration:
            raise _Refused("bad_region", f"starts at {start} s, past the clip's {duration} s: nothing to regenerate")
        if solver == "dopri5":
            raise _Refused("bad_region", "dopri5 chooses its own steps: regenerating a region needs a fixed-step "
                                         "solver")
        if strength is not None and strength < 1.0:
            raise _Refused("bad_region", "a region (start, end) and a strength below 1 in one row: choose "
                                         "inpainting or audio-to-audio")
    if audio is not None and not region and strength is None:
        raise _Refused("audio_unused", "an input clip needs start and end (inpainting, continuation) or strength "
                                       "(audio-to-audio)")
    return {"audio": audio, "start": start, "end": end, "strength": strength}


def plan_generation(records: list[dict[str, Any]], *, job_seed: int, steps: int, guidance: float, solver: str,
                    duration: float, candidates: int = 1, max_caption_chars: int = 512,
                    max_duration: float | None = None) -> tuple[list[GenerationRow], list[dict[str, str]]]:
    """Validate caption records and fill in each row's settings.

    Args:
        records: from :func:`read_caption_records`.
        job_seed: seeds rows that carry none (:func:`derive_seed` of the row id).
        steps, guidance, solver, duration, candidates: the job's settings; a row's own columns
            override them. A row with an input clip and no ``duration`` lasts as long as its
            clip, whatever the job's ``duration``.
        max_duration: the model's longest clip (:attr:`lafma.config.LafmaConfig.max_duration`,
            set for a model conditioned on duration); a row asking for more is a
            ``bad_duration`` reject. None: up to :data:`MAX_DURATION_SECONDS`.

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
            own_duration = _number(rec.get("duration"), float, None)
            row_candidates = _number(rec.get("candidates"), int, candidates)
            seed = _number(rec.get("seed"), int, None)
        except (TypeError, ValueError) as e:
            reject("bad_setting", str(e))
            continue
        row_solver = solver if _missing(rec.get("solver")) else str(rec["solver"])
        has_clip = not _missing(rec.get("audio"))
        row_duration = own_duration if own_duration is not None or has_clip else duration
        if row_duration is not None and not 0 < row_duration <= MAX_DURATION_SECONDS:
            reject("bad_duration", f"{row_duration} s is outside (0, {MAX_DURATION_SECONDS:g}]")
        elif row_duration is not None and max_duration is not None and row_duration > max_duration:
            reject("bad_duration", f"{row_duration} s is longer than the model's trained maximum, {max_duration:g} s")
        elif not 1 <= row_steps <= MAX_STEPS:
            reject("bad_steps", f"{row_steps} is outside [1, {MAX_STEPS}]")
        elif row_guidance < 0:
            reject("bad_guidance", f"{row_guidance} is negative")
        elif row_solver not in SOLVERS:
            reject("bad_solver", f"{row_solver!r}; solvers are {', '.join(SOLVERS)}")
        elif not 1 <= row_candidates <= MAX_CANDIDATES:
            reject("bad_candidates", f"{row_candidates} is outside [1, {MAX_CANDIDATES}]")
        else:
            try:
                clip = _clip_fields(rec, solver=row_solver, duration=row_duration)
            except _Refused as e:
                reject(e.reason, e.detail)
                continue
            seen.add(rid)
            rows.append(GenerationRow(rid, safe_name(rid), caption,
                                      derive_seed(job_seed, rid) if seed is None else seed % 2**31,
                                      row_steps, row_guidance, row_solver, row_duration, **clip,
                                      candidates=row_candidates))
    return rows, rejects


def batches(rows: list[GenerationRow], batch_size: int) -> list[list[GenerationRow]]:
    """Rows grouped by :attr:`GenerationRow.batch_key` (one ``generate`` call takes one of
    each), each group cut into batches of at most ``batch_size`` rows, groups in sorted order:
    the same rows always give the same batches (a resumed job cuts the shards it cut before;
    rows without the optional fields group as they always did)."""
    groups: dict[tuple, list[GenerationRow]] = {}
    for r in rows:
        groups.setdefault(r.batch_key, []).append(r)
    return [groups[key][i : i + batch_size] for key in sorted(groups) for i in range(0, len(groups[key]), batch_size)]
