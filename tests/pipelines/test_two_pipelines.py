"""Two pipelines on one machine, each on its own storage root, training at the same time: each
starts its own local Ray, addressed by its own GCS address (pipelines.core.cluster.init_ray), so
neither's Ray Train jobs look up, or lose their placement groups to, the other's cluster."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipelines.conftest import wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "configs" / "test.yaml"
# What Ray Train logged when a second cluster on the host confused its placement-group cleaner.
CONFUSED = ("Found multiple active Ray instances", "placement group was removed")


def start(tmp: Path, name: str, release: Path) -> tuple[subprocess.Popen, Path, Path]:
    """``run_all.py --until train_vae`` on its own root; its VAE job holds once its step-2
    checkpoint is reported (``LAFMA_TEST_HOLD``) until ``release`` exists, then trains on."""
    store, held, log = tmp / f"store-{name}", tmp / f"held-{name}", tmp / f"{name}.log"
    cmd = [sys.executable, str(ROOT / "pipelines" / "run_all.py"), "--config", str(CONFIG), "--until", "train_vae",
           f"storage.root={store}", "train_vae.steps=4", "train_vae.checkpoint_every=2", "train_vae.sample_every=4"]
    env = {**os.environ, "LAFMA_PROGRESS": "0", "LAFMA_TEST_HOLD": f"train_vae:2:{held}:{release}"}
    env.pop("RAY_ADDRESS", None)  # each starts a local cluster, as on a laptop
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp, env=env, start_new_session=True)
    return proc, held, log


def test_two_pipelines_training_at_once_on_one_machine_both_finish(tmp_path):
    release = tmp_path / "release"
    runs = {name: start(tmp_path, name, release) for name in ("a", "b")}
    try:
        # Both VAE jobs are in flight at once (each held after its step-2 checkpoint), each with
        # its placement-group cleaner polling the state API, on two clusters of one host.
        for name, (proc, held, _) in runs.items():
            wait_for(held.exists, f"pipeline {name}'s VAE job at step 2", proc, timeout=900)
        release.touch()
        for proc, _, _ in runs.values():
            proc.wait(timeout=600)
    finally:
        for proc, _, _ in runs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    logs = {name: log.read_text() for name, (_, _, log) in runs.items()}
    for name, (proc, _, _) in runs.items():
        assert proc.returncode == 0, logs[name][-4000:]
        assert not [c for c in CONFUSED if c in logs[name]], logs[name][-4000:]
        # Ray runs the audio tasks on their workers' main threads: the per-file time limit is armed.
        assert "no per-file time limit" not in logs[name]
        marker = next((tmp_path / f"store-{name}").glob("data/*/train_vae-*/_SUCCESS.json"))
        assert json.loads(marker.read_text())["steps"] == 4
    addresses = {name: re.search(r"\[ray\] local cluster at (\S+);", text).group(1) for name, text in logs.items()}
    assert addresses["a"] != addresses["b"], addresses
