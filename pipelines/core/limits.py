"""What one served request may ask for, checked before any work: a request over a limit is
answered 400 with the column and the limit, not run for hours or out of memory.

The per-row limits are batch generation's (:mod:`lafma.data.captions`): a caption file's row
asking for more steps or a longer clip is rejected there, and the same row sent to the served
model is refused here. The row limit is a request's own: every clip of a request comes back
in one response.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from lafma.config import MAX_DURATION_SECONDS
from lafma.data.captions import MAX_STEPS

# Rows per request: eight of predict's pipeline calls (PREDICT_BATCH = 8 clips each). The
# answer holds every clip's audio as JSON numbers, about 20 bytes a sample: 64 ten-second
# clips at 16 kHz are some 200 MB of response already. More rows belong in a batch job.
MAX_REQUEST_ROWS = 64


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


def check_request(request: Any, *, max_rows: int = MAX_REQUEST_ROWS, max_steps: int = MAX_STEPS,
                  max_seconds: float = MAX_DURATION_SECONDS) -> None:
    """Refuse a request to the served model that asks for more than the limits allow.

    Args:
        request: the pyfunc's input: a table (or anything ``pandas.DataFrame`` takes) with a
            ``caption`` column and optional ``steps`` and ``duration`` columns per row.
        max_rows: most rows one request may hold.
        max_steps: a row's ``steps`` must be in ``[1, max_steps]``.
        max_seconds: a row's ``duration`` must be in ``(0, max_seconds]``.

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
