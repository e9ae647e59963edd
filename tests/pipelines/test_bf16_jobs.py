"""Every GAN job's step runs under bf16 autocast, the adversarial phase included.

The GPU path (and a CPU with native bf16, ``precision: bf16``) trains under autocast. The
generator step calls the discriminator as its raw module, outside its engine's autocast, on
the generator's bf16 output: a conv then met a bf16 input and fp32 weights and raised. Built
on ``PlainEngine`` (the same autocast as DeepSpeed's ``torch_autocast``), one step per job.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.config import load_pipeline_config
from pipelines.train.engines import PlainEngine
from pipelines.train.jobs import JOBS
from pipelines.train.loop import JobInputs
from tests.pipelines.dag_run import CONFIG


@pytest.mark.parametrize("job", ["vae", "vocoder"])
def test_a_gan_step_in_bf16_past_disc_start(ray_local, job):
    import ray.data

    cfg = load_pipeline_config(CONFIG, ["vae_loss.disc_start=1", "train_vae.batch_size=2",
                                        "train_vocoder.batch_size=2", "train_vocoder.crop_frames=32"])
    frames, n_mels = cfg.mel_shape()
    rng = np.random.default_rng(0)
    rows = [{"id": f"c{i}", "mel": rng.standard_normal(n_mels * frames).astype(np.float32) - 6.0,
             "waveform": (0.1 * rng.standard_normal(cfg.clip_samples)).astype(np.float32),
             "n_mels": n_mels, "frames": frames} for i in range(4)]
    torch.manual_seed(0)
    built = JOBS[job].build(JobInputs(cfg, ray.data.from_items(rows).iterator(), torch.device("cpu"), bf16=True,
                                      engine=PlainEngine))
    logs = built.step(next(built.batches), 2)
    assert any(k.startswith("disc/") for k in logs)  # the discriminator trained: the GAN phase ran
    assert all(math.isfinite(v) for v in logs.values()), logs
    weights = built.final_weights()
    assert all(w.dtype == torch.float32 for w in weights.values())  # autocast: fp32 weights
