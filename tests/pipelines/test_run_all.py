"""``run_all.py`` as a user runs it: killed mid-way and re-run, and under ``ray job submit``
against a Ray cluster started with ``ray start --head`` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.pipelines.conftest import registered, wait_for

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
    # Killed while the vocoder trains: its workers hold once their step-2 checkpoint is reported
    # (LAFMA_TEST_HOLD, pipelines/core/stage.py), and the kill waits until Ray has registered it.
    held = tmp_path / "held"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**env, "LAFMA_TEST_HOLD": f"train_vocoder:2:{held}"}, cwd=tmp_path)
    wait_for(held.exists, "train_vocoder holding after its step-2 checkpoint", proc)
    wait_for(lambda: registered(store, "train_vocoder", 2), "Ray registering the step-2 checkpoint", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = markers(store)
    assert set(before) == {"ingest", "audio", "text", "train_vae"}, sorted(before)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    table = statuses(again.stdout)
    assert all(table[s] == "skipped" for s in before), table
    assert all(table[s] == "ran" for s in STAGE_NAMES if s not in before), table
    after = markers(store)
    assert set(after) == set(STAGE_NAMES)
    assert after["train_vocoder"]["resumed_from"] == 2  # from the checkpoint it held at, not from scratch
    assert after["generate"]["rows"] == 4
    # Rank 0's progress lines reach the driver once each (Ray Train's print patch doubled them).
    lines = (again.stdout + again.stderr).splitlines()
    steps = [line.split("[train_lfm] step ", 1)[1].split()[0] for line in lines if "[train_lfm] step " in line]
    assert sorted(steps) == ["2/4", "4/4"], steps


PORTS = ("gcs", "dashboard", "agent", "agent_grpc", "runtime_env_agent")
# What `ray start` says when the GCS or the dashboard finds its port taken.
IN_USE = re.compile(r"Failed to start the grpc server|already (occupied|in use)|Address already in use", re.I)


def _cluster_procs(temp_dir: Path) -> list[psutil.Process]:
    """The processes of the cluster this test started: those naming its temp dir, and their
    children (the dashboard and runtime-env agents retitle themselves ``ray::…``)."""
    named = [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    found = {p.pid: p for p in named}
    for p in named:
        try:
            found |= {c.pid: c for c in p.children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def _stop_cluster(temp_dir: Path) -> None:
    """Stop only the cluster this test started (``ray stop`` would stop every Ray on the machine,
    the test session's own included)."""
    procs = _cluster_procs(temp_dir)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _fresh_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (held together while choosing)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _listeners(temp_dir: Path, ports: list[int]) -> tuple[set[int], set[int]]:
    """Of ``ports``, those the cluster's own processes listen on, and those another process holds."""
    ours = {p.pid for p in _cluster_procs(temp_dir)}
    held = [(c.laddr.port, c.pid) for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port in ports]
    return {port for port, pid in held if pid in ours}, {port for port, pid in held if pid not in ours}


def _all_ours(temp_dir: Path, ports: list[int], timeout: float = 120) -> bool:
    """Wait until the cluster's processes listen on every port: True; False once another process
    holds one of them."""
    deadline = time.monotonic() + timeout
    while True:
        ours, taken = _listeners(temp_dir, ports)
        if ours == set(ports) or taken:
            return not taken
        if time.monotonic() > deadline:
            _stop_cluster(temp_dir)
            pytest.fail(f"after {timeout:.0f} s the new cluster listens on {sorted(ours)} of {ports}")
        time.sleep(0.5)


def start_head(ray: str, temp_dir: Path, env: dict, attempts: int = 3) -> dict[str, int]:
    """``ray start --head`` on 127.0.0.1 with every port its own (the test session's Ray may hold
    the defaults); returns the ports by name once the cluster's processes listen on all of them.

    Ray takes port numbers, not sockets, so another process may take one between choosing it and
    Ray binding it: the GCS and the dashboard then fail ``ray start``, the dashboard agent's and
    runtime-env agent's ports fail only later. Either way the cluster is stopped and started again
    on fresh ports; any other failure fails the test.
    """
    for _ in range(attempts):
        ports = dict(zip(PORTS, _fresh_ports(len(PORTS))))
        start = subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}",
                                "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
                                "--num-cpus=2", f"--dashboard-agent-listen-port={ports['agent']}",
                                f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
                                f"--runtime-env-agent-port={ports['runtime_env_agent']}",
                                f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                               capture_output=True, text=True, timeout=180, env=env)
        wanted = list(ports.values())
        if start.returncode == 0 and _all_ours(temp_dir, wanted):
            return ports
        taken = _listeners(temp_dir, wanted)[1]
        _stop_cluster(temp_dir)
        if not (taken or IN_USE.search(start.stdout + start.stderr)):
            pytest.fail(f"ray start failed: {start.stderr[-3000:]}")
    pytest.fail(f"ray start found a port taken {attempts} times running")


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline_on_a_running_cluster(tmp_path):
    # Ray's temp dir must stay short (socket paths are limited to ~107 bytes).
    temp_dir = Path("/tmp") / f"lafma-rayjob-{os.getpid()}"
    store = tmp_path / "store"
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "LAFMA_PROGRESS": "0",
           # Ray 2.60 starts clusters with token auth on; the job CLI sends the token only in this mode.
           "RAY_AUTH_MODE": "token",
           # Credentials in the environment of the node the job's driver runs on: the workers may
           # inherit them from the node, but no record Ray or MLflow keeps may hold them.
           **FAKE_CREDENTIALS}
    env.pop("RAY_ADDRESS", None)
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    ports = start_head(ray, temp_dir, env)
    dashboard = ports["dashboard"]
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
        records = {"the GCS job table": _gcs_job_table(ports["gcs"], env),
                   "the Jobs API": subprocess.run([ray, "job", "list", "--address", f"http://127.0.0.1:{dashboard}"],
                                                  capture_output=True, text=True, timeout=60, env=env).stdout,
                   "Ray's logs": _ray_logs(temp_dir), "MLflow's params and tags": _mlflow_records(store)}
        assert "runtime_env" in records["the Jobs API"] and "lafma.stage" in records["MLflow's params and tags"]
        for where, text in records.items():
            for name, secret in FAKE_CREDENTIALS.items():
                assert secret not in text, f"{name} found in {where}"
    finally:
        _stop_cluster(temp_dir)


FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIAFAKEID0000LAFMA", "AWS_SECRET_ACCESS_KEY": "fake-secret-0f1e2d3c4b5a",
                    "AWS_SESSION_TOKEN": "fake-session-token-9a8b7c6d", "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-pw-55aa"}


def _gcs_job_table(gcs_port: int, env: dict) -> str:
    """Every job's config as the GCS keeps it (the runtime env a driver's ray.init passed)."""
    code = ("import sys; from ray._raylet import GcsClient; "
            "print({k.hex(): str(v) for k, v in GcsClient(address=sys.argv[1]).get_all_job_info().items()})")
    out = subprocess.run([sys.executable, "-c", code, f"127.0.0.1:{gcs_port}"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0 and "runtime_env" in out.stdout, out.stderr[-2000:]
    return out.stdout


def _ray_logs(temp_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in temp_dir.rglob("logs/**/*") if p.is_file())


def _mlflow_records(store: Path) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    versions = client.search_model_versions()
    return json.dumps([[r.data.params, r.data.tags] for r in runs] + [v.tags for v in versions])
