"""What a person reads while a job runs: progress with an ETA, and as little else as possible.

Long stages report progress as lines (``[train_lfm] step 100/500 ... ETA 4m10s``): Ray forwards
a worker's output to the driver line by line, so nothing that runs in a worker has a terminal.
Ray Data's own progress bars are drawn only where the driver writes to a terminal.

Third-party chatter (start-up notices, INFO logs, a progress bar per model load) is kept off
the console where it carries nothing a user acts on; a warning or an error never is, and
everything still reaches Ray's log files (``<session>/logs``). Only the standard library here:
the training loop imports this module without Ray.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

# Every Ray worker gets these (a value the user exported wins): a worker never has a terminal,
# and each actor that loads a model would add a progress bar that reaches the log as lines.
WORKER_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bar
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # the system-metrics monitor's start/stop notices
}

# Ray Data's hint that follows our own choice to turn its bars off where there is no terminal.
RAY_DATA_BARS_OFF = "Progress bars disabled."
# The Ray Data modules whose INFO lines reach the console in our runs ("Dataset ... execution
# finished in 5.72 seconds"; progress-UI notices) and the one that logs the hint above.
RAY_DATA_LOGGERS = ("ray.data._internal.execution.streaming_executor", "ray.data._internal.progress")
# Ray's notice that a new local cluster has token authentication on (its secure default; the
# warning for a cluster *without* authentication is another message, and stays).
RAY_TOKEN_AUTH_ON = "Token authentication is enabled for this Ray cluster."
RAY_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def format_duration(seconds: float) -> str:
    """``7s``, ``1m12s``, ``2h03m``: whole seconds, at most two units (negative counts as 0)."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def eta_seconds(done: int, total: int, elapsed: float) -> float | None:
    """Seconds left for ``total - done`` more units at the rate measured over ``done`` in
    ``elapsed`` seconds; None before there is a rate."""
    if done <= 0 or elapsed <= 0:
        return None
    return max(0, total - done) * elapsed / done


def progress(done: int, total: int, elapsed: float, left: float | None = None) -> str:
    """``1m12s elapsed, ETA 1m48s``: ``left`` seconds, else :func:`eta_seconds` (``ETA ?``
    before the first unit is done)."""
    if left is None:
        left = eta_seconds(done, total, elapsed)
    return f"{format_duration(elapsed)} elapsed, ETA {'?' if left is None else format_duration(left)}"


class StepClock:
    """Elapsed time and an ETA for ``total`` units of work that start when this is made.

    The rate leaves the first unit out once a later one is done: it pays for start-up (the
    first batch read, the first forward pass) that the rest of the run does not repeat.
    """

    def __init__(self, total: int, clock: Callable[[], float] = time.perf_counter):
        self.total, self.clock = total, clock
        self.start = clock()
        self.first_done: float | None = None

    def tick(self, done: int) -> None:
        """``done`` units are finished (call after each)."""
        if self.first_done is None and done >= 1:
            self.first_done = self.clock()

    def progress(self, done: int) -> str:
        """:func:`progress` after ``done`` units."""
        now = self.clock()
        left = None
        if done > 1 and self.first_done is not None:
            left = eta_seconds(done - 1, self.total - 1, now - self.first_done)
        return progress(done, self.total, now - self.start, left)


def progress_bars() -> bool:
    """Whether Ray Data draws progress bars: where stdout is a terminal, unless ``LAFMA_PROGRESS``
    (``1`` or ``0``) says otherwise. In a log file a bar is a line per redraw."""
    forced = os.environ.get("LAFMA_PROGRESS", "").strip().lower()
    if forced:
        return forced not in ("0", "false", "no", "off")
    return sys.stdout.isatty()


def worker_env() -> dict[str, str]:
    """:data:`WORKER_ENV`, with the user's own values where they exported one."""
    return {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of ``prefixes``; passes every other."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


class OffRayDataConsole(DropMessages):
    """Marks INFO records, and those starting with one of ``prefixes``, for Ray Data's file log
    only: its console handler drops records with ``hide`` set (Ray Data's own mechanism), its
    file handler keeps them. Ray Data rebuilds its handlers, not its modules' loggers, so this
    sits on the emitting loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not super().filter(record):
            record.hide = True
        return True


def drop_messages(logger_name: str, *prefixes: str, kind: type[DropMessages] = DropMessages) -> None:
    """Drop ``logger_name``'s records that start with one of ``prefixes`` (once per process;
    the filter sits on the logger, so it holds before the library that logs is imported)."""
    logger = logging.getLogger(logger_name)
    if not any(type(f) is kind and f.prefixes == prefixes for f in logger.filters):
        logger.addFilter(kind(*prefixes))


def quiet_ray_data() -> None:
    """Ray Data's console in this process shows its warnings and errors only (except the hint
    that bars are off); its INFO lines stay in ``ray-data.log``. The stages print their own
    progress. For the driver and for Ray Train workers (which run their ingest in-process)."""
    for name in RAY_DATA_LOGGERS:
        drop_messages(name, RAY_DATA_BARS_OFF, kind=OffRayDataConsole)


def quiet_train_worker() -> None:
    """Ray Train's per-report INFO line ("Reporting training result 3: TrainingReport(...)",
    with every metric, from every rank) comes from a logger Ray names by file path, outside
    ``ray.train``, so ``LoggingConfig(log_level=...)`` misses it; this module's warnings stay."""
    try:  # a private module: where a later Ray moves it, its line just shows again
        from ray.train.v2._internal.execution import context
    except ImportError:
        pass
    else:
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    quiet_ray_data()


def quiet_driver() -> None:
    """Keep third-party chatter off the driver's console (idempotent; call before ``ray.init``).

    Ray's notice that token authentication is on goes; Ray Data's console shows only warnings
    and errors (:func:`quiet_ray_data`); MLflow logs only warnings; and where stdout is no
    terminal, model loads and artifact downloads draw no bars.
    """
    drop_messages(RAY_TOKEN_AUTH_LOGGER, RAY_TOKEN_AUTH_ON)
    quiet_ray_data()
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:  # else MLflow applied the user's level at import
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    if not sys.stdout.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # read at each download
        # Read when huggingface_hub loads; transformers, if loaded already, is told directly.
        if os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1") == "1" and "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
