"""Starting from audio: audio-to-audio (SDEdit) and inpainting / continuation, training-free,
on the flow path of the latent ODE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lafma.models import build_pipeline
from pipelines.config import load_pipeline_config

CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"
CAPTION, SEED = "a bell rings twice", 3


def random_pipeline(cfg):
    """``cfg``'s generator with random weights, seeded; the UNet's zero-initialised output
    layers get noise, or its velocity would be 0 whatever the input."""
    torch.manual_seed(0)
    p = build_pipeline(cfg)
    with torch.no_grad():
        for w in p.unet.parameters():
            w.add_(0.05 * torch.randn_like(w))
    return p


@pytest.fixture(scope="module")
def pipe():
    """configs/test.yaml's generator with random weights (:func:`random_pipeline`)."""
    return random_pipeline(load_pipeline_config(CONFIG))


@pytest.fixture(scope="module")
def clip(pipe) -> torch.Tensor:
    """A clip of the pipeline's default length: a tone that rises, then noise."""
    n = round(pipe.defaults["duration"] * pipe.sample_rate)
    t = torch.arange(n) / pipe.sample_rate
    wave = 0.4 * torch.sin(2 * torch.pi * (300 + 400 * t) * t)
    wave[n // 2:] = 0.2 * torch.randn(n - n // 2, generator=torch.Generator().manual_seed(1))
    return wave


def test_strength_one_is_plain_generation_with_the_same_seed(pipe, clip):
    plain = pipe.generate([CAPTION], seeds=[SEED])
    edited = pipe.generate([CAPTION], seeds=[SEED], audio=clip, strength=1.0)
    assert torch.equal(edited.latents, plain.latents) and torch.equal(edited.audio, plain.audio)
    assert edited.nfe == plain.nfe


def test_strength_zero_is_the_inputs_round_trip(pipe, clip):
    out = pipe.generate([CAPTION], seeds=[SEED], audio=clip, strength=0.0)
    shape = pipe.latent_shape(pipe.defaults["duration"])
    latent = pipe.encode_audio(clip[None], shape)
    assert out.nfe == 0 and torch.allclose(out.latents, latent.cpu(), atol=1e-6)
    round_trip = pipe.generate([CAPTION], seeds=[SEED], audio=clip, strength=1e-9)  # rounds to no step too
    assert torch.equal(round_trip.audio, out.audio)


def test_a_partial_strength_starts_on_the_path_and_takes_its_share_of_the_steps(pipe, clip):
    steps = 8
    plain = pipe.generate([CAPTION], seeds=[SEED], steps=steps, guidance=1.0)
    half = pipe.generate([CAPTION], seeds=[SEED], steps=steps, guidance=1.0, audio=clip, strength=0.5)
    assert half.nfe == steps // 2 and plain.nfe == steps  # euler, no guidance: one call a step
    latent = pipe.encode_audio(clip[None], pipe.latent_shape(pipe.defaults["duration"])).cpu()
    # Nearer the input than plain generation is, and not the input itself.
    assert (half.latents - latent).norm() < (plain.latents - latent).norm()
    assert not torch.allclose(half.latents, latent, atol=1e-3)


def test_inpainting_keeps_every_latent_frame_outside_the_region_and_regenerates_inside(pipe, clip):
    duration = pipe.defaults["duration"]
    shape = pipe.latent_shape(duration)
    latent = pipe.encode_audio(clip[None], shape).cpu()
    region = (0.4, 0.8)
    inside = pipe.latent_frames(*region, shape[1])
    assert 0 < inside.start < inside.stop < shape[1]
    outputs = {c: pipe.generate([c], seeds=[SEED], audio=clip, regenerate=region) for c in (CAPTION, "rain")}
    for out in outputs.values():
        keep = torch.ones(shape[1], dtype=torch.bool)
        keep[inside] = False
        # On the path at t = 1: the input's latent (sigma_min = 0 here), exactly.
        assert pipe.sigma_min == 0.0
        assert torch.equal(out.latents[:, :, keep], latent[:, :, keep])
        assert not torch.allclose(out.latents[:, :, inside], latent[:, :, inside], atol=1e-3)
    # What is regenerated follows the caption.
    a, b = (o.latents[:, :, inside] for o in outputs.values())
    assert not torch.allclose(a, b, atol=1e-3)


def test_continuation_regenerates_what_lies_past_the_inputs_end(pipe, clip):
    duration = pipe.defaults["duration"]
    head = clip[: round(duration / 2 * pipe.sample_rate)]  # the first half; the rest is to come
    out = pipe.generate([CAPTION], seeds=[SEED], audio=head, duration=duration, regenerate=(duration / 2, duration))
    shape = pipe.latent_shape(duration)
    given = pipe.encode_audio(head[None], shape).cpu()
    kept = pipe.latent_frames(0.0, duration / 2, shape[1])
    new = pipe.latent_frames(duration / 2, duration, shape[1])
    first_new = new.start
    assert first_new > 0 and out.audio.shape[-1] == round(duration * pipe.sample_rate)
    assert torch.equal(out.latents[:, :, :first_new], given[:, :, :first_new])
    assert not torch.allclose(out.latents[:, :, new], given[:, :, new], atol=1e-3)
    assert kept.stop >= first_new


@pytest.mark.parametrize("kwargs, match", [
    ({"regenerate": (0.2, 0.4)}, "give audio"),
    ({"strength": 0.5}, "give audio"),
    ({"audio": "clip", "strength": 1.5}, "strength must be in"),
    ({"audio": "clip", "regenerate": (0.6, 0.2)}, "start < end"),
    ({"audio": "clip", "regenerate": (0.2, 0.4), "solver": "dopri5"}, "fixed-step solver"),
])
def test_bad_audio_requests_say_why(pipe, clip, kwargs, match):
    if kwargs.get("audio") == "clip":
        kwargs = {**kwargs, "audio": clip}
    with pytest.raises(ValueError, match=match):
        pipe.generate([CAPTION], seeds=[SEED], **kwargs)
