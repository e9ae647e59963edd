"""``mlflow models serve`` on a registered version answers a real HTTP client with the audio the
pyfunc makes in process; a bad request gets a 400 with its reason and the server keeps serving."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from pipelines.core import registry, tracking
from tests.pipelines.test_generation_plan import make_bundle


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(uri: str, env: dict, logs: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow models serve`` on 127.0.0.1; the chosen port may be taken before the server binds
    it, so a start that fails on a taken port is tried again on another."""
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    for _ in range(3):
        port = _port()
        log = logs / f"serve-{port}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([mlflow, "models", "serve", "-m", uri, "--env-manager", "local",
                                     "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                    env=env, stdout=out, stderr=subprocess.STDOUT)
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if requests.get(f"{url}/ping", timeout=5).status_code == 200:
                    return proc, url
            except requests.ConnectionError:
                pass
            time.sleep(1)
        proc.kill()
        proc.wait()
        if "address already in use" not in log.read_text().lower():
            pytest.fail(f"mlflow models serve did not start:\n{log.read_text()[-4000:]}")
    pytest.fail("mlflow models serve found its port taken 3 times")


def split(frame: pd.DataFrame) -> dict:
    """The documented request body (pandas' split orientation)."""
    return {"dataframe_split": {"columns": list(frame.columns), "data": frame.values.tolist()}}


@pytest.mark.slow
def test_a_served_version_answers_with_the_pyfuncs_audio_and_refuses_bad_requests(tmp_path):
    import mlflow

    root = tmp_path / "store"
    bundle = make_bundle(tmp_path / "bundle", 0)
    run = tracking.start_run(root=str(root), experiment="serving", run_name="package")
    reg = registry.register(bundle, root=str(root), run_id=run, gate_metric="heldout/fm_loss", gate_value=1.0)
    registry.promote(reg.version, root=str(root), reason="serve it")
    # MLflow execs `uvicorn` by name: the venv's bin must be on PATH, as in an activated venv.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(str(root)),
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    request = pd.DataFrame({"caption": ["a bell rings", "a dog barks"], "seed": [1, 2], "steps": [2, 2]})
    tracking.configure(str(root))
    want = mlflow.pyfunc.load_model("models:/lafma@champion").predict(request)

    proc, url = serve("models:/lafma@champion", env, tmp_path)
    try:
        answer = requests.post(f"{url}/invocations", json=split(request), timeout=120)
        assert answer.status_code == 200, answer.text[:2000]
        rows = answer.json()["predictions"]
        assert [r["caption"] for r in rows] == ["a bell rings", "a dog barks"] and [r["seed"] for r in rows] == [1, 2]
        for got, audio in zip(rows, want["audio"]):
            assert got["sample_rate"] == want["sample_rate"][0]
            np.testing.assert_allclose(np.asarray(got["audio"], np.float32), audio, rtol=0, atol=1e-6)

        bad = {
            "steps": pd.DataFrame({"caption": ["a bell"], "steps": [100_000]}),
            "duration": pd.DataFrame({"caption": ["a bell"], "duration": [10_000.0]}),
            "solver": pd.DataFrame({"caption": ["a bell"], "solver": ["nope"]}),
            "caption": pd.DataFrame({"seed": [1]}),
        }
        for reason, frame in bad.items():
            refused = requests.post(f"{url}/invocations", json=split(frame), timeout=120)
            assert 400 <= refused.status_code < 500, (reason, refused.status_code, refused.text[:1000])
            assert reason in refused.json()["message"], (reason, refused.json()["message"][:1000])
        # Still serving, and still the same audio.
        again = requests.post(f"{url}/invocations", json=split(request.iloc[:1]), timeout=120)
        assert again.status_code == 200
        np.testing.assert_allclose(np.asarray(again.json()["predictions"][0]["audio"], np.float32), want["audio"][0],
                                   rtol=0, atol=1e-6)
    finally:
        proc.kill()
        proc.wait()
