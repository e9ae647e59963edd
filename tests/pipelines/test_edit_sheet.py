"""The evaluate stage's edits sheet: which seconds it regenerates, what its edits are given, and
what it draws. That inpainting keeps every latent frame outside its region and continuation
the frames before it is the library's guarantee, tested in tests/lafma/test_audio_in.py; here,
that the sheet's edits are those, over the regions it marks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.config import load_pipeline_config
from pipelines.core.tracking import REGION_COLOUR
from pipelines.stages.evaluate import INPAINT, edit_examples, edit_regions, edits_sheet
from tests.lafma.test_audio_in import random_pipeline

CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"
SEEDS = [3, 4]


@pytest.fixture(scope="module")
def cfg():
    return load_pipeline_config(CONFIG)


@pytest.fixture(scope="module")
def pipe(cfg):
    """configs/test.yaml's generator with random weights, as test_audio_in.py's."""
    return random_pipeline(cfg)


def clips(cfg, tail_seed: int = 1) -> list[dict]:
    """Two held-out-like clips of the config's length: a rising tone, then noise drawn from
    ``tail_seed`` over the second half."""
    sr, d = cfg.mel.sample_rate, cfg.audio.clip_seconds
    n = round(d * sr)
    t = np.arange(n) / sr
    out = []
    for i, caption in enumerate(("a bell rings twice", "rain on a roof")):
        wave = (0.4 * np.sin(2 * np.pi * (300 + 200 * i + 400 * t) * t)).astype(np.float32)
        wave[n // 2:] = 0.2 * np.random.default_rng(tail_seed + i).standard_normal(n - n // 2)
        out.append({"id": f"test-{i}", "caption": caption, "waveform": wave})
    return out


def edits(pipe, cfg, given: list[dict]) -> dict:
    return edit_examples(pipe, given, SEEDS, duration=cfg.audio.clip_seconds, steps=cfg.sampler.steps,
                         guidance=cfg.sampler.guidance, solver="euler")


def test_the_regions_are_a_middle_share_and_everything_after_the_kept_half():
    regions = edit_regions(2.56)
    assert regions["inpaint"] == pytest.approx((0.25 * 2.56, 0.6 * 2.56)) and INPAINT == (0.25, 0.6)
    assert regions["continue"] == pytest.approx((1.28, 2.56))


def test_edits_regenerate_their_regions_only_and_continuation_never_sees_the_rest(pipe, cfg):
    d = cfg.audio.clip_seconds
    given = clips(cfg)
    out = edits(pipe, cfg, given)
    assert set(out) == {"inpaint", "continue"}
    for g in out.values():
        assert g.audio.shape == (2, round(d * cfg.mel.sample_rate)) and torch.isfinite(g.audio).all()
        assert g.seeds == SEEDS
    # The inpainting changed the latent frames of the region the sheet marks, and only those.
    shape = pipe.latent_shape(d)
    latent = pipe.encode_audio(torch.from_numpy(np.stack([c["waveform"] for c in given])), shape).cpu()
    inside = pipe.latent_frames(*edit_regions(d)["inpaint"], shape[1])
    changed = (out["inpaint"].latents - latent).abs().amax(dim=(0, 1, 3)) > 1e-3  # (T',)
    assert changed.nonzero().flatten().tolist() == list(range(inside.start, inside.stop))
    # Continuation is given the first half alone: another second half changes the inpainting
    # (it keeps that half) but not one value of the continuation. (Latents: a random VAE's
    # decoder barely lets its latent through to the audio.)
    other = edits(pipe, cfg, clips(cfg, tail_seed=7))
    assert torch.equal(other["continue"].latents, out["continue"].latents)
    assert torch.equal(other["continue"].audio, out["continue"].audio)
    assert not torch.allclose(other["inpaint"].latents, out["inpaint"].latents, atol=1e-3)
    # Seeded: the same clips give the same sheet.
    again = edits(pipe, cfg, given)
    assert all(torch.equal(again[k].audio, out[k].audio) for k in out)


def test_the_sheet_draws_input_inpainting_and_continuation_with_the_regions_marked(pipe, cfg):
    given = clips(cfg)
    png = edits_sheet(cfg.mel, given, edits(pipe, cfg, given), cfg.audio.clip_seconds)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    # tracking.mel_grid's layout: three 4 x 2.5-inch panels a row and a colour bar, at 100 dpi.
    assert img.shape == (50 + 250 * len(given), 1300, 3)
    from matplotlib.colors import to_rgb

    marked = (np.abs(img - np.round(np.array(to_rgb(REGION_COLOUR)) * 255)).max(-1) <= 2).sum(0)  # per column
    # The input panel (first 400 px) unmarked; the inpainted and the continued one with their lines.
    assert marked[:400].sum() == 0 and marked[400:800].sum() > 0 and marked[800:1200].sum() > 0
