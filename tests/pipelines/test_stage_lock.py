"""Two drivers on one storage root: one writes a stage, the other waits for it and then skips
it, and a driver that died lets go of its stages. Stand-in stages on the driver (no Ray); the
S3 lock on the session's moto server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines.core import storage
from pipelines.core.locks import lock_path, stage_lock
from pipelines.core.stage import Stage
from tests.pipelines.conftest import BUCKET, wait_for

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "configs" / "test.yaml"
GATE_ENV = "LAFMA_TEST_LOCK_DIR"  # where the gated stage says it started and waits to be let go


def _log(ctx, event: str) -> None:
    with open(os.path.join(ctx.root, "events.log"), "a") as f:
        f.write(f"{os.getpid()} {event}\n")


class Gated(Stage):
    """Writes half its output, says so (``started``), waits for ``go``, writes the rest."""

    name = "gated"

    def key(self, ctx):
        return {}

    def run(self, ctx, out):
        gate = Path(os.environ[GATE_ENV])
        _log(ctx, "gated start")
        storage.write_bytes(storage.join(out, "part-0"), str(os.getpid()).encode())
        (gate / "started").touch()
        while not (gate / "go").exists():
            time.sleep(0.1)
        storage.write_bytes(storage.join(out, "part-1"), str(os.getpid()).encode())
        _log(ctx, "gated end")
        return {"writer": os.getpid()}


class After(Stage):
    name, needs = "after", ("gated",)

    def key(self, ctx):
        return {"gated": ctx.hashes["gated"]}

    def run(self, ctx, out):
        _log(ctx, "after start")
        parts = {storage.read_bytes(storage.join(ctx.outputs["gated"], p)).decode() for p in ("part-0", "part-1")}
        _log(ctx, "after end")
        return {"writer": os.getpid(), "gated_writers": sorted(parts)}


STAGES = [Gated(), After()]
DRIVER = f"""
import json, sys
import pipelines.core.dag as dag
from pipelines.config import load_pipeline_config
from tests.pipelines.test_stage_lock import STAGES
dag.init_ray = lambda compute: None  # the stand-in stages run on the driver
reports = dag.run_dag(load_pipeline_config({str(CONFIG)!r}, [f"storage.root={{sys.argv[1]}}"]), STAGES)
print("STATUS " + json.dumps({{r.name: r.status for r in reports}}))
"""


def driver(store: Path, gate: Path, out: Path) -> subprocess.Popen:
    with open(out, "w") as f:
        return subprocess.Popen([sys.executable, "-c", DRIVER, str(store)], stdout=f, stderr=subprocess.STDOUT,
                                cwd=ROOT, start_new_session=True, env={**os.environ, GATE_ENV: str(gate)})


def finished(proc: subprocess.Popen, out: Path) -> dict[str, str]:
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = out.read_text()
    assert proc.returncode == 0, text[-3000:]
    return json.loads(next(line for line in text.splitlines() if line.startswith("STATUS "))[7:])


@pytest.mark.slow  # driver processes, each with its MLflow store
def test_a_second_driver_waits_for_the_stage_the_first_is_writing_then_skips_it(tmp_path):
    store, gate = tmp_path / "store", tmp_path / "gate"
    gate.mkdir()
    first = driver(store, gate, tmp_path / "first.out")
    wait_for((gate / "started").exists, "the first driver writing the gated stage", first)
    second = driver(store, gate, tmp_path / "second.out")
    wait_for(lambda: "another driver is running this stage" in (tmp_path / "second.out").read_text(),
             "the second driver saying it waits", second)
    assert f"pid {first.pid} on {socket.gethostname()}" in (tmp_path / "second.out").read_text()
    (gate / "go").touch()
    a, b = finished(first, tmp_path / "first.out"), finished(second, tmp_path / "second.out")
    assert a["gated"] == "ran" and b["gated"] == "skipped", (a, b)
    assert sorted([a["after"], b["after"]]) == ["ran", "skipped"], (a, b)  # whichever got there first
    # Each stage was written once, start to end, never by two drivers at a time.
    events = [line.split(" ", 1)[1] for line in (store / "events.log").read_text().splitlines()]
    assert events == ["gated start", "gated end", "after start", "after end"], events
    [gated] = store.glob("data/*/gated-*/_SUCCESS.json")
    assert json.loads(gated.read_text())["writer"] == first.pid
    assert {(gated.parent / p).read_text() for p in ("part-0", "part-1")} == {str(first.pid)}
    [after] = store.glob("data/*/after-*/_SUCCESS.json")
    assert json.loads(after.read_text())["gated_writers"] == [str(first.pid)]


@pytest.mark.slow  # driver processes, each with its MLflow store
def test_a_driver_killed_while_writing_a_stage_does_not_hold_it(tmp_path):
    store, gate = tmp_path / "store", tmp_path / "gate"
    gate.mkdir()
    killed = driver(store, gate, tmp_path / "killed.out")
    wait_for((gate / "started").exists, "the driver writing the gated stage", killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    (gate / "go").touch()
    again = driver(store, gate, tmp_path / "again.out")
    assert finished(again, tmp_path / "again.out") == {"gated": "ran", "after": "ran"}
    [gated] = store.glob("data/*/gated-*/_SUCCESS.json")
    assert {(gated.parent / p).read_text() for p in ("part-0", "part-1")} == {str(again.pid)}


# -- the S3 lock --------------------------------------------------------------------------------


def _holding(uri: str, lease: float, release: threading.Event, held: threading.Event) -> threading.Thread:
    def hold():
        with stage_lock(uri, "[first]", lease=lease):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(30)
    return thread


@pytest.mark.slow  # several lease lengths of waiting
def test_on_s3_a_renewed_lock_holds_a_second_driver_until_it_is_released(s3_endpoint, capsys):
    uri = f"s3://{BUCKET}/lock-test/data/demo/gated-1"
    release, held = threading.Event(), threading.Event()
    thread = _holding(uri, 2.0, release, held)
    got = threading.Event()

    def wait_for_it():
        with stage_lock(uri, "[second]", lease=2.0):
            got.set()

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    # Three leases long: the holder renews every half second, so the waiter never sees it stale.
    assert not got.wait(6.0)
    assert "another driver is running this stage" in capsys.readouterr().out
    release.set()
    thread.join()
    assert got.wait(30)  # released: the waiter gets it
    waiter.join()
    assert not storage.exists(lock_path(uri))


@pytest.mark.parametrize("holder", ["dead_process_here", "silent_other_host"])
def test_on_s3_a_lock_whose_holder_is_gone_is_taken_over(s3_endpoint, holder, capsys):
    """A holder that died without letting go: a process of this host that no longer exists is
    seen at once; one elsewhere once its lock went a lease without renewal."""
    uri = f"s3://{BUCKET}/lock-test/data/demo/{holder}"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = ({"pid": int(gone.stdout), "host": socket.gethostname()} if holder == "dead_process_here"
              else {"pid": 1, "host": "another-host"})
    storage.write_json(lock_path(uri), record)
    t0 = time.monotonic()
    with stage_lock(uri, "[second]", lease=2.0):
        waited = time.monotonic() - t0
        assert json.loads(storage.read_bytes(lock_path(uri)))["pid"] == os.getpid()
    assert "took over a stale lock" in capsys.readouterr().out
    if holder == "silent_other_host":
        assert waited >= 2.0  # not before a lease has passed without a renewal
    assert not storage.exists(lock_path(uri))  # let go on leaving
