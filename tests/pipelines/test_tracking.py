"""pipelines.core.tracking against a real sqlite MLflow store (and a local S3 for artifacts):
nested runs, dotted params, metric histories, rank gating, artifacts, resume lookup, and a log
from another process landing in the driver's run."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
import soundfile as sf
import torch
from matplotlib.figure import Figure
from mlflow import MlflowClient
from PIL import Image

from pipelines.core import tracking
from tests.pipelines.conftest import BUCKET

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_user_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    """One store for the module: sqlite runs its migrations (seconds) on first use only."""
    path = str(tmp_path_factory.mktemp("lafma_root"))
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run before the autouse one
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        MlflowClient(tracking.tracking_uri(path)).search_experiments()
    return path


@pytest.fixture
def experiment(request) -> str:
    return f"exp-{request.node.name}-{uuid.uuid4().hex[:6]}"


def _download(root: str, run_id: str, path: str, dst: Path) -> Path:
    client = MlflowClient(tracking.tracking_uri(root))
    return Path(client.download_artifacts(run_id, path, str(dst)))


def test_tracking_uri_rules(tmp_path, monkeypatch):
    local = tmp_path / "r"
    assert tracking.tracking_uri(str(local)) == f"sqlite:///{local}/mlflow.db"
    assert tracking.artifact_root(str(local)) == str(local / "mlartifacts")
    assert (local / "mlartifacts").is_dir()
    # s3:// root: sqlite beside the checkout (cwd), artifacts on S3.
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri("s3://b/p") == f"sqlite:///{tmp_path}/.lafma/mlflow.db"
    assert tracking.artifact_root("s3://b/p/") == "s3://b/p/mlartifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(str(local)) == "http://127.0.0.1:5999"
    assert tracking.tracking_uri("s3://b/p") == "http://127.0.0.1:5999"


def test_configure_sets_global_uri_but_not_the_user_override(tmp_path):
    try:
        uri = tracking.configure(str(tmp_path / "a"))
        assert mlflow.get_tracking_uri() == uri
        # mlflow exports MLFLOW_TRACKING_URI; if it stayed, another root would resolve to ours.
        assert "MLFLOW_TRACKING_URI" not in os.environ
        assert tracking.tracking_uri(str(tmp_path / "b")) != uri
    finally:
        mlflow.set_tracking_uri(None)


def test_a_user_database_uri_keeps_artifacts_under_the_storage_root(root, tmp_path, monkeypatch):
    # A sqlite (or postgresql) URI has no server to choose an artifact store: MLflow would write
    # ./mlruns in whatever directory the job runs. Only a server URI (http, https) chooses its own.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(root))
    other_root = str(tmp_path / "elsewhere")
    exp_id = tracking.ensure_experiment(f"user-db-{uuid.uuid4().hex[:6]}", other_root)
    location = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_experiment(exp_id).artifact_location
    assert location == str(tmp_path / "elsewhere" / "mlartifacts")
    assert not (tmp_path / "mlruns").exists()


def test_parent_with_two_children(root, experiment):
    parent = tracking.start_run(root=root, experiment=experiment, run_name="all")
    children = {tracking.start_run(root=root, experiment=experiment, run_name=f"stage{i}",
                                   parent_run_id=parent, tags={"lafma.stage": f"s{i}"})
                for i in range(2)}
    assert mlflow.active_run() is None  # nothing left in the fluent state
    client = MlflowClient(tracking.tracking_uri(root))
    exp = client.get_experiment_by_name(experiment)
    assert exp.artifact_location == tracking.artifact_root(root)
    nested = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert {r.info.run_id for r in nested} == children
    assert {r.info.run_name for r in nested} == {"stage0", "stage1"}
    for run_id in children:
        tracking.end_run(run_id, "FAILED", tracking=tracking.tracking_uri(root))
    tracking.end_run(parent, tracking=tracking.tracking_uri(root))
    assert client.get_run(parent).info.status == "FINISHED"
    assert {client.get_run(r).info.status for r in children} == {"FAILED"}
    tracking.end_run(parent, "RUNNING", tracking=tracking.tracking_uri(root))  # resume
    assert client.get_run(parent).info.status == "RUNNING"


def test_params_flattened_with_dotted_keys(root, experiment, tmp_path):
    config = {"vae": {"ch": 128, "ch_mult": [1, 2, 4], "loss": {"kl_weight": 1e-8}},
              "seed": 0, "prompt": "x" * 7000, "bad key!": True,
              "many": {f"p{i}": i for i in range(150)}}  # > 100 params per request
    run_id = tracking.start_run(root=root, experiment=experiment, run_name="p", params=config)
    params = MlflowClient(tracking.tracking_uri(root)).get_run(run_id).data.params
    assert params["vae.ch"] == "128"
    assert params["vae.ch_mult"] == "[1, 2, 4]"
    assert params["vae.loss.kl_weight"] == "1e-08"
    assert params["bad key_"] == "True"  # "!" is not a valid key character
    assert all(params[f"many.p{i}"] == str(i) for i in range(150))
    assert len(params["prompt"]) <= 6000 and params["prompt"].endswith("see params.json]")
    full = json.loads(_download(root, run_id, "params.json", tmp_path).read_text())
    assert full["prompt"] == "x" * 7000


def test_metrics_history_by_step(root, experiment):
    run_id = tracking.start_run(root=root, experiment=experiment, run_name="m")
    logger = tracking.RunLogger(run_id, rank=0, tracking=tracking.tracking_uri(root))
    for step in range(0, 50, 10):
        logger.log_metrics({"loss": 1.0 / (step + 1), "mel/l1": torch.tensor(step / 10)}, step)
    client = MlflowClient(tracking.tracking_uri(root))
    loss = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in loss] == [(s, 1.0 / (s + 1)) for s in range(0, 50, 10)]
    assert [m.value for m in client.get_metric_history(run_id, "mel/l1")] == [0, 1, 2, 3, 4]


def test_rank_nonzero_and_no_run_log_nothing(root, experiment, monkeypatch):
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # No sampling thread starts at all (rather than none sampling within some wait).
    started = []
    monkeypatch.setattr(SystemMetricsMonitor, "start", lambda self: started.append(self))
    run_id = tracking.start_run(root=root, experiment=experiment, run_name="r")
    for logger in (tracking.RunLogger(run_id, rank=1, tracking=tracking.tracking_uri(root)),
                   tracking.RunLogger(None)):
        logger.log_metrics({"loss": 1.0}, step=0)
        logger.log_params({"a": 1})
        logger.set_tags({"t": "v"})
        logger.log_text("x", "x.txt")
        logger.log_dict({"a": 1}, "a.json")
        logger.log_image(b"\x89PNG", "i.png")
        logger.log_audio(np.zeros(160), 16000, "a.wav")
        with tracking.system_metrics(logger.run_id, rank=1, interval_s=0.05):
            pass
    assert started == []
    client = MlflowClient(tracking.tracking_uri(root))
    data = client.get_run(run_id).data
    assert data.metrics == {} and data.params == {} and "t" not in data.tags
    assert client.list_artifacts(run_id) == []


def test_image_audio_text_artifacts(root, experiment, tmp_path):
    run_id = tracking.start_run(root=root, experiment=experiment, run_name="a")
    logger = tracking.RunLogger(run_id, tracking=tracking.tracking_uri(root))
    rng = np.random.default_rng(0)
    mel = rng.normal(size=(64, 100)).astype(np.float32)
    png = tracking.mel_image([("input", mel), ("reconstruction", torch.from_numpy(mel * 0.5))],
                             sample_rate=16000, hop_length=160)
    assert png.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(png)).size == (800, 500)  # figsize (8, 1 + 2 * 2 panels)
    with pytest.raises(ValueError):
        tracking.mel_image([("bad", mel[None])], sample_rate=16000, hop_length=160)
    logger.log_image(png, "samples/step_10/mel.png")
    fig = Figure()
    fig.add_subplot().plot([0, 1])
    logger.log_image(fig, "fig.png")
    wav = torch.sin(torch.linspace(0, 200, 8000)).unsqueeze(0) * 1.5  # (1, T), out of range
    wav[0, 5] = float("nan")
    logger.log_audio(wav, 16000, "samples/step_10/dog.wav")
    logger.log_audio(rng.uniform(-0.5, 0.5, size=(2, 4410)), 22050, "stereo.wav")
    logger.log_text("a dog barks", "captions.txt")
    logger.log_dict({"step": 10, "ok": True}, "meta.yaml")

    out = tmp_path / "dl"
    assert _download(root, run_id, "samples/step_10/mel.png", out).read_bytes() == png
    assert Image.open(_download(root, run_id, "fig.png", out)).format == "PNG"
    data, sr = sf.read(dog := _download(root, run_id, "samples/step_10/dog.wav", out))
    info = sf.info(str(dog))
    assert (sr, data.shape, info.subtype) == (16000, (8000,), "PCM_16")
    assert np.abs(data).max() <= 1.0 and data[5] == 0.0
    expected = np.clip(wav[0].numpy(), -1, 1)
    assert np.allclose(np.delete(data, 5), np.delete(expected, 5), atol=1e-4)
    data, sr = sf.read(_download(root, run_id, "stereo.wav", out))
    assert (sr, data.shape) == (22050, (4410, 2))
    assert _download(root, run_id, "captions.txt", out).read_text() == "a dog barks"
    assert "step: 10" in _download(root, run_id, "meta.yaml", out).read_text()


def test_mel_grid_draws_a_row_of_panels_per_title_on_one_colour_scale():
    import matplotlib.image
    from matplotlib import colormaps

    rng = np.random.default_rng(0)

    def rows(n: int, cols: int = 3, frames: int = 100) -> list:
        return [(f"caption {i}", [(f"panel {j}", rng.normal(size=(64, frames)).astype(np.float32))
                                  for j in range(cols)]) for i in range(n)]

    one = tracking.mel_grid(rows(1), sample_rate=16000, hop_length=160)
    four = tracking.mel_grid(rows(4, frames=50), sample_rate=16000, hop_length=160)
    assert one.startswith(b"\x89PNG") and four.startswith(b"\x89PNG")
    # 4 x 2.5 inches a panel + a 1-inch colour bar and 0.5 inch of margins, at 100 dpi.
    assert matplotlib.image.imread(io.BytesIO(one), format="png").shape[:2] == (300, 1300)
    assert Image.open(io.BytesIO(four)).size == (1300, 1050)
    assert Image.open(io.BytesIO(tracking.mel_grid(rows(2, cols=2), sample_rate=16000,
                                                   hop_length=160))).size == (900, 550)
    # One scale for the sheet: a row of zeros draws in the colour map's darkest colour and a
    # row of ones (tensors, as a model returns them) in its brightest; a scale per row or per
    # panel would draw both rows dark (a constant panel sits at the bottom of its own range).
    flat = [("low", [("a", np.zeros((8, 10))), ("b", np.zeros((8, 10)))]),
            ("high", [("a", torch.ones(8, 10)), ("b", torch.ones(8, 10))])]
    img = np.asarray(Image.open(io.BytesIO(tracking.mel_grid(flat, sample_rate=16000, hop_length=160)))
                     .convert("RGB")).astype(int)
    top, bottom = img[: len(img) // 2], img[len(img) // 2 :]

    def share(pixels: np.ndarray, value: float) -> float:  # of pixels in the colour of ``value``
        colour = np.round(np.array(colormaps["magma"](value)[:3]) * 255)
        return float((np.abs(pixels - colour).max(-1) <= 2).mean())

    assert share(top, 0.0) > 0.3 and share(bottom, 0.0) < 0.01
    assert share(bottom, 1.0) > 0.3 and share(top, 1.0) < 0.01
    bad = [
        [],  # no rows
        [("empty", [])],  # a row without panels
        [("3-d", [("x", np.zeros((1, 64, 10)))])],
        rows(1, cols=3) + rows(1, cols=2),  # ragged: not a grid
    ]
    for b in bad:
        with pytest.raises(ValueError):
            tracking.mel_grid(b, sample_rate=16000, hop_length=160)


def test_mel_grid_marks_a_panels_region_with_lines_at_its_edges():
    from matplotlib.colors import to_rgb

    mel = np.zeros((8, 100))  # 1 s at hop 160: one dark panel, so only the lines are cyan
    png = tracking.mel_grid([("row", [("plain", mel), ("edited", mel, (0.25, 0.75))])], sample_rate=16000,
                            hop_length=160)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    colour = np.round(np.array(to_rgb(tracking.REGION_COLOUR)) * 255)
    columns = np.flatnonzero((np.abs(img - colour).max(-1) <= 2).any(0))  # x of every marked pixel
    assert len(columns) and columns.min() >= 400 and columns.max() < 800  # the second panel's only
    # Two lines, a quarter and three quarters of the way across its axes: a gap between them.
    gaps = np.flatnonzero(np.diff(columns) > 50)
    assert len(gaps) == 1 and columns[gaps[0] + 1] - columns[gaps[0]] > 100


def test_find_run_by_tags(root, experiment):
    def start(config_hash: str) -> str:
        tags = {"lafma.stage": "train_vae", "lafma.config_hash": config_hash}
        return tracking.start_run(root=root, experiment=experiment, run_name="vae", tags=tags)

    first, other = start("abc"), start("def")
    find = {"lafma.stage": "train_vae", "lafma.config_hash": "abc"}
    assert tracking.find_run(root=root, experiment=experiment, tags=find) == first
    assert tracking.find_run(root=root, experiment=experiment,
                             tags={**find, "lafma.config_hash": "zzz"}) is None
    assert tracking.find_run(root=root, experiment="no-such-experiment", tags=find) is None
    # start_time has millisecond resolution: the next run must start in a later millisecond.
    latest = max(MlflowClient(tracking.tracking_uri(root)).get_run(r).info.start_time for r in (first, other))
    while time.time() * 1000 < latest + 1:
        time.sleep(0.001)
    newest = start("abc")
    assert tracking.find_run(root=root, experiment=experiment, tags=find) == newest != other
    with pytest.raises(ValueError):
        tracking.find_run(root=root, experiment=experiment, tags={})


def test_log_from_another_process_lands_in_same_run(root, experiment):
    uri = tracking.tracking_uri(root)
    run_id = tracking.start_run(root=root, experiment=experiment, run_name="train")
    tracking.RunLogger(run_id, tracking=uri).log_metrics({"loss": 2.0}, step=0)
    worker = textwrap.dedent(f"""
        from pipelines.core.tracking import RunLogger, end_run
        RunLogger({run_id!r}, rank=1, tracking={uri!r}).log_metrics({{"loss": 9.0}}, step=1)
        logger = RunLogger({run_id!r}, rank=0, tracking={uri!r})
        logger.log_metrics({{"loss": 1.0}}, step=1)
        logger.log_text("from the worker", "worker.txt")
        end_run({run_id!r}, tracking={uri!r})
    """)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    subprocess.run([sys.executable, "-c", worker], cwd=REPO, env=env, check=True, timeout=120)
    client = MlflowClient(uri)
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 2.0), (1, 1.0)]
    assert [a.path for a in client.list_artifacts(run_id)] == ["worker.txt"]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name(experiment).experiment_id])) == 1


def test_system_metrics_log_without_gpu(root, experiment):
    uri = tracking.tracking_uri(root)
    run_id = tracking.start_run(root=root, experiment=experiment, run_name="sys")
    client = MlflowClient(uri)
    with tracking.system_metrics(run_id, tracking=uri, interval_s=0.05):
        deadline = time.monotonic() + 20  # polled, not slept: a loaded CI box samples late
        while "system/cpu_utilization_percentage" not in client.get_run(run_id).data.metrics:
            assert time.monotonic() < deadline, "no system metrics were logged"
            time.sleep(0.05)
    assert "system/system_memory_usage_megabytes" in client.get_run(run_id).data.metrics
    with tracking.system_metrics(None):  # no run: a no-op, not an error
        pass


def test_s3_artifact_root(s3_endpoint, root, experiment, tmp_path, monkeypatch):
    import boto3

    # Reuse the migrated store as the "beside the checkout" sqlite (skips seconds of migration).
    (tmp_path / ".lafma").mkdir()
    shutil.copy(Path(root) / "mlflow.db", tmp_path / ".lafma" / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    s3_root = f"s3://{BUCKET}/runs-{uuid.uuid4().hex[:8]}"
    uri = tracking.tracking_uri(s3_root)
    assert uri == f"sqlite:///{tmp_path}/.lafma/mlflow.db"
    run_id = tracking.start_run(root=s3_root, experiment=experiment, run_name="s3",
                                params={"data": {"root": s3_root}})
    logger = tracking.RunLogger(run_id, tracking=uri)
    logger.log_audio(np.zeros(1600), 16000, "samples/silence.wav")
    artifact_uri = MlflowClient(uri).get_run(run_id).info.artifact_uri
    assert artifact_uri == f"{s3_root}/mlartifacts/{run_id}/artifacts"
    prefix = artifact_uri.removeprefix(f"s3://{BUCKET}/")
    listing = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    assert [o["Key"] for o in listing["Contents"]] == [f"{prefix}/samples/silence.wav"]
    data, sr = sf.read(_download(s3_root, run_id, "samples/silence.wav", tmp_path / "dl"))
    assert (sr, len(data)) == (16000, 1600)
