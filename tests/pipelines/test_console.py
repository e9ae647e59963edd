"""What a person reads while the DAG runs: durations and ETAs, the training and stage progress
lines, Ray Data's bars only on a terminal, and no noise that hides a warning."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from pipelines.core import console
from pipelines.core.stage import Stage
from pipelines.train.loop import progress_line

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "configs" / "test.yaml"


def test_durations_read_like_a_clock():
    seconds = (0, 0.4, 7, 59.4, 60, 72, 3599, 3600, 7384, -5)
    assert [console.format_duration(s) for s in seconds] == [
        "0s", "0s", "7s", "59s", "1m00s", "1m12s", "59m59s", "1h00m", "2h03m", "0s"]


def test_the_eta_is_what_is_left_at_the_rate_so_far():
    assert console.eta_seconds(100, 250, 72.0) == pytest.approx(108.0)
    assert console.eta_seconds(250, 250, 300.0) == 0
    assert console.eta_seconds(0, 250, 5.0) is None  # no rate yet
    assert console.progress(100, 250, 72.0) == "1m12s elapsed, ETA 1m48s"
    assert console.progress(0, 250, 0.0) == "0s elapsed, ETA ?"


def test_the_eta_leaves_out_the_first_step_which_pays_for_start_up():
    now = [0.0]
    clock = console.StepClock(250, clock=lambda: now[0])
    now[0] = 10.0  # step 1: 10 s (the first batch read, the first forward pass)
    clock.tick(1)
    assert clock.progress(1) == "10s elapsed, ETA 41m30s"  # no later step yet: 10 s a step
    for step in range(2, 101):  # then 0.5 s a step
        now[0] += 0.5
        clock.tick(step)
    assert clock.progress(100) == "1m00s elapsed, ETA 1m15s"  # 150 steps left at 0.5 s
    assert console.StepClock(10, clock=lambda: 0.0).progress(0) == "0s elapsed, ETA ?"


def test_a_training_line_keeps_its_fields_and_gains_elapsed_time_and_an_eta():
    logs = {"rec/l1": 2.168, "total": 8469.0, "kl": 1.0, "lr": 1e-3, "samples_per_second": 15.7}
    line = progress_line("train_vae", 100, 250, logs, console.progress(100, 250, 72.0))
    assert line == "[train_vae] step 100/250 rec/l1 2.168 total 8469 (15.7 samples/s, 1m12s elapsed, ETA 1m48s)"
    assert line.split("[train_vae] step ", 1)[1].split()[0] == "100/250"  # how test_run_all reads it


class _Stdout:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def test_ray_data_draws_bars_on_a_terminal_only_unless_told(monkeypatch):
    monkeypatch.delenv("LAFMA_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stdout", _Stdout(tty=True))
    assert console.progress_bars()
    monkeypatch.setattr(sys, "stdout", _Stdout(tty=False))
    assert not console.progress_bars()
    monkeypatch.setenv("LAFMA_PROGRESS", "1")
    assert console.progress_bars()
    monkeypatch.setenv("LAFMA_PROGRESS", "0")
    monkeypatch.setattr(sys, "stdout", _Stdout(tty=True))
    assert not console.progress_bars()


def test_workers_get_quiet_settings_but_the_users_own_win(monkeypatch):
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "DEBUG")
    env = console.worker_env()
    assert env["MLFLOW_LOGGING_LEVEL"] == "DEBUG"
    assert env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_rays_token_notice_is_dropped_but_its_security_warning_is_not():
    from ray._private.authentication import authentication_token_setup as auth

    logger = logging.getLogger(console.RAY_TOKEN_AUTH_LOGGER)
    assert auth.logger is logger
    capture = _Capture()
    logger.addHandler(capture)
    try:
        console.drop_messages(console.RAY_TOKEN_AUTH_LOGGER, console.RAY_TOKEN_AUTH_ON)
        auth._warn_token_auth_enabled()  # the secure default is on: nothing to act on
        auth._warn_token_auth_disabled()  # anyone on the network could run code: kept
    finally:
        logger.removeHandler(capture)
    assert len(capture.messages) == 1 and "disabled" in capture.messages[0], capture.messages


def test_ray_datas_console_keeps_warnings_and_drops_info(monkeypatch):
    import ray.data  # noqa: F401  (sets up Ray Data's console and file handlers)

    # Ray Data's console handlers write to the stderr of whenever ray.data was first imported
    # (another test's, in a full run): read them here instead of through pytest's capture
    # (whose own handlers may sit on the logger too, and see every record).
    consoles = [h for h in logging.getLogger("ray.data").handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                and type(h).__module__.startswith("ray.")]
    assert consoles, "Ray Data has no console handler to check"
    screens = [io.StringIO() for _ in consoles]
    streams = [h.setStream(screen) for h, screen in zip(consoles, screens)]

    monkeypatch.setattr(os, "environ", dict(os.environ))  # quiet_driver may set variables
    mlflow_logger = logging.getLogger("mlflow")
    level = mlflow_logger.level
    emitter = logging.getLogger(console.RAY_DATA_LOGGERS[0])
    to_file = _Capture()  # stands in for ray-data.log (a handler without Ray's console filter)
    logging.getLogger("ray.data").addHandler(to_file)
    console.quiet_driver()
    try:
        emitter.info("Dataset d_0 execution finished in 5.72 seconds")
        emitter.warning("Progress bars disabled. To enable, set `enable_progress_bars = True`.")
        emitter.warning("Operator Map is backpressured")
        emitter.error("Map failed")
    finally:
        mlflow_logger.setLevel(level)
        logging.getLogger("ray.data").removeHandler(to_file)
        for name in console.RAY_DATA_LOGGERS:
            for f in [f for f in logging.getLogger(name).filters if isinstance(f, console.OffRayDataConsole)]:
                logging.getLogger(name).removeFilter(f)
        for h, stream in zip(consoles, streams):
            h.setStream(stream)
    err = "".join(screen.getvalue() for screen in screens)
    assert "backpressured" in err and "Map failed" in err
    assert "execution finished" not in err and "Progress bars disabled" not in err
    assert len(to_file.messages) == 4  # the file log still has everything
    # The hint dropped is the one Ray Data logs when its bars are off.
    import inspect

    from ray.data._internal import progress

    assert progress.logger.name in console.RAY_DATA_LOGGERS
    assert console.RAY_DATA_BARS_OFF in inspect.getsource(progress.get_progress_manager)


def test_a_train_worker_hears_no_report_dump_but_still_hears_warnings():
    from ray.train.v2._internal.execution import context

    capture = _Capture()
    context.logger.addHandler(capture)
    level = context.logger.level
    try:
        console.quiet_train_worker()
        context.logger.info("Reporting training result 1: TrainingReport(metrics={...}) from rank 1")
        context.logger.warning("a report took long")
    finally:
        context.logger.setLevel(level)
        context.logger.removeHandler(capture)
    assert capture.messages == ["a report took long"]


def test_train_ingest_sets_ray_trains_defaults_without_the_deprecated_option():
    from ray.train import DataConfig

    from pipelines.core.training import ingest_config

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        default = DataConfig()._resolve_execution_options("train")
    assert any("exclude_resources" in str(w.message) for w in seen)  # what Ray's default does
    for split in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = ingest_config(split=split)._resolve_execution_options("train")
        assert (ours.resource_limits, ours.exclude_resources, ours.preserve_order, ours.verbose_progress) == \
            (default.resource_limits, default.exclude_resources, default.preserve_order, default.verbose_progress)


def test_a_cpu_job_tells_deepspeed_its_accelerator_and_hears_no_guess():
    code = """
from pipelines.train.worker import on_cpu
on_cpu()
import torch.utils.cpp_extension
from deepspeed.accelerator import get_accelerator
assert get_accelerator().device_name() == "cpu", get_accelerator().device_name()
"""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Setting accelerator to CPU" not in run.stderr and "No CUDA runtime" not in run.stderr, run.stderr


class Slow(Stage):
    name, needs = "slow", ()

    def key(self, ctx):
        return {}

    def run(self, ctx, out):
        time.sleep(1.2)
        return {"rows": 1}


class Broken(Stage):
    name, needs = "broken", ("slow",)

    def key(self, ctx):
        return {"slow": ctx.hashes["slow"]}

    def run(self, ctx, out):
        raise RuntimeError("boom")


def test_each_stage_says_where_the_pipeline_is_and_how_long_it_took(ray_local, tmp_path, capsys):
    from pipelines.config import load_pipeline_config
    from pipelines.core.dag import run_dag

    cfg = load_pipeline_config(CONFIG, [f"storage.root={tmp_path}"])
    run_dag(cfg, [Slow()])
    out = capsys.readouterr().out
    assert re.search(r"^\[slow\] stage 1/1: running -> \S+", out, re.M), out
    done = re.search(r"^\[slow\] stage 1/1: done in (\d+)s \(pipeline (\d+)s so far\)$", out, re.M)
    assert done and int(done[1]) in (1, 2) and int(done[2]) >= int(done[1]), out
    with pytest.raises(RuntimeError, match="boom"):
        run_dag(cfg, [Slow(), Broken()])
    out = capsys.readouterr().out
    assert re.search(r"^\[slow\] stage 1/2: finished before, skipping \(\S+\)$", out, re.M), out
    assert re.search(r"^\[broken\] stage 2/2: failed after 0s$", out, re.M), out
