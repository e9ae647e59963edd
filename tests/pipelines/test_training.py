"""Stages 3-6 on real Ray Train (2 workers, gloo) with real DeepSpeed ZeRO-2 and a real MLflow store."""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipelines.config import load_pipeline_config
from pipelines.core import storage, tracking
from pipelines.core.dag import run_dag
from pipelines.stages import STAGES
from pipelines.stages.audio import SCHEMA as AUDIO_SCHEMA
from pipelines.stages.train import LATENT_SCHEMA
from pipelines.train.data import unflatten
from pipelines.train.jobs import JOBS
from tests.pipelines.conftest import copy_store
from tests.pipelines.dag_run import (
    CKPT_EVERY,
    CONFIG,
    DISC_START,
    FAIL_AT,
    STEPS,
    VAE_STEPS,
    VOCODER_STEPS,
    overrides,
)


def history(root: Path, run_id: str, key: str) -> list[float]:
    """One value per step, the latest logged (a restarted attempt re-logs the steps it redoes)."""
    client = MlflowClient(tracking.tracking_uri(str(root)))
    by_step = {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}
    return [by_step[k] for k in sorted(by_step)]


def test_the_job_table_ties_each_job_to_its_stage_section_input_and_export():
    assert {s.component: s.stage for s in JOBS.values()} == {"unet": "train_lfm", "vae": "train_vae", "vocoder": "train_vocoder"}
    stages = {s.name: s for s in STAGES}
    inputs = {"vae": AUDIO_SCHEMA, "vocoder": AUDIO_SCHEMA, "lfm": LATENT_SCHEMA}
    for name, spec in JOBS.items():
        assert spec.name == name and stages[spec.stage].job is spec  # the stage it names trains it
        assert set(spec.columns) <= set(inputs[name].names), name  # it reads what its input stage writes


def test_a_batch_is_shaped_by_its_rows_shape_columns():
    rows = [np.arange(6, dtype=np.float32), np.arange(6, 12, dtype=np.float32)]
    assert unflatten(rows, np.array([2, 2]), np.array([3, 3])).tolist() == [[[0, 1, 2], [3, 4, 5]],
                                                                              [[6, 7, 8], [9, 10, 11]]]
    assert unflatten(rows).shape == (2, 6)  # no shape columns: as stored
    with pytest.raises(ValueError, match="different shapes"):
        unflatten(rows, np.array([2, 3]), np.array([3, 2]))


def test_latents_carry_their_shape(trained):
    _, cfg, reports = trained
    table = storage.read_parquet_dir(reports["latents"].path,
                                     columns=["mean", "latent_channels", "latent_frames", "latent_bins"])
    c, t, f = (table.column(n).to_pylist() for n in ("latent_channels", "latent_frames", "latent_bins"))
    assert set(zip(c, t, f)) == {cfg.latent_shape()}
    assert {len(m) for m in table.column("mean").to_pylist()} == {math.prod(cfg.latent_shape())}


@pytest.mark.parametrize("stage, metric", [("train_vae", "rec/l1"), ("train_vocoder", "mel/l1"),
                                           ("train_lfm", "loss/fm")])
def test_each_jobs_loss_falls(trained, stage, metric):
    root, _, reports = trained
    values = history(root, reports[stage].info["run_id"], metric)
    assert len(values) == {"train_vocoder": VOCODER_STEPS, "train_vae": VAE_STEPS}.get(stage, STEPS)
    # The VAE is judged before its GAN starts: with a tiny budget the adaptive weight is large
    # while the reconstruction is still poor, and the GAN term leads.
    end = DISC_START - 1 if stage == "train_vae" else len(values)
    first, last = sum(values[:5]) / 5, sum(values[end - 10 : end]) / 10
    assert last < 0.8 * first, (stage, first, last)


def test_the_vae_gan_phase_runs_under_zero2(trained):
    root, _, reports = trained
    run_id = reports["train_vae"].info["run_id"]
    weights = history(root, run_id, "adv/weight")
    disc = history(root, run_id, "disc/adv/disc")
    assert all(w == 0 for w in weights[: DISC_START - 1]) and all(w > 0 for w in weights[DISC_START - 1 :])
    assert len(disc) == VAE_STEPS - DISC_START + 1 and all(math.isfinite(d) for d in disc)
    assert all(math.isfinite(v) for v in history(root, run_id, "rec/l1"))


def test_a_failed_worker_group_restarts_from_its_last_checkpoint(trained):
    root, _, reports = trained
    vae = reports["train_vae"].info
    assert vae["steps"] == VAE_STEPS
    assert vae["resumed_from"] == CKPT_EVERY  # restarted at the checkpoint before step 8, not at 0
    assert glob.glob(str(root / "ray_results" / "train_vae-*" / "fault_injection" / f"failed_at_step_{FAIL_AT}.*"))
    assert reports["train_vocoder"].info["resumed_from"] == 0


def test_a_checkpoint_holds_what_resuming_needs(trained):
    root, _, _ = trained
    ckpt = sorted(glob.glob(str(root / "ray_results" / "train_lfm-*" / "checkpoint_0*")))[-1]
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)
    assert state["step"] == STEPS and int(state["extra"]["ema"]["num_updates"]) == STEPS
    assert sorted(os.listdir(os.path.join(ckpt, "rng"))) == ["rank_00000.pt", "rank_00001.pt"]
    engine_dir = os.path.join(ckpt, "unet", f"step_{STEPS:09d}")
    files = os.listdir(engine_dir)
    assert any("optim_states" in f for f in files) and any("model_states" in f for f in files)
    gan = sorted(glob.glob(str(root / "ray_results" / "train_vocoder-*" / "checkpoint_0*")))[-1]
    assert {"generator", "discriminator"} <= set(os.listdir(gan))  # both GAN engines


def test_raising_steps_resumes_the_same_run_instead_of_starting_over(trained, tmp_path):
    shared, _, reports = trained
    root = copy_store(shared, tmp_path / "store")  # the shared store stays at STEPS for every other test
    cfg = load_pipeline_config(CONFIG, [*overrides(root), f"train_lfm.steps={STEPS + 4}"])
    again = {r.name: r for r in run_dag(cfg, STAGES, only=["train_lfm"])}
    lfm = again["train_lfm"]
    assert lfm.status == "ran" and lfm.path == reports["train_lfm"].path.replace(str(shared), str(root), 1)
    assert lfm.info["resumed_from"] == STEPS and lfm.info["steps"] == STEPS + 4
    assert lfm.info["run_id"] == reports["train_lfm"].info["run_id"]  # the same MLflow run
    assert len(history(root, lfm.info["run_id"], "loss/fm")) == STEPS + 4
    assert len(history(shared, lfm.info["run_id"], "loss/fm")) == STEPS


def test_mlflow_runs_hold_params_metrics_images_and_audio(trained):
    root, cfg, reports = trained
    client = MlflowClient(tracking.tracking_uri(str(root)))
    for stage in ("train_vae", "train_vocoder", "train_lfm"):
        run = client.get_run(reports[stage].info["run_id"])
        assert run.data.params["train_vae.lr"] == str(cfg.train_vae.lr)
        for key in ("lr", "samples_per_second"):
            assert key in run.data.metrics, (stage, key)
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
        assert any(p.endswith(".png") for p in artifacts), (stage, artifacts)
        assert any(p.endswith(".wav") for p in artifacts), (stage, artifacts)
    assert "adv/weight" in client.get_run(reports["train_vae"].info["run_id"]).data.metrics
    assert "disc/adv/disc" in client.get_run(reports["train_vocoder"].info["run_id"]).data.metrics


def test_exports_are_safetensors_with_their_config(trained):
    _, cfg, reports = trained
    from safetensors import safe_open

    for stage, name in (("train_vae", "vae"), ("train_vocoder", "vocoder"), ("train_lfm", "unet")):
        path = os.path.join(reports[stage].path, f"{name}.safetensors")
        with safe_open(path, "pt") as f:
            assert f.metadata()["mel_hash"] == cfg.mel.config_hash()
            assert len(list(f.keys())) > 10


def test_the_standalone_script_finds_the_finished_job(trained):
    import subprocess
    import sys

    root, _, reports = trained
    script = Path(__file__).parents[2] / "pipelines" / "train_vae.py"
    out = subprocess.run([sys.executable, str(script), "--config", str(CONFIG), *overrides(root)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines()[1:] if line.strip()
             and not line.startswith(" ")}
    ran_or_skipped = {k: v for k, v in lines.items() if v in ("ran", "skipped")}
    assert ran_or_skipped == {"ingest": "skipped", "audio": "skipped", "train_vae": "skipped"}  # only its needs
    assert reports["train_vae"].path in out.stdout
