"""``run_all.py`` as a user runs it: killed mid-way and re-run, and under ``ray job submit``
against a Ray cluster started with ``ray start --head`` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).parents[2]
CONFIG = "configs/test.yaml"
STAGE_NAMES = ["ingest", "audio", "text", "train_vae", "train_vocoder", "latents", "train_lfm", "package", "evaluate",
               "promote", "generate"]


# What the working-dir upload leaves behind (Ray also honours .gitignore).
EXCLUDES = [".venv", ".lafma", ".cache", ".git", "*.db", "mlruns", "mlartifacts", "__pycache__", "*.egg-info"]


def tiny(root: Path) -> list[str]:
    out = [f"storage.root={root}", "generate.max_captions=4"]
    for job in ("train_vae", "train_vocoder", "train_lfm"):
        out += [f"{job}.steps=4", f"{job}.checkpoint_every=2", f"{job}.sample_every=4", f"{job}.log_every=2"]
    return out


def statuses(stdout: str) -> dict[str, str]:
    return {line.split()[0]: line.split()[1] for line in stdout.splitlines()
            if line.split() and line.split()[0] in STAGE_NAMES and len(line.split()) > 1}


def markers(store: Path) -> dict[str, dict]:
    found = {}
    for m in store.glob("data/demo/*/_SUCCESS.json"):
        info = json.loads(m.read_text())
        if "stage" in info:
            found[info["stage"]] = info
    return found


def test_a_run_killed_in_the_middle_finishes_on_re_run(ray_local, tmp_path):
    store = tmp_path / "store"
    cmd = [sys.executable, str(ROOT / "pipelines" / "run_all.py"), "--config", str(ROOT / CONFIG), *tiny(store)]
    env = {**os.environ, "LAFMA_PROGRESS": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
                            cwd=tmp_path)
    deadline = time.time() + 400
    # Kill it while the vocoder trains: after its first checkpoint, before it finishes.
    while time.time() < deadline and proc.poll() is None and not list(
            store.glob("ray_results/train_vocoder-*/checkpoint_0*")):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = markers(store)
    assert {"ingest", "audio", "text", "train_vae"} <= set(before) and "train_vocoder" not in before, sorted(before)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    table = statuses(again.stdout)
    assert all(table[s] == "skipped" for s in before), table
    assert all(table[s] == "ran" for s in STAGE_NAMES if s not in before), table
    after = markers(store)
    assert set(after) == set(STAGE_NAMES)
    # From a checkpoint, not from scratch: step 2's, or step 4's if the kill came after that one.
    assert after["train_vocoder"]["resumed_from"] in (2, 4)
    assert after["generate"]["rows"] == 4
    # Rank 0's progress lines reach the driver once each (Ray Train's print patch doubled them).
    lines = (again.stdout + again.stderr).splitlines()
    steps = [line.split("[train_lfm] step ", 1)[1].split()[0] for line in lines if "[train_lfm] step " in line]
    assert sorted(steps) == ["2/4", "4/4"], steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_cluster(temp_dir: Path) -> None:
    """Stop only the cluster this test started (``ray stop`` would stop every Ray on the machine,
    the test session's own included): its processes are the ones naming its temp dir."""
    procs = [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=30)


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline_on_a_running_cluster(tmp_path):
    # Ray's temp dir must stay short (socket paths are limited to ~107 bytes).
    temp_dir = Path("/tmp") / f"lafma-rayjob-{os.getpid()}"
    store = tmp_path / "store"
    # Every port its own: the test session's Ray (and its dashboard agent) may hold the defaults.
    gcs, dashboard, agent, agent_grpc, env_agent = (_free_port() for _ in range(5))
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "LAFMA_PROGRESS": "0",
           # Ray 2.60 starts clusters with token auth on; the job CLI sends the token only in this mode.
           "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    start = subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                            f"--runtime-env-agent-port={env_agent}",
                            f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                           capture_output=True, text=True, timeout=180, env=env)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        submit = [ray, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(ROOT),
                  "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--",
                  "python", "pipelines/run_all.py", "--config", CONFIG, *tiny(store)]
        deadline = time.time() + 120
        while True:  # the head's dashboard agent takes a few seconds to accept jobs after `ray start`
            out = subprocess.run(submit, capture_output=True, text=True, timeout=1200, env=env)
            if "No available agent" not in out.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
        assert "succeeded" in out.stdout
        table = statuses(out.stdout)
        assert all(table.get(s) == "ran" for s in STAGE_NAMES), table
        assert set(markers(store)) == set(STAGE_NAMES)
        assert "models:/lafma/1" in out.stdout  # registered in the store under storage.root
    finally:
        _stop_cluster(temp_dir)
