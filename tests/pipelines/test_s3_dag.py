"""The whole DAG with its storage root on S3 (the local S3 server on 127.0.0.1), as the README
shows it for a cluster: training checkpoints, exports, the registered bundle's artifacts,
evaluation and generation all live under ``s3://``; nothing is written under a local root."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from tests.pipelines.conftest import BUCKET

pytestmark = pytest.mark.slow

STAGES_RUN = ["ingest", "audio", "text", "train_vae", "train_vocoder", "latents", "train_lfm", "package", "evaluate",
              "promote", "generate"]


def tiny(root: str) -> list[str]:
    out = [f"storage.root={root}", "generate.max_captions=2", "evaluate.sweep_steps=[1]"]
    for job in ("train_vae", "train_vocoder", "train_lfm"):
        out += [f"{job}.steps=4", f"{job}.checkpoint_every=2", f"{job}.sample_every=4", f"{job}.log_every=2"]
    return out


def test_the_whole_dag_and_a_batch_job_run_on_an_s3_storage_root(ray_local, s3_endpoint, tmp_path, monkeypatch):
    import fsspec
    import mlflow

    from pipelines.config import load_pipeline_config
    from pipelines.core import registry, tracking
    from pipelines.core.dag import run_dag
    from pipelines.generation import GenerationSettings, run_generation
    from pipelines.stages import STAGES
    from tests.pipelines.dag_run import CONFIG

    # The MLflow store (sqlite) is the one thing kept local; its artifacts go to s3://<root>/mlartifacts.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory shows up here
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    root = f"s3://{BUCKET}/{tmp_path.name}/store"
    cfg = load_pipeline_config(CONFIG, tiny(root))

    reports = {r.name: r for r in run_dag(cfg, STAGES)}
    assert [n for n in STAGES_RUN if reports[n].status != "ran"] == []
    for name in ("audio", "text", "train_vae", "train_vocoder", "latents", "train_lfm", "generate"):
        assert reports[name].path.startswith("s3://"), (name, reports[name].path)
        assert fs.exists(f"{reports[name].path}/_SUCCESS.json"), name
    # Ray Train kept its checkpoints and run state on S3, and the trained jobs resumed nothing.
    assert fs.glob(f"{root}/ray_results/train_lfm-*/checkpoint_*")
    assert reports["train_lfm"].info["resumed_from"] in (0, None)
    # The registered model's artifacts are on S3, and it loads and generates from there.
    client = mlflow.MlflowClient(tracking.tracking_uri(root))
    champion = client.get_model_version_by_alias(registry.MODEL_NAME, registry.CHAMPION)
    assert client.get_run(champion.run_id).info.artifact_uri.startswith(f"{root}/mlartifacts")
    assert np.isfinite(reports["evaluate"].info["metrics"]["eval/fd"])
    # The DAG's generations: wavs on S3 that decode to audio.
    wavs = [p for p in fs.find(reports["generate"].path) if p.endswith(".wav")]
    assert len(wavs) == 2
    with fs.open(wavs[0], "rb") as f:
        audio, sr = sf.read(f)
    assert sr == cfg.mel.sample_rate and audio.size > 0 and np.abs(audio).max() > 0

    # A batch job reading its captions from S3 and writing its output there.
    captions = f"s3://{BUCKET}/{tmp_path.name}/captions.txt"
    fs.pipe(captions, b"a tone rises\na low hum\n")
    out = f"s3://{BUCKET}/{tmp_path.name}/gen"
    summary = run_generation(captions, out, GenerationSettings(model="models:/lafma@champion", actor_cpus=0.5),
                             root=root)
    assert summary["rows"] == 2 and summary["generated_now"] == 2
    manifest = json.loads(fs.cat(f"{out}/_SUCCESS.json"))
    assert manifest["rows"] == 2
    assert len(fs.glob(f"{out}/wavs/*.wav")) == 2
    # Nothing landed in the working directory (no ./mlruns, no ./.lafma).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]
