"""Planned rows → audio: what a batch-generation shard and a served request share.

A row (:class:`lafma.data.captions.GenerationRow`) may start from an input clip (inpainting,
continuation, audio-to-audio) and may ask for best-of-N candidates. Its clip is read here with
the project's bounded reader (:func:`pipelines.core.storage.read_bounded`: allowed schemes,
size cap, time limit), decoded with soundfile and resampled to the model's rate
(:func:`lafma.audio.load_audio`: header caps before a sample is decoded); a clip that cannot
be used is a :class:`RowRejected` with its reason, never a failed shard or request.
:func:`generate_rows` then batches rows that share one ``generate`` call's arguments and keeps
each row's best candidate (:func:`lafma.metrics.scoring.best_of_n`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lafma.audio import AudioError, load_audio
from lafma.data.captions import GenerationRow
from lafma.metrics.scoring import Pick, best_of_n
from pipelines.core import storage
from pipelines.core.limits import ClipLimits


class RowRejected(Exception):
    """A row that cannot be generated; ``reason`` is a rejects-table code, ``row_id`` the row's
    id where the raiser knows it."""

    def __init__(self, reason: str, detail: str = "", row_id: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.row_id = reason, detail[:200], row_id


def read_clip_bytes(uri: str, limits: ClipLimits) -> bytes:
    """The bytes of an input clip at ``uri``, read within ``limits``.

    Raises:
        RowRejected: ``scheme_not_allowed``, ``not_a_file``, ``too_large``, ``timeout``,
            ``missing`` or ``unreadable``.
    """
    try:
        return storage.read_bounded(uri, max_bytes=limits.max_bytes, allowed_schemes=limits.allowed_schemes,
                                    timeout=limits.timeout)
    except storage.InputRefused as e:
        raise RowRejected(e.reason, e.detail) from None
    except FileNotFoundError:
        raise RowRejected("missing", "no such file") from None
    except (OSError, ValueError) as e:
        raise RowRejected("unreadable", str(e)) from None


def decode_clip(data: bytes, sample_rate: int, limits: ClipLimits, *, name: str, seconds: float | None = None) -> Tensor:
    """A clip's bytes → (N,) float32 mono at ``sample_rate``.

    Args:
        seconds: decode only this much of the start (the row's duration), or all of it.

    Raises:
        RowRejected: ``too_large``, or :class:`lafma.audio.AudioError`'s reason (``empty``,
            ``undecodable``, ``too_long``, ``rate_too_high``, ``too_many_channels``, ...).
    """
    if len(data) > limits.max_bytes:
        raise RowRejected("too_large", f"{len(data) / 2**20:.1f} MiB > {limits.max_bytes / 2**20:.1f} MiB")
    try:
        return load_audio(data, sample_rate, name=name, max_seconds=limits.max_seconds,
                          max_sample_rate=limits.max_sample_rate, max_channels=limits.max_channels,
                          decode_seconds=seconds)
    except AudioError as e:
        raise RowRejected(e.reason, e.detail) from None


@dataclass
class Clip:
    """A row's input clip: the waveform at the model's rate and the SHA-256 of the file's bytes."""

    wave: Tensor
    sha256: str


def load_clip(data: bytes, sample_rate: int, limits: ClipLimits, *, name: str, seconds: float | None) -> Clip:
    return Clip(decode_clip(data, sample_rate, limits, name=name, seconds=seconds), hashlib.sha256(data).hexdigest())


def with_clip_duration(row: GenerationRow, clip: Clip | None, sample_rate: int) -> GenerationRow:
    """``row`` with its duration known: a row without one lasts as long as its clip.

    Raises:
        RowRejected: ``bad_region``: the region starts at or past the clip's end.
    """
    if row.duration is not None:
        return row
    if clip is None:
        raise ValueError(f"row {row.id} has neither a duration nor an input clip")
    duration = clip.wave.shape[-1] / sample_rate
    if row.start is not None and row.start >= duration:
        raise RowRejected("bad_region", f"starts at {row.start} s, past the clip's end ({duration:.3f} s): give a "
                                        "longer duration to continue it")
    return replace(row, duration=duration)


@dataclass
class RowResult:
    """One generated row.

    Attributes:
        row: as planned, with its duration known.
        pick: the kept candidate (its audio, seed, score) and every candidate's seed and score.
        sample_rate: of ``pick.audio``.
        seconds: wall time of the row's share of its ``generate`` calls (all its candidates).
        clip_sha256: SHA-256 of the input clip's bytes, or None.
    """

    row: GenerationRow
    pick: Pick
    sample_rate: int
    seconds: float
    clip_sha256: str | None = None


def generate_rows(pipe, rows: Sequence[GenerationRow], clips: Mapping[str, Clip], *, scorer=None,
                  batch_size: int = 8) -> tuple[list[RowResult], list[RowRejected]]:
    """Generate ``rows``, each from its clip in ``clips`` (by row id) when it has one.

    Rows sharing steps, guidance, solver, duration, strength and region go through one
    :func:`~lafma.metrics.scoring.best_of_n` (``batch_size`` clips per ``generate`` call,
    candidates included); each row's audio depends only on its own caption, seed and clip.

    Args:
        pipe: a :class:`~lafma.pipeline.LafmaPipeline`.
        rows: planned rows; a row with ``audio`` needs its :class:`Clip` in ``clips``.
        scorer: ranks candidates (a :class:`~lafma.metrics.scoring.TextAudioScorer`); needed
            for rows with more than one; with one, it scores the row's clip when given.

    Returns:
        ``(results, rejected)``: results in the order of ``rows`` that could be generated;
        ``rejected`` holds a :class:`RowRejected` (with ``row_id``) for each that could not;
        ``bad_duration`` for a row longer than a model conditioned on duration learned (a row
        without a duration of its own lasts as long as its clip, known only here).
    """
    sr = pipe.sample_rate
    groups: dict[tuple, list[GenerationRow]] = {}
    rejected: list[RowRejected] = []
    longest = getattr(pipe, "max_duration", None)  # set for a model conditioned on duration
    for row in rows:
        try:
            row = with_clip_duration(row, clips.get(row.id), sr)
            if longest is not None and row.duration > longest:  # a clip's length is known only now
                raise RowRejected("bad_duration", f"{row.duration:g} s is longer than the model's trained maximum, "
                                                  f"{longest:g} s")
        except RowRejected as e:
            rejected.append(RowRejected(e.reason, e.detail, row.id))
            continue
        groups.setdefault(row.batch_key, []).append(row)
    done: dict[str, RowResult] = {}
    for group in groups.values():
        first = group[0]
        audio = None
        if first.audio is not None:
            waves = [clips[r.id].wave for r in group]
            audio = torch.stack([torch.nn.functional.pad(w, (0, max(len(v) for v in waves) - len(w)))
                                 for w in waves])  # (B, N): the zeros encode_audio would pad with anyway
        t0 = time.perf_counter()
        try:
            picks = best_of_n(pipe.generate, [r.caption for r in group], [r.seed for r in group],
                              [r.candidates for r in group], scorer=scorer, batch_size=batch_size, audio=audio,
                              steps=first.steps, guidance=first.guidance, solver=first.solver,
                              duration=first.duration, strength=1.0 if first.strength is None else first.strength,
                              regenerate=first.region)
        except ValueError as e:  # the pipeline refused the group's arguments: its rows, not the shard
            rejected += [RowRejected("bad_request", str(e), r.id) for r in group]
            continue
        seconds = (time.perf_counter() - t0) / len(group)
        for r, pick in zip(group, picks):
            clip = clips.get(r.id)
            done[r.id] = RowResult(r, pick, sr, seconds, None if clip is None else clip.sha256)
    return [done[r.id] for r in rows if r.id in done], rejected
