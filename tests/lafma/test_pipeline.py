from pathlib import Path

import pytest
import torch

from lafma.flow import ClassifierFreeGuidance, solve
from lafma.models import build_pipeline, build_unet
from lafma.pipeline import CPU_DECODE_BATCH, LafmaPipeline, sample_latents
from pipelines.config import load_pipeline_config

CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"


@pytest.fixture(scope="module")
def pipe():
    cfg = load_pipeline_config(CONFIG)
    torch.manual_seed(0)
    unet = build_unet(cfg)
    # Random (not zero-initialised) output layers, so text and noise both shape the audio.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return build_pipeline(cfg, unet=unet)


def test_output_length_follows_duration_and_nfe_follows_solver(pipe):
    out = pipe.generate(["a dog barks"], seeds=[0], duration=0.5, steps=3, guidance=3.0, solver="euler")
    assert out.audio.shape == (1, 8000) and out.sample_rate == 16000
    assert out.nfe == 6  # guidance doubles every evaluation
    assert pipe.generate(["a dog barks"], seeds=[0], duration=0.5, steps=3, guidance=1.0).nfe == 3
    assert pipe.generate(["a dog barks"], seeds=[0], duration=0.5, steps=3, solver="rk4").nfe == 24
    assert torch.isfinite(out.audio).all()
    assert out.audio.abs().max() <= 0.95 + 1e-6  # peak-normalised


def test_same_caption_and_seed_give_the_same_audio_whatever_else_is_in_the_batch(pipe):
    kw = dict(duration=0.64, steps=3)
    ref = pipe.generate(["a cello plays a low note"], seeds=[7], **kw)
    alone = ref.audio[0]
    batch = pipe.generate(["three short high beeps and a long tail", "a cello plays a low note", "rain"],
                          seeds=[1, 7, 3], **kw)
    torch.testing.assert_close(batch.latents[1], ref.latents[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch.audio[1], alone, atol=2e-4, rtol=1e-3)
    again = pipe.generate(["a cello plays a low note"], seeds=[7], **kw).audio[0]
    torch.testing.assert_close(again, alone)
    # ...and the seed and the caption both matter.
    other_seed = pipe.generate(["a cello plays a low note"], seeds=[8], **kw).audio[0]
    other_text = pipe.generate(["rain on a tin roof"], seeds=[7], **kw).latents[0]
    assert (other_seed - alone).abs().max() > 1e-2
    assert (other_text - ref.latents[0]).abs().max() > 1e-3  # 10x the batch tolerance above


def test_griffin_lim_audio_depends_only_on_caption_and_seed():
    """Griffin-Lim starts from a random phase: the pipeline seeds it per item."""
    cfg = load_pipeline_config(CONFIG, ["vocoder.kind=griffinlim"])
    torch.manual_seed(0)
    gl = build_pipeline(cfg)
    kw = dict(duration=0.64, steps=2)
    alone = gl.generate(["a bell"], seeds=[5], **kw).audio[0]
    torch.manual_seed(123)  # another global RNG state, another batch: the same clip
    batch = gl.generate(["rain", "a bell"], seeds=[1, 5], **kw).audio[1]
    torch.testing.assert_close(batch, alone, atol=1e-3, rtol=1e-3)  # GL amplifies batch-level rounding
    assert (gl.generate(["a bell"], seeds=[6], **kw).audio[0] - alone).abs().max() > 1e-2


def test_seeds_are_returned_when_drawn_and_checked_when_given(pipe):
    out = pipe.generate(["a", "b"], duration=0.32, steps=1)
    assert len(out.seeds) == 2
    again = pipe.generate(["a", "b"], seeds=out.seeds, duration=0.32, steps=1)
    torch.testing.assert_close(again.audio, out.audio)
    with pytest.raises(ValueError, match="seeds"):
        pipe.generate(["a", "b"], seeds=[1], duration=0.32)
    with pytest.raises(ValueError, match="duration"):
        pipe.generate(["a"], seeds=[1], duration=10_000)


def test_empty_caption_is_a_valid_input(pipe):
    out = pipe.generate([""], seeds=[0], duration=0.32, steps=2)
    assert torch.isfinite(out.audio).all()


def test_generate_samples_its_latents_with_sample_latents(pipe):
    """The LFM job's training-time samples call the same function: it must be generate's ODE."""
    out = pipe.generate(["a dog barks"], seeds=[3], duration=0.32, steps=2, guidance=2.0)
    ctx, mask = pipe.text_encoder(["a dog barks"])
    null = pipe.text_encoder([""])
    x0 = pipe.noise([3], pipe.latent_shape(0.32))
    with torch.no_grad():
        sol = sample_latents(pipe.unet, x0, ctx, mask, guidance=2.0, null_condition=null, steps=2)
        by_hand = solve(ClassifierFreeGuidance(pipe.unet, 2.0, *null), x0, steps=2, context=ctx, context_mask=mask)
        plain = sample_latents(pipe.unet, x0, ctx, mask, guidance=1.0, steps=2)  # no empty caption needed
    torch.testing.assert_close(sol.x, out.latents)
    torch.testing.assert_close(sol.x, by_hand.x)
    assert sol.nfe == out.nfe == 4 and plain.nfe == 2
    with pytest.raises(ValueError, match="empty caption"):
        sample_latents(pipe.unet, x0, ctx, mask, guidance=2.0)


def test_vocoding_real_mels_is_seeded_per_item():
    """What evaluate's references (real mels through Griffin-Lim, and through the VAE) rely on."""
    cfg = load_pipeline_config(CONFIG, ["vocoder.kind=griffinlim"])
    gl = build_pipeline(cfg)
    mel = torch.randn(2, cfg.mel.n_mels, 32, generator=torch.Generator().manual_seed(0)) - 5.0
    torch.manual_seed(1)
    first = gl.vocode(mel, [10, 11])
    torch.manual_seed(2)  # another global RNG state: the same audio
    torch.testing.assert_close(gl.vocode(mel, [10, 11]), first)
    assert (gl.vocode(mel, [12, 11])[0] - first[0]).abs().max() > 1e-3  # the seed is what decides


def test_the_empty_caption_is_encoded_once_and_again_after_a_move(pipe):
    """generate() reuses the empty caption's embedding instead of running the encoder on it per call."""
    seen = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda _m, args: seen.append(list(args[0])))
    try:
        pipe._null_cache = None
        first = pipe.generate(["a dog barks"], seeds=[1], duration=0.32, steps=2, guidance=2.0)
        again = pipe.generate(["a dog barks"], seeds=[1], duration=0.32, steps=2, guidance=2.0)
        assert seen.count([""]) == 1 and seen.count(["a dog barks"]) == 2
        torch.testing.assert_close(first.audio, again.audio)
        pipe.to(torch.float64)  # weights somewhere else: the cached embedding is stale
        pipe.null_condition(torch.ones(1, 3, dtype=torch.bool))
        assert seen.count([""]) == 2
    finally:
        hook.remove()
        pipe.to(torch.float32)
        pipe._null_cache = None


def test_decoding_in_chunks_gives_each_item_its_own_audio():
    """generate() decodes and vocodes ``decode_batch`` latents at a time: the chunks are what
    the VAE and the vocoder see, and every item's audio is what decoding it alone gives."""
    cfg = load_pipeline_config(CONFIG, ["vocoder.kind=griffinlim"])
    torch.manual_seed(0)
    gl = build_pipeline(cfg)
    latents = torch.randn(5, *gl.latent_shape(0.64), generator=torch.Generator().manual_seed(0))
    seeds = [3, 1, 4, 1, 5]
    sizes = []
    decode = gl.vae.decode
    gl.vae.decode = lambda z: sizes.append(len(z)) or decode(z)
    try:
        gl.decode_batch = 2
        chunked = gl.decode(latents, seeds)
        assert sizes == [2, 2, 1]
        sizes.clear()
        gl.decode_batch = None  # on a CPU: CPU_DECODE_BATCH at a time
        default = gl.decode(latents, seeds)
        assert sizes == [min(CPU_DECODE_BATCH, 5 - i) for i in range(0, 5, CPU_DECODE_BATCH)]
        sizes.clear()
        alone = [gl.decode(latents[i : i + 1], seeds[i : i + 1])[0] for i in range(5)]
    finally:
        gl.vae.decode = decode
    assert chunked.shape == (5, latents.shape[2] * cfg.vae.downsample * cfg.mel.hop_length)
    # Un-normalised audio peaks at ~4 here; Griffin-Lim turns the VAE's batch-level rounding
    # (~1e-5 in the mel) into up to ~0.02 (measured), and another clip differs by ~4.
    for i in range(5):
        torch.testing.assert_close(chunked[i], alone[i], atol=0.05, rtol=0)
        torch.testing.assert_close(default[i], alone[i], atol=0.05, rtol=0)
    assert (chunked[1] - chunked[3]).abs().max() > 1.0  # same seed, other latent: other audio
    with pytest.raises(ValueError, match="decode_batch"):
        LafmaPipeline(text_encoder=gl.text_encoder, unet=gl.unet, vae=gl.vae, vocoder=gl.vocoder,
                      sample_rate=16000, hop_length=160, n_mels=64, latent_channels=8, vae_downsample=4,
                      decode_batch=0)
