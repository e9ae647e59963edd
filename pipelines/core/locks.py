"""One driver at a time per stage output: a lock beside the stage's directory.

Two drivers started on one storage root would otherwise both find a stage unfinished and write
its shards, checkpoints and marker at once. The DAG runner (:mod:`pipelines.core.dag`) takes
:func:`stage_lock` before it runs a stage; a second driver waits, saying which driver holds the
stage, and once it gets the lock finds the stage finished and skips it. Each driver holds at
most one stage's lock at a time, and both take them in DAG order, so they cannot deadlock.

Where the lock lives decides how a dead holder lets go:

- a local root (a network filesystem too): ``flock`` on ``<stage dir>.lock``. The kernel drops
  the lock when its holder's process ends however it ends, SIGKILL and a host crash
  included; the file's text (pid, host, start time) is only for the message. A process forked
  from the driver shares its lock; one started with ``exec`` (Ray's) does not.
- an ``s3://`` root: an object written only if none exists (``If-None-Match: *``) and renewed
  by its holder every few seconds, each renewal conditional on the last (``If-Match``). A
  waiter that sees the object unchanged for :data:`LEASE_SECONDS` by its own clock (no clocks
  of two hosts are compared), or whose holder was a process of this host that is gone, takes
  it over with a write conditional on the object it judged stale, so of two waiters one wins.
- another filesystem: no lock, with a line saying so.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from pipelines.core import storage

# S3: a holder renews every LEASE_SECONDS / 4; a lock unchanged for LEASE_SECONDS is stale.
LEASE_SECONDS = 60.0
# How often a waiting driver looks again, and how often it says it is still waiting.
POLL_SECONDS = 1.0
REMIND_SECONDS = 300.0


def lock_path(out_dir: str) -> str:
    """The lock of the stage writing ``out_dir``: beside it, not in it (nothing lists it)."""
    return out_dir.rstrip("/") + ".lock"


def _holder(what: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _describe(info: dict[str, Any] | None, path: str) -> str:
    if not info:
        return f"another driver holds {path}"
    return f"driver pid {info.get('pid')} on {info.get('host')} holds it since {info.get('since')} ({path})"


def _parse(text: bytes | str) -> dict[str, Any] | None:
    try:
        info = json.loads(text)
    except ValueError:  # being written, or not ours
        return None
    return info if isinstance(info, dict) else None


def _gone(info: dict[str, Any] | None) -> bool:
    """Whether the holder was a process of this host that no longer exists."""
    if not info or info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class _Waiting:
    """The lines a waiting driver prints: when it starts waiting, then now and then."""

    def __init__(self, label: str):
        self.label, self.since, self.last = label, time.monotonic(), -float("inf")

    def tick(self, who: str) -> None:
        now = time.monotonic()
        if now - self.last >= REMIND_SECONDS:
            waited = "" if self.last < 0 else f" (waiting {now - self.since:.0f} s so far)"
            print(f"{self.label} another driver is running this stage: {who}. Waiting for it{waited}; "
                  "once it finishes, this driver skips the stage (stop that driver to take over: a "
                  "driver that has died lets go of its lock).", flush=True)
            self.last = now

    def done(self) -> None:
        if self.last >= 0:
            print(f"{self.label} the other driver let go after {time.monotonic() - self.since:.0f} s", flush=True)


@contextlib.contextmanager
def _local_lock(path: str, label: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children (PEP 446)
    try:
        waiting = _Waiting(label)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                with open(path, "rb") as f:
                    waiting.tick(_describe(_parse(f.read()), path))
                time.sleep(POLL_SECONDS)
        waiting.done()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder(label)).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the file stays (removing it would race a waiter's open)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class _S3Lease:
    """The S3 lock of :func:`stage_lock`: conditional writes and a renewed lease."""

    def __init__(self, uri: str, label: str, lease: float):
        self.uri, self.label, self.lease = uri, label, lease
        self.fs, self.path = storage.fs_and_path(uri)
        self.etag: str | None = None
        self.lost = threading.Event()
        self.stop = threading.Event()

    def _put(self, **condition: Any) -> bool:
        """Write our holder record if ``condition`` holds; True if it was written."""
        body = json.dumps(_holder(self.label)).encode()
        try:
            out = self.fs.pipe_file(self.path, body, **condition)
        except OSError:  # 412: the condition failed (another driver wrote first)
            return False
        self.etag = (out or {}).get("ETag") or self._look()[0]
        return True

    def _look(self) -> tuple[str | None, dict[str, Any] | None]:
        """(ETag, holder record) of the lock object now; (None, None) when there is none."""
        self.fs.invalidate_cache(self.path)
        try:
            etag = self.fs.info(self.path).get("ETag")
            return etag, _parse(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None, None

    def acquire(self) -> None:
        waiting, seen, seen_at = _Waiting(self.label), None, time.monotonic()
        while True:
            etag, info = self._look()
            if etag is None:
                if self._put(mode="create"):
                    break
                time.sleep(POLL_SECONDS / 10)  # another driver wrote first: look at its record
                continue
            if etag != seen:  # the holder renewed (or a new one came): its lease starts again
                seen, seen_at = etag, time.monotonic()
            if (_gone(info) or time.monotonic() - seen_at > self.lease) and self._put(IfMatch=etag):
                print(f"{self.label} took over a stale lock ({_describe(info, self.uri)}; no renewal for "
                      f"{time.monotonic() - seen_at:.0f} s)", flush=True)
                break
            waiting.tick(_describe(info, self.uri))
            time.sleep(POLL_SECONDS)
        waiting.done()
        threading.Thread(target=self._renew, name=f"lock {self.uri}", daemon=True).start()

    def _renew(self) -> None:
        while not self.stop.wait(self.lease / 4):
            if not self._put(IfMatch=self.etag):
                # Taken over (this driver stalled past the lease): say so loudly; the stage's
                # shards are whole files, so the worst is work done twice, never a torn file.
                print(f"{self.label} lost the lock {self.uri} to another driver: this stage may be written "
                      "twice", flush=True)
                self.lost.set()
                return

    def release(self) -> None:
        self.stop.set()
        if not self.lost.is_set() and self._look()[0] == self.etag:
            self.fs.rm_file(self.path)


@contextlib.contextmanager
def stage_lock(out_dir: str, label: str, *, lease: float = LEASE_SECONDS) -> Iterator[None]:
    """Hold the lock of the stage writing ``out_dir``, waiting while another driver holds it.

    Args:
        out_dir: the stage's output directory (local or ``s3://``).
        label: starts the lines printed while waiting (``"[audio] stage 2/9:"``).
        lease: S3 only: seconds without a renewal after which a holder counts as dead.
    """
    uri = lock_path(out_dir)
    fs, path = storage.fs_and_path(uri)
    if isinstance(fs, LocalFileSystem):
        with _local_lock(path, label):
            yield
        return
    if not uri.startswith("s3://"):
        print(f"{label} no lock on {uri.split('://', 1)[0]}:// storage: two drivers on this root could write "
              "this stage at once", flush=True)
        yield
        return
    held = _S3Lease(uri, label, lease)
    held.acquire()
    try:
        yield
    finally:
        held.release()
