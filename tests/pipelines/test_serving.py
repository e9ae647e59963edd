"""``mlflow models serve`` on a registered version answers a real HTTP client with the audio the
pyfunc makes in process (from a caption, from a clip sent as base64, best-of-N with the scorer
the version records); a bad request gets a 400 with its reason and the server keeps serving."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import soundfile as sf

from pipelines.core import registry, tracking
from pipelines.scoring import tag_scorer
from tests.pipelines.test_best_of_n import make_scorer
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
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if requests.get(f"{url}/ping", timeout=5).status_code == 200:
                    return proc, url
            except requests.ConnectionError:
                pass
            time.sleep(1)
        os.killpg(proc.pid, signal.SIGKILL)  # the server's workers and job runners too
        proc.wait()
        if "address already in use" not in log.read_text().lower():
            pytest.fail(f"mlflow models serve did not start:\n{log.read_text()[-4000:]}")
    pytest.fail("mlflow models serve found its port taken 3 times")


def split(frame: pd.DataFrame) -> dict:
    """The documented request body (pandas' split orientation); an empty cell is null."""
    data = frame.astype(object).where(frame.notna(), None).values.tolist()
    return {"dataframe_split": {"columns": list(frame.columns), "data": data}}


@pytest.mark.slow
def test_a_served_version_answers_with_the_pyfuncs_audio_and_refuses_bad_requests(tmp_path):
    import mlflow

    root = tmp_path / "store"
    bundle = make_bundle(tmp_path / "bundle", 0)
    run = tracking.start_run(root=str(root), experiment="serving", run_name="package")
    reg = registry.register(bundle, root=str(root), run_id=run, gate_metric="heldout/fm_loss", gate_value=1.0)
    registry.promote(reg.version, root=str(root), reason="serve it")
    tag_scorer(reg.version, make_scorer(tmp_path / "scorer", bundle), root=str(root))  # as its evaluation would
    # MLflow execs `uvicorn` by name: the venv's bin must be on PATH, as in an activated venv.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(str(root)),
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    request = pd.DataFrame({"caption": ["a bell rings", "a dog barks"], "seed": [1, 2], "steps": [2, 2]})
    wav = tmp_path / "in.wav"
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32), 16000)
    clip = base64.b64encode(wav.read_bytes()).decode()
    # Inpainting and audio-to-audio from the clip's bytes, and best-of-3 of a plain caption.
    edits = pd.DataFrame({"caption": ["a dog barks", "rain", "a bell rings"], "seed": [3, 4, 5], "steps": [2, 2, 2],
                          "audio_b64": [clip, clip, None], "start": [0.2, None, None], "end": [0.5, None, None],
                          "strength": [None, 0.5, None], "candidates": [1, 1, 3]})
    tracking.configure(str(root))
    served_model = mlflow.pyfunc.load_model("models:/lafma@champion")
    want = served_model.predict(request)
    want_edits = served_model.predict(edits)
    assert json.loads(want_edits["candidates"][2])[0]["seed"] == 5 and want_edits["duration"][0] == 1.0

    proc, url = serve("models:/lafma@champion", env, tmp_path)
    try:
        answer = requests.post(f"{url}/invocations", json=split(request), timeout=120)
        assert answer.status_code == 200, answer.text[:2000]
        rows = answer.json()["predictions"]
        assert [r["caption"] for r in rows] == ["a bell rings", "a dog barks"] and [r["seed"] for r in rows] == [1, 2]
        for got, audio in zip(rows, want["audio"]):
            assert got["sample_rate"] == want["sample_rate"][0]
            np.testing.assert_allclose(np.asarray(got["audio"], np.float32), audio, rtol=0, atol=1e-6)

        answer = requests.post(f"{url}/invocations", json=split(edits), timeout=300)
        assert answer.status_code == 200, answer.text[:2000]
        rows = answer.json()["predictions"]
        for got, (_, row) in zip(rows, want_edits.iterrows()):
            np.testing.assert_allclose(np.asarray(got["audio"], np.float32), row["audio"], rtol=0, atol=1e-6)
            assert (got["seed"], got["kept"]) == (row["seed"], row["kept"])
        assert [r["audio_sha256"] for r in rows[:2]] == list(want_edits["audio_sha256"][:2])
        assert [c["seed"] for c in json.loads(rows[2]["candidates"])] == [5, 6, 7]

        bad = {
            "steps": pd.DataFrame({"caption": ["a bell"], "steps": [100_000]}),
            "duration": pd.DataFrame({"caption": ["a bell"], "duration": [10_000.0]}),
            "solver": pd.DataFrame({"caption": ["a bell"], "solver": ["nope"]}),
            "caption": pd.DataFrame({"seed": [1]}),
            # The server reads no file a client names; clips come as bytes.
            "reads none": pd.DataFrame({"caption": ["a bell"], "audio": [str(wav)], "strength": [0.5]}),
            "undecodable": pd.DataFrame({"caption": ["a bell"], "audio_b64": [base64.b64encode(b"x" * 64).decode()],
                                         "strength": [0.5]}),
            "bad_region": pd.DataFrame({"caption": ["a bell"], "audio_b64": [clip], "start": [0.5], "end": [0.2]}),
            "candidates": pd.DataFrame({"caption": ["a bell"], "candidates": [100]}),
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
        os.killpg(proc.pid, signal.SIGKILL)  # the server's workers and job runners too
        proc.wait()
