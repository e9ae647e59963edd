"""benchmarks/generate.py: the diffusion baseline is built at our networks' size, and the probe
splits a call of either pipeline into stages that add up to the call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.generate import STAGES, Probe, build_baseline, unet_cost
from lafma.models import build_pipeline
from pipelines.config import load_pipeline_config

CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"


@pytest.mark.slow  # 15-20 s alone on 2 busy cores, most of it importing transformers and diffusers
def test_baseline_is_our_size_and_each_call_splits_into_its_stages():
    cfg = load_pipeline_config(CONFIG)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    ours = build_pipeline(cfg)
    base = build_baseline(cfg, ours, cpu)
    cost = unet_cost(cfg, ours, base, cpu)
    # Same widths, levels and attention sites; AudioLDM's class projection and self-attending
    # second attention (instead of cross-attention to the text) make the small difference.
    assert abs(cost["baseline"]["params_m"] / cost["ours"]["params_m"] - 1) < 0.2
    assert abs(cost["baseline"]["gflops_per_call"] / cost["ours"]["gflops_per_call"] - 1) < 0.1

    probe = Probe(cpu)
    probe.attach(text_encoder=ours.text_encoder, unet=ours.unet, vae=ours.vae, vocoder=ours.vocoder)
    probe.attach(text_encoder=base.text_encoder, unet=base.unet, vae=base.vae, vocoder=ours.vocoder)
    audio = {}
    timed = {
        "ours": probe.run(lambda: audio.setdefault("ours", ours.generate(["a bell rings"], seeds=[0], steps=3).audio)),
        "baseline": probe.run(lambda: audio.setdefault("baseline", base(
            ["a bell rings"], num_inference_steps=3, guidance_scale=3.0, audio_length_in_s=cfg.sampler.duration,
            output_type="pt").audios)),
    }
    for name, t in timed.items():
        assert t["unet_calls"] == 3, name  # one guided (doubled-batch) UNet call per step
        assert all(t[k] > 0 for k in STAGES[:-1]) and t["other"] >= 0, (name, t)
        assert sum(t[k] for k in STAGES) == pytest.approx(t["total"])
        assert audio[name].shape == (1, round(cfg.sampler.duration * cfg.mel.sample_rate)), name
