"""The cluster path on one machine: a Ray head and a second worker node (``ray start``, each with
its own temp dir, HOME and TMPDIR), the storage root on the local S3 server, and a real MLflow
tracking server (sqlite database, artifacts proxied to S3, as infra/mlflow runs it).
``ray job submit -- python pipelines/run_all.py`` runs the test config there end to end.

Checked: every stage's marker is on S3; the parent run, a child run per stage, the training
metrics and artifacts and the registered champion are in the tracking server, with its
artifacts on S3; Ray Train workers and Ray Data tasks ran on both nodes; and no node's local
disk (HOME, TMPDIR, Ray's temp dir with the job's working dir) holds a store: no sqlite, no
``mlruns``, no ``.lafma``, no Ray results.

The nodes get the S3 credentials from their own environment, as on a real cluster (the job's
runtime env never carries them: pipelines/core/cluster.py). Both nodes and the tracking server
are stopped as the process groups this test started: never ``ray stop``, which stops every Ray
of the user on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from tests.pipelines.conftest import BUCKET

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
TRAINED = ("train_vae", "train_vocoder", "train_lfm")
STAGES_RUN = ["ingest", "audio", "text", "train_vae", "train_vocoder", "latents", "train_lfm", "package", "evaluate",
              "promote", "generate"]
# What a store leaves on a disk: none of it may appear on a node.
STORE_NAMES = {".lafma", "mlruns", "mlartifacts", "ray_results", "mlflow.db"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=log.parent)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (``ray start --block`` then stops its raylet, GCS and
    workers; mlflow its uvicorn and job runners), SIGKILL to whatever is left."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            time.sleep(1)  # children of the group may outlive its leader by a moment
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait(ok, what: str, procs: list[subprocess.Popen], logs: list[Path], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        try:
            if ok():
                return
        except Exception:  # not up yet
            pass
        time.sleep(1)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
    pytest.fail(f"{what} did not come up\n{tails}")


def _node_env(base: dict, node: Path) -> dict:
    """A node's own environment: its HOME and TMPDIR (to inspect afterwards), the S3 credentials
    and the tracking server, as a cluster's node configuration would give them."""
    for d in ("home/.cache", "tmp"):
        (node / d).mkdir(parents=True)
    # DeepSpeed's JIT-built op cache (infra/runtime_env.yaml: $HOME/.cache/torch_extensions) is
    # baked into a cluster's image; here it is the checkout's, built once.
    os.makedirs(ops := base["TORCH_EXTENSIONS_DIR"], exist_ok=True)
    (node / "home" / ".cache" / "torch_extensions").symlink_to(ops)
    return {**base, "HOME": str(node / "home"), "TMPDIR": str(node / "tmp")}


def _store_files(path: Path) -> list[str]:
    return sorted(os.path.join(folder, n) for folder, dirs, files in os.walk(path) for n in dirs + files
                  if n in STORE_NAMES or n.endswith((".db", ".sqlite")))


@pytest.fixture
def cluster(s3_endpoint, tmp_path):
    """(dashboard URL, tracking URI, S3 prefix, {node name: node dir}) of a two-node Ray cluster
    and an MLflow server, all on 127.0.0.1 and stopped afterwards."""
    prefix = f"s3://{BUCKET}/{tmp_path.name}"
    mlflow_port, gcs_port, dash_port = _port(), _port(), _port()
    tracking = f"http://127.0.0.1:{mlflow_port}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    # RAY_ADDRESS: what a node's processes use to find their cluster (Ray Train's placement
    # group cleaner asks the state API); a machine with other Rays on it makes that ambiguous.
    base |= {"PATH": f"{BIN}{os.pathsep}{base['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
             "RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
             "MLFLOW_TRACKING_URI": tracking, "LAFMA_PROGRESS": "0",
             "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    procs, logs = [], []
    # Ray's socket paths must fit in 107 bytes: pytest's tmp_path is too deep for them.
    short = Path(tempfile.mkdtemp(prefix="lafma2n-"))
    try:
        (tmp_path / "server").mkdir()
        logs.append(tmp_path / "mlflow.log")
        procs.append(_start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}",
                             "--artifacts-destination", f"{prefix}/mlartifacts", "--serve-artifacts",
                             "--workers", "1"], base, logs[-1]))
        nodes = {}
        for name in ("head", "node2"):
            nodes[name] = short / name
            env = _node_env(base, nodes[name])
            if name == "head":
                role = ["--head", "--port", str(gcs_port), "--ray-client-server-port", str(_port()),
                        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                        "--dashboard-port", str(dash_port)]
            else:
                role = ["--address", f"127.0.0.1:{gcs_port}", "--resources", json.dumps({"node2": 1})]
            logs.append(tmp_path / f"{name}.log")
            # A node gives its raylet 30 s to register (hard-coded in Ray): on a loaded machine
            # that can pass, and the node exits; start it again then.
            for _ in range(5):
                # Every port the node opens is its own: the defaults (dashboard agent 52365,
                # client server 10001) would collide between the two nodes and with other Rays.
                ports = ["--node-manager-port", str(_port()), "--object-manager-port", str(_port()),
                         "--metrics-export-port", str(_port()), "--dashboard-agent-listen-port", str(_port()),
                         "--dashboard-agent-grpc-port", str(_port()), "--runtime-env-agent-port", str(_port())]
                proc = _start([str(BIN / "ray"), "start", "--block", *role, *ports, "--num-cpus", "1",
                               "--node-ip-address", "127.0.0.1", "--temp-dir", str(nodes[name] / "ray"),
                               "--disable-usage-stats"], env, logs[-1])
                procs.append(proc)
                deadline = time.monotonic() + 300
                while proc.poll() is None and time.monotonic() < deadline and \
                        "Ray runtime started." not in logs[-1].read_text():
                    time.sleep(1)
                if proc.poll() is None or "timed out during startup" not in logs[-1].read_text():
                    break
                _stop(proc)
                procs.remove(proc)  # gone: only running processes count from here
                logs[-1].rename(logs[-1].with_suffix(f".{len(procs)}.log"))
        dashboard = f"http://127.0.0.1:{dash_port}"

        def two_nodes() -> bool:
            from ray.util.state import list_nodes
            return len([n for n in list_nodes(address=dashboard) if n.state == "ALIVE"]) == 2

        _wait(two_nodes, "a two-node Ray cluster", procs, logs)
        _wait(lambda: requests.get(f"{tracking}/health", timeout=2).ok, "the MLflow server", procs, logs)
        yield dashboard, tracking, prefix, nodes
    finally:
        for proc in reversed(procs):
            _stop(proc)
        try:
            shutil.move(short, tmp_path / "nodes")  # Ray's logs, kept as long as pytest keeps tmp_path
        except OSError:
            shutil.rmtree(short, ignore_errors=True)


def test_the_dag_runs_as_a_job_on_a_two_node_cluster_with_a_tracking_server(cluster, tmp_path):
    import fsspec
    from mlflow import MlflowClient
    from ray.util.state import list_actors, list_nodes, list_tasks

    from pipelines.core import registry

    dashboard, tracking, prefix, nodes = cluster
    root = f"{prefix}/store"
    overrides = [f"storage.root={root}", "generate.max_captions=2"]
    for job in TRAINED:
        # One worker per node, or the job fails: placed on one node it would prove nothing.
        overrides += [f"{job}.steps=2", f"{job}.checkpoint_every=2", f"{job}.sample_every=2", f"{job}.log_every=1",
                      f"{job}.placement_strategy=STRICT_SPREAD"]
    # The submitting client needs nothing of the cluster's: no credentials, no tracking URI.
    client_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    client_env["PATH"] = f"{BIN}{os.pathsep}{client_env['PATH']}"
    job_log = tmp_path / "job.log"
    with open(job_log, "w") as out:
        done = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", str(REPO),
             "--runtime-env", str(REPO / "infra" / "runtime_env.yaml"), "--",
             "python", "pipelines/run_all.py", "--config", "configs/test.yaml", *overrides],
            env=client_env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, timeout=1500)
    assert done.returncode == 0, job_log.read_text()[-6000:]

    # Every stage's output is on S3, its marker written last.
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    markers = fs.glob(f"{root}/data/*/*/_SUCCESS.json")  # data/<dataset>/<stage>-<hash>/
    assert sorted({m.split("/")[-2].rsplit("-", 1)[0] for m in markers}) == sorted(STAGES_RUN), markers

    # The tracking server holds the pipeline run, a child run per stage, the jobs' metrics and
    # artifacts, and the registered champion; the artifacts are on S3, behind the server.
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("lafma_test")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = {r.data.tags.get("lafma.stage"): r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(STAGES_RUN) <= set(children), sorted(children)
    for job in TRAINED:
        run = children[job]
        assert run.info.status == "FINISHED" and run.data.metrics, (job, run.info.status)
        assert client.list_artifacts(run.info.run_id), job
    assert "eval/fd" in children["evaluate"].data.metrics
    champion = client.get_model_version_by_alias(registry.MODEL_NAME, registry.CHAMPION)
    model_id = champion.source.rsplit("/", 1)[-1]  # models:/m-…: MLflow 3 keeps a model's files apart from its run's
    stored = fs.find(f"{prefix}/mlartifacts")
    for artifacts in (f"/models/{model_id}/artifacts/", *(f"/{children[j].info.run_id}/artifacts/" for j in TRAINED)):
        assert any(artifacts in p for p in stored), artifacts

    # Both nodes worked: Ray Train workers of every job and Ray Data tasks on each.
    node_ids = {n.node_id for n in list_nodes(address=dashboard)}
    assert len(node_ids) == 2
    workers = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                          limit=1000, raise_on_missing_output=False)
    assert {a.node_id for a in workers} == node_ids, [(a.node_id, a.state) for a in workers]
    tasks = list_tasks(address=dashboard, filters=[("type", "=", "NORMAL_TASK")], detail=True, limit=10000,
                       raise_on_missing_output=False)
    # Ray Data names a task after its fused operators (ReadParquet->MapBatches(...), Write...).
    data_nodes = {t.node_id for t in tasks if any(op in t.name for op in ("Read", "Map", "Write"))}
    assert data_nodes == node_ids, sorted({(t.name, t.node_id) for t in tasks})

    # No node's disk holds a store that a later stage or another node would read.
    for name, node in nodes.items():
        assert _store_files(node) == [], name
