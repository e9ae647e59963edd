"""A shortened rehearsal of the paper recipe (configs/rehearsal.yaml): every model at its paper
width — the 55 M VAE, the 188 M UNet, HiFi-GAN V1 and a 1024-wide T5 encoder — through the whole
DAG on the CPU, with the LFM in forced bf16 autocast (what a GPU run does by default), so that a
shape, a dtype or an export that only breaks at full size or in bf16 breaks here. Shortened for
CI: 1.28 s clips, two encoder layers, one step a job (``benchmarks/rehearsal.py`` runs the full
one and records its figures).

The last stage runs on its own, as ``run_all.py --only generate`` does in a fresh process: the
full rehearsal found that stage logging to whatever store mlflow's current URI named, which is
the root's store only once an earlier stage in the same process has set it.

``LAFMA_REHEARSAL_BF16=train_vae,train_vocoder,train_lfm`` puts the GAN jobs in bf16 too. Not in
CI: on a CPU without native bf16 their convolutions are emulated, ~100x slower (one VAE step
took 357 s, one HiFi-GAN step 220 s; benchmarks/results/rehearsal_cpu2.md)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import soundfile as sf
from mlflow import MlflowClient
from safetensors import safe_open

from benchmarks.rehearsal import CONFIGS, STAGES, write_t5_large_shaped

pytestmark = pytest.mark.slow


def millions(path: Path) -> float:
    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) / 1e6


def test_the_paper_widths_run_the_whole_dag_on_a_cpu(ray_local, tmp_path):
    from pipelines.config import load_pipeline_config
    from pipelines.core import tracking
    from pipelines.core.dag import run_dag
    from pipelines.stages import STAGES as DAG

    encoder = write_t5_large_shaped(tmp_path / "t5-large-shaped", num_layers=2)
    over = [f"storage.root={tmp_path / 'store'}", f"text.name_or_path={encoder}", "audio.clip_seconds=1.28",
            "sampler.duration=1.28", "sampler.steps=2", "evaluate.sweep_steps=[]", "train_vae.crop_frames=0"]
    # The bf16 path at full width (a GPU's default): autocast even on a CPU without native bf16.
    jobs = ("train_vae", "train_vocoder", "train_lfm")
    bf16 = os.environ.get("LAFMA_REHEARSAL_BF16", "train_lfm").split(",")
    assert set(bf16) <= set(jobs), bf16
    over += [f"{job}.steps=1" for job in jobs] + [f"{job}.precision=bf16_forced" for job in bf16]
    cfg = load_pipeline_config(CONFIGS, over)
    reports = {r.name: r for r in run_dag(cfg, DAG, until="promote")}
    # A fresh process's mlflow points at no store of ours (its default is ./mlflow.db; here, one
    # elsewhere) and has no MLFLOW_TRACKING_URI: run the generate stage alone like that.
    before = mlflow.get_tracking_uri()
    tracking.configure(cfg.storage.root, uri=f"sqlite:///{tmp_path / 'elsewhere.db'}")  # exports no env var
    try:
        reports["generate"] = next(r for r in run_dag(cfg, DAG, only=["generate"]) if r.name == "generate")
    finally:
        tracking.configure(cfg.storage.root, uri=before)

    assert [n for n in STAGES if reports[n].status != "ran"] == []
    # Paper widths: what was trained and exported is the full-size model, not a demo one.
    sizes = {job: millions(next(Path(reports[job].path).glob("*.safetensors")))
             for job in ("train_vae", "train_vocoder", "train_lfm")}
    assert 50 < sizes["train_vae"] < 60, sizes
    assert 180 < sizes["train_lfm"] < 195, sizes
    assert 50 < sizes["train_vocoder"] < 60, sizes  # HiFi-GAN V1 at 16 kHz, hop 160 (five upsamplings)
    assert reports["text"].info["dim"] == 1024  # the width the encoder really produced
    # Each job's step (bf16 or fp32) left finite losses; every export is fp32.
    for job in jobs:
        final = reports[job].info["final_metrics"]
        assert final and all(np.isfinite(v) for v in final.values()), (job, final)
        with safe_open(str(next(Path(reports[job].path).glob("*.safetensors"))), "pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F32"}, job
    # The evaluation generated full-width clips of the configured length and measured them.
    metrics = reports["evaluate"].info["metrics"]
    assert np.isfinite(metrics["eval/fd"]), metrics
    # The champion generated clips of the configured length, and logged them to the root's store.
    gen = reports["generate"]
    wavs = sorted(Path(gen.path).rglob("*.wav"))
    assert len(wavs) == gen.info["rows"] > 0
    for wav in wavs:
        audio, sr = sf.read(wav)
        assert len(audio) == round(1.28 * sr) and np.isfinite(audio).all()
    client = MlflowClient(tracking.tracking_uri(cfg.storage.root))
    logged = [a.path for a in client.list_artifacts(gen.info["run_id"], "generated")]
    assert "generated/spectrograms.png" in logged and sum(p.endswith(".wav") for p in logged) == len(wavs)
    # Full-size checkpoints and bundles: ~11 GB that pytest would keep for its last three runs.
    shutil.rmtree(tmp_path / "store", ignore_errors=True)
