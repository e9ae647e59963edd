"""A time limit on one input file's work (read and decode), so no input can hold a data stage.

:func:`time_limit` arms a ``SIGALRM`` timer (``signal.setitimer``) around the work and raises
:class:`TimeLimitExceeded` from its handler when the timer fires. Python runs a signal handler
between bytecodes, and a blocking system call interrupted by a handler that raises gives up
(PEP 475 retries it only when the handler returns), so a read that never completes, or a
decode looping in Python, ends at the deadline. A single C call that neither blocks in a
system call nor returns to the interpreter (a long numpy or libsndfile loop) is interrupted
only once it returns; the data bounds (file size, header caps, the decoded length) keep those
short.

Signals reach Python's main thread only, and only it may install a handler. Ray runs a task
(the audio stage's shards) on its worker's main thread; an actor pool's calls run on a thread
of Ray Data's own (``make_callable_class_single_threaded``). Off the main thread, or inside an
enclosing timer (a test's ``signal.alarm``), the work runs without a limit and
:func:`time_limit` yields the reason, so the caller can say so. The actor-pool stages (text,
latents) read nothing a user names: they encode what earlier stages wrote, in bounded shapes.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class TimeLimitExceeded(BaseException):
    """The work under :func:`time_limit` ran past its deadline.

    A ``BaseException``, as ``KeyboardInterrupt`` is: it is raised wherever the work happens to
    be, and a library's ``except Exception`` (or a reader's ``except OSError``, which a
    ``TimeoutError`` would be) must not swallow it and carry on; the caller catches it by name.
    """


def unavailable() -> str | None:
    """Why :func:`time_limit` cannot arm a timer here, or None when it can."""
    if not hasattr(signal, "setitimer"):
        return "no interval timers on this platform"
    if threading.current_thread() is not threading.main_thread():
        return "not on the main thread (signals reach only the main thread)"
    if signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        return "a timer is already armed in this process"
    return None


@contextlib.contextmanager
def time_limit(seconds: float, what: str = "the work") -> Iterator[str | None]:
    """Raise :class:`TimeLimitExceeded` in the body once ``seconds`` have passed.

    Args:
        seconds: the limit; <= 0 means none.
        what: names the work in the exception's message.

    Yields:
        None when the limit is armed; else why it is not (see :func:`unavailable`), and the
        body runs without one.
    """
    why = "no limit set" if seconds <= 0 else unavailable()
    if why is not None:
        yield why
        return
    armed = True

    def expired(signum: int, frame: object) -> None:
        # Once the body has ended, a late signal must not raise in this context's cleanup.
        if armed:
            raise TimeLimitExceeded(f"{what} did not finish within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            yield None
        finally:
            armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:  # apart: should the timer fire as the body ends, the handler is still put back
        signal.signal(signal.SIGALRM, previous)
