"""What one served request may ask for, checked before any work: a request over a limit is
answered 400 with the column and the limit, not run for hours or out of memory. And what an
input clip (``audio``: inpainting, continuation, audio-to-audio) may be, in a batch job and in
a served request.

The per-row limits are batch generation's (:mod:`lafma.data.captions`): a caption file's row
asking for more steps or a longer clip is rejected there, and the same row sent to the served
model is refused here. The row and clip limits are a request's own: every clip of a request
comes back in one response.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from lafma.config import MAX_DURATION_SECONDS
from lafma.data.captions import MAX_CANDIDATES, MAX_STEPS
from lafma.data.manifest import scheme_refusal

# Rows per request: eight of predict's pipeline calls (PREDICT_BATCH = 8 clips each). The
# answer holds every clip's audio as JSON numbers, about 20 bytes a sample: 64 ten-second
# clips at 16 kHz are some 200 MB of response already. More rows belong in a batch job.
MAX_REQUEST_ROWS = 64
# Clips generated for one request, every best-of-N candidate counted (only the kept ones come
# back): 16 of predict's pipeline calls. 64 rows of 2 candidates, or 8 rows of 16.
MAX_REQUEST_CLIPS = 128


@dataclass(frozen=True)
class ClipLimits:
    """What an input clip may be; every limit is checked before the work it protects.

    Attributes:
        max_bytes: the file (or a request's decoded ``audio_b64``), from its size before a
            byte is read.
        max_seconds, max_sample_rate, max_channels: from the header, before a sample is
            decoded (a clip longer than the model can generate is of no use).
        allowed_schemes: URI schemes an ``audio`` path may use (``file``: a local path).
        timeout: seconds a remote read may take.
    """

    max_bytes: int
    max_seconds: float = MAX_DURATION_SECONDS
    max_sample_rate: int = 192_000
    max_channels: int = 8
    allowed_schemes: tuple[str, ...] = ("file", "s3")
    timeout: float = 120.0


# A batch job's input clips: paths or URIs in the caption file, read by the generation actors.
# 256 MiB holds 600 s of 48 kHz stereo 32-bit float audio (230 MB), the longest useful clip.
BATCH_CLIP = ClipLimits(max_bytes=256 * 2**20)
# The served model's: the bytes of the clip in the request's ``audio_b64`` column (base64 of a
# wav / flac / ogg file). A JSON request holds them whole in the server's memory, so less: 16
# MiB a clip (about 8 min of 16 kHz 16-bit mono) and 64 MiB a request. A path or URI in an
# ``audio`` column is refused unless the server's operator names the schemes it may read
# (SERVE_SCHEMES_ENV, e.g. "s3"): a client must not make the server read its own files.
SERVE_SCHEMES_ENV = "LAFMA_SERVE_AUDIO_SCHEMES"
MAX_REQUEST_AUDIO_BYTES = 64 * 2**20


def served_clip_limits() -> ClipLimits:
    """The served model's :class:`ClipLimits`; its schemes from ``$LAFMA_SERVE_AUDIO_SCHEMES``
    (comma-separated, none by default)."""
    schemes = tuple(s.strip() for s in os.environ.get(SERVE_SCHEMES_ENV, "").split(",") if s.strip())
    return ClipLimits(max_bytes=16 * 2**20, allowed_schemes=schemes, timeout=30.0)


def _refuse(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE: MLflow's scoring server answers 400 with this message.
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _column_values(frame: pd.DataFrame, column: str) -> list[tuple[int, float]]:
    """(row position, value) of every given cell of ``column``; a cell that is no number is refused."""
    if column not in frame.columns:
        return []
    out = []
    for i, v in enumerate(frame[column].tolist()):
        if v is None or (pd.api.types.is_scalar(v) and pd.isna(v)):
            continue  # not given: the model's default
        try:
            out.append((i, float(v)))
        except (TypeError, ValueError):
            raise _refuse(f"{column}: row {i} is {v!r}, not a number") from None
    return out


def _given(v: Any) -> bool:
    return not (v is None or (pd.api.types.is_scalar(v) and pd.isna(v)) or (isinstance(v, str) and v == ""))


def _b64_bytes(text: str) -> int:
    return len(text) // 4 * 3  # what base64 text decodes to, at most


def decode_b64_clip(value: Any, row: int, max_bytes: int) -> bytes:
    """The clip bytes of one ``audio_b64`` cell, refused (400) when it is no base64 text or
    decodes to more than ``max_bytes``: the size is checked on the text, before decoding."""
    if not isinstance(value, str):
        raise _refuse(f"audio_b64: row {row} is {type(value).__name__}, not base64 text")
    if _b64_bytes(value) > max_bytes + 2:  # padding: up to 2 bytes fewer than the text's length says
        raise _refuse(f"audio_b64: row {row} holds about {_b64_bytes(value) / 2**20:.1f} MiB; at most "
                      f"{max_bytes / 2**20:g} MiB a clip")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _refuse(f"audio_b64: row {row} is not valid base64") from None
    if len(data) > max_bytes:
        raise _refuse(f"audio_b64: row {row} holds {len(data) / 2**20:.1f} MiB; at most {max_bytes / 2**20:g} MiB a clip")
    return data


def _check_clips(frame: pd.DataFrame, limits: ClipLimits) -> None:
    """``audio`` paths only under the served schemes; ``audio_b64`` base64, within the byte caps."""
    if "audio" in frame.columns:
        for i, uri in enumerate(frame["audio"].tolist()):
            if not _given(uri):
                continue
            if not limits.allowed_schemes:
                raise _refuse(f"audio: row {i} names a path or URI; this server reads none (send the clip's bytes "
                              f"as base64 in audio_b64, or the operator sets {SERVE_SCHEMES_ENV})")
            if (why := scheme_refusal(str(uri), limits.allowed_schemes)) is not None:
                raise _refuse(f"audio: row {i}: {why}")
            if "audio_b64" in frame.columns and _given(frame["audio_b64"].iloc[i]):
                raise _refuse(f"audio: row {i} has both audio and audio_b64; give one")
    if "audio_b64" in frame.columns:  # sizes from the text alone; decode_b64_clip decodes each when it is used
        cells = [(i, v) for i, v in enumerate(frame["audio_b64"].tolist()) if _given(v)]
        for i, v in cells:
            if not isinstance(v, str):
                raise _refuse(f"audio_b64: row {i} is {type(v).__name__}, not base64 text")
            if _b64_bytes(v) > limits.max_bytes + 2:
                raise _refuse(f"audio_b64: row {i} holds about {_b64_bytes(v) / 2**20:.1f} MiB; at most "
                              f"{limits.max_bytes / 2**20:g} MiB a clip")
        if (total := sum(_b64_bytes(v) for _, v in cells)) > MAX_REQUEST_AUDIO_BYTES:
            raise _refuse(f"audio_b64: the request holds about {total / 2**20:.0f} MiB of clips; at most "
                          f"{MAX_REQUEST_AUDIO_BYTES / 2**20:g} MiB a request")


def check_request(request: Any, *, max_rows: int = MAX_REQUEST_ROWS, max_steps: int = MAX_STEPS,
                  max_seconds: float = MAX_DURATION_SECONDS, max_clips: int = MAX_REQUEST_CLIPS,
                  clip_limits: ClipLimits | None = None) -> None:
    """Refuse a request to the served model that asks for more than the limits allow.

    Args:
        request: the pyfunc's input: a table (or anything ``pandas.DataFrame`` takes) with a
            ``caption`` column and optional ``steps``, ``duration``, ``candidates``, ``audio``
            and ``audio_b64`` columns per row.
        max_rows: most rows one request may hold.
        max_steps: a row's ``steps`` must be in ``[1, max_steps]``.
        max_seconds: a row's ``duration`` must be in ``(0, max_seconds]``.
        max_clips: most clips one request may generate: the sum of its rows' ``candidates``
            (each in ``[1, MAX_CANDIDATES]``).
        clip_limits: what an input clip may be (:func:`served_clip_limits` by default).

    Raises:
        MlflowException: ``INVALID_PARAMETER_VALUE`` (HTTP 400), naming the column, the first
            row over the limit and the limit.
    """
    frame = request if isinstance(request, pd.DataFrame) else pd.DataFrame(request)
    if len(frame) > max_rows:
        raise _refuse(f"rows: the request has {len(frame)} rows, at most {max_rows} are served per request "
                      "(split it, or run a batch generation job)")
    if "caption" not in frame.columns:
        raise _refuse(f"caption: the request needs a 'caption' column; got {list(frame.columns)}")
    for i, steps in _column_values(frame, "steps"):
        if not 1 <= steps <= max_steps:
            raise _refuse(f"steps: row {i} asks for {steps:g}; steps must be in [1, {max_steps}]")
    for i, seconds in _column_values(frame, "duration"):
        if not 0 < seconds <= max_seconds:
            raise _refuse(f"duration: row {i} asks for {seconds:g} s; duration must be in (0, {max_seconds:g}] s")
    counts = dict(_column_values(frame, "candidates"))
    for i, n in counts.items():
        if not 1 <= n <= MAX_CANDIDATES:
            raise _refuse(f"candidates: row {i} asks for {n:g}; candidates must be in [1, {MAX_CANDIDATES}]")
    if (clips := sum(counts.get(i, 1) for i in range(len(frame)))) > max_clips:
        raise _refuse(f"candidates: the request asks for {clips:g} clips in all (rows x candidates); at most "
                      f"{max_clips} are generated per request")
    _check_clips(frame, clip_limits or served_clip_limits())
