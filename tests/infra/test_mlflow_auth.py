"""The tracking server as infra/mlflow configures it demands a login: a real ``mlflow server
--app-name basic-auth`` on 127.0.0.1, asked with and without credentials (issue 15)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

INI = Path(__file__).parents[2] / "infra" / "mlflow" / "basic_auth.ini"
SEARCH = "/api/2.0/mlflow/experiments/search"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tmp: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """Start the server; another process may take the chosen port first, so try a few."""
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    for _ in range(3):
        port = _port()
        log = open(tmp / f"server-{port}.log", "w")
        proc = subprocess.Popen([mlflow, "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                                 "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                                 "--default-artifact-root", str(tmp / "artifacts"), "--workers", "1"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                requests.get(f"{url}/health", timeout=2)
                return proc, url
            except requests.ConnectionError:
                time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)  # the server's workers and job runners too
        proc.wait()
        text = (tmp / f"server-{port}.log").read_text()
        if "address already in use" not in text.lower():
            pytest.fail(f"mlflow server did not start:\n{text[-3000:]}")
    pytest.fail("mlflow server found its port taken 3 times")


@pytest.mark.slow
def test_the_tracking_server_answers_only_a_logged_in_client(tmp_path):
    # The image's settings, with the database on sqlite instead of the cluster's Postgres.
    ini = re.sub(r"(?m)^database_uri = .*$", f"database_uri = sqlite:///{tmp_path / 'auth.db'}", INI.read_text())
    (tmp_path / "basic_auth.ini").write_text(ini)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
            "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-test-password-1",
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-csrf-key"}
    proc, url = _serve(tmp_path, env)
    try:
        body = {"max_results": 10}
        assert requests.post(f"{url}{SEARCH}", json=body, timeout=30).status_code == 401
        wrong = requests.post(f"{url}{SEARCH}", json=body, auth=("admin", "guess"), timeout=30)
        assert wrong.status_code == 401
        ok = requests.post(f"{url}{SEARCH}", json=body, auth=("admin", "a-long-test-password-1"), timeout=30)
        assert ok.status_code == 200, ok.text[:500]
        assert "experiments" in ok.json()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server's workers and job runners too
        proc.wait()
