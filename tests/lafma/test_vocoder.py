"""HiFi-GAN generator, discriminators, losses and the Griffin-Lim baseline."""

from __future__ import annotations

import math

import pytest
import torch

from lafma.audio.mel import MelSpectrogram
from lafma.config import HiFiGANConfig, HiFiGANLossConfig, MelConfig
from lafma.train import weighted_sum
from lafma.vocoder import (
    GriffinLimVocoder,
    HiFiGANDiscriminator,
    HiFiGANGenerator,
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    Vocoder,
    discriminator_loss,
    discriminator_losses,
    feature_matching_loss,
    generator_adversarial_loss,
    generator_losses,
    loss_weights,
    mel_l1_loss,
    vocoder_by_kind,
)

SR = 16000


def tiny_generator(**kw) -> HiFiGANGenerator:
    # Paper upsampling (hop 160) at 1/32 of the width.
    return HiFiGANGenerator(upsample_initial_channel=32, n_mels=64, **kw)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tones(n: int, freqs: tuple[float, ...] = (440.0, 880.0)) -> torch.Tensor:
    t = torch.arange(n) / SR
    return sum(0.4 / (i + 1) * torch.sin(2 * math.pi * f * t) for i, f in enumerate(freqs))[None]


@pytest.mark.parametrize("frames", [1, 7, 32])
def test_generator_output_is_exactly_frames_times_hop(frames):
    torch.manual_seed(0)
    gen = tiny_generator().eval()
    mel = torch.randn(2, 64, frames)
    wav = gen(mel)
    assert gen.hop == 160
    assert wav.shape == (2, frames * 160)
    # Folding weight norm away must not change the function.
    torch.testing.assert_close(gen.remove_weight_norm()(mel), wav)


def test_paper_size_parameter_counts():
    with torch.device("meta"):  # shapes only: no memory, no init cost
        gen16k = HiFiGANGenerator.from_config(HiFiGANConfig(), n_mels=64)
        # HiFi-GAN V1 at 22.05 kHz: the HiFi-GAN paper reports 13.92 M (without weight norm).
        v1 = HiFiGANGenerator(upsample_rates=(8, 8, 2, 2), upsample_kernel_sizes=(16, 16, 4, 4),
                              upsample_initial_channel=512, n_mels=80).remove_weight_norm()
        mpd, msd = MultiPeriodDiscriminator(), MultiScaleDiscriminator()
    assert n_params(v1) == pytest.approx(13.92e6, rel=1e-3)
    # 1024 channels over five stages (AudioLDM's 16 kHz vocoder) is four times V1.
    assert n_params(gen16k) == pytest.approx(55.29e6, rel=1e-3)
    assert n_params(mpd) == pytest.approx(41.1e6, rel=1e-3)
    assert n_params(msd) == pytest.approx(29.6e6, rel=1e-3)


def test_discriminators_return_one_output_per_sub_discriminator():
    torch.manual_seed(0)
    wav = torch.randn(2, 3201)  # not a multiple of any period: exercises the padding
    mpd_logits, mpd_fmaps = MultiPeriodDiscriminator(width_mult=1 / 16)(wav)
    msd_logits, msd_fmaps = MultiScaleDiscriminator(width_mult=1 / 16)(wav)
    logits, fmaps = HiFiGANDiscriminator(width_mult=1 / 16)(wav)
    assert (len(mpd_logits), len(mpd_fmaps), len(msd_logits), len(msd_fmaps)) == (5, 5, 3, 3)
    assert (len(logits), len(fmaps)) == (8, 8)
    assert all(x.shape[0] == 2 and x.dim() == 2 for x in logits)
    assert [len(f) for f in fmaps] == [6] * 5 + [8] * 3  # layers + conv_post


def test_losses_known_answers():
    ones, zeros = [torch.ones(2, 5), torch.ones(2, 3)], [torch.zeros(2, 5), torch.zeros(2, 3)]
    assert discriminator_loss(ones, zeros).item() == 0.0  # perfect discriminator
    assert discriminator_loss(zeros, ones).item() == 4.0  # worst: (1 + 1) per discriminator
    assert generator_adversarial_loss(ones).item() == 0.0
    assert generator_adversarial_loss(zeros).item() == 2.0
    fmaps = [[torch.randn(2, 4, 8), torch.randn(2, 1, 8)], [torch.randn(2, 3)]]
    assert feature_matching_loss(fmaps, fmaps).item() == 0.0
    shifted = [[f + 0.5 for f in d] for d in fmaps]
    assert feature_matching_loss(fmaps, shifted).item() == pytest.approx(1.5)  # 3 maps x 0.5
    mel_fn = MelSpectrogram()
    wav = tones(3200)
    assert mel_l1_loss(mel_fn, wav, mel_fn(wav)).item() == 0.0

    weights = loss_weights(HiFiGANLossConfig())
    losses = {"mel/l1": torch.tensor(1.0), "adv/gen": torch.tensor(2.0), "adv/feat": torch.tensor(3.0)}
    assert weighted_sum(losses, weights).item() == pytest.approx(45 + 2 + 6)
    with pytest.raises(ValueError, match="no weighted loss"):
        weighted_sum({"typo": torch.tensor(1.0)}, weights)


def test_griffin_lim_reconstructs_a_tone():
    torch.manual_seed(0)
    mel_fn = MelSpectrogram()
    mel = mel_fn(0.5 * torch.sin(2 * math.pi * 440 * torch.arange(SR) / SR)[None])  # 1 s
    wav = GriffinLimVocoder.from_config(MelConfig())(mel)
    assert wav.shape == (1, mel.shape[-1] * 160)
    # Measured 0.35 (0.67 with torchaudio's clipped least-squares mel inverse).
    assert (mel_fn(wav) - mel).abs().mean().item() < 0.5
    # Mel filters near 440 Hz are ~46 Hz apart, so the mel only pins a tone to about half
    # of that; measured 450 Hz.
    peak_hz = torch.fft.rfft(wav[0]).abs().argmax().item() * SR / wav.shape[-1]
    assert abs(peak_hz - 440) < 25


def test_griffin_lim_seeds_each_item_in_a_batch():
    """A batch vocoded with seeds equals each item vocoded alone with its seed, and each seed
    gives the torchaudio draw the global RNG would after ``torch.manual_seed(seed)``; without
    seeds the global RNG decides."""
    vocoder = GriffinLimVocoder.from_config(MelConfig(), n_iter=4)
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(3, 64, 20, generator=g) - 6
    batch = vocoder(mel, seeds=[5, 6, 7])
    for i, seed in enumerate([5, 6, 7]):
        torch.testing.assert_close(vocoder(mel[i : i + 1], seeds=[seed])[0], batch[i], rtol=0, atol=0)
        torch.manual_seed(seed)
        torch.testing.assert_close(vocoder(mel[i : i + 1])[0], batch[i], rtol=0, atol=0)
    assert (vocoder(mel, seeds=[5, 6, 8])[2] - batch[2]).abs().max() > 1e-4  # another seed, another phase
    with pytest.raises(ValueError, match="2 seeds for 3 mels"):
        vocoder(mel, seeds=[1, 2])


def test_griffin_lim_loads_bundles_that_stored_torchaudios_window():
    """Bundles written while the vocoder wrapped torchaudio's GriffinLim hold its Hann window
    as ``griffin_lim.window``: they still load strictly (the demo's registered models); a
    window that is not this config's is refused."""
    vocoder = GriffinLimVocoder.from_config(MelConfig())
    assert vocoder.state_dict() == {}
    vocoder.load_state_dict({"griffin_lim.window": torch.hann_window(1024)}, strict=True)
    with pytest.raises(ValueError, match="Hann window"):
        vocoder.load_state_dict({"griffin_lim.window": torch.ones(1024)}, strict=True)


@pytest.mark.slow
def test_generator_overfits_one_clip_on_mel_l1():
    torch.manual_seed(0)
    mel_fn = MelSpectrogram()
    mel = mel_fn(tones(1600))  # 0.1 s: 10 frames
    gen = tiny_generator()
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3, betas=(0.8, 0.99))
    losses = []
    for _ in range(200):
        loss = mel_l1_loss(mel_fn, gen(mel), mel)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Measured: 2.97 → 0.52 (x5.8) in ~4 s.
    assert losses[0] / (sum(losses[-5:]) / 5) > 4


def test_one_gan_step_gives_finite_losses_and_updates_both_models():
    torch.manual_seed(0)
    mel_fn = MelSpectrogram()
    wav_real = tones(3200).repeat(2, 1)
    mel_real = mel_fn(wav_real)
    gen, disc = tiny_generator(), HiFiGANDiscriminator(width_mult=1 / 16)
    opt_g, opt_d = torch.optim.Adam(gen.parameters(), 2e-4), torch.optim.Adam(disc.parameters(), 2e-4)
    weights = loss_weights(HiFiGANLossConfig())
    gen_before = [p.detach().clone() for p in gen.parameters()]

    wav_fake = gen(mel_real)
    d_losses = discriminator_losses(disc, wav_real, wav_fake)
    opt_d.zero_grad()
    weighted_sum(d_losses, weights).backward()
    assert all(p.grad is None for p in gen.parameters())  # the fake was detached
    opt_d.step()
    opt_d.zero_grad()

    disc.requires_grad_(False)  # no discriminator gradients from the generator step
    g_losses = generator_losses(disc, mel_fn, wav_real, wav_fake, mel_real)
    opt_g.zero_grad()
    weighted_sum(g_losses, weights).backward()
    opt_g.step()
    disc.requires_grad_(True)
    assert all(p.grad is None for p in disc.parameters())

    assert set(g_losses) == {"mel/l1", "adv/gen", "adv/feat"} and set(d_losses) == {"adv/disc"}
    assert all(torch.isfinite(v) for v in {**g_losses, **d_losses}.values())
    assert any(not torch.equal(a, b) for a, b in zip(gen_before, gen.parameters()))


@pytest.mark.parametrize("kind", ["hifigan", "griffinlim"])
@pytest.mark.parametrize("frames", [1, 4, 25])
def test_vocoder_by_kind_makes_a_vocoder_of_exact_length(kind, frames):
    torch.manual_seed(0)
    voc = vocoder_by_kind(kind, mel=MelConfig(), hifigan=HiFiGANConfig(upsample_initial_channel=32))
    assert isinstance(voc, Vocoder) and voc.hop == 160
    assert voc(torch.randn(2, 64, frames)).shape == (2, frames * 160)


def test_vocoder_by_kind_rejects_mismatches():
    with pytest.raises(ValueError, match="unknown vocoder"):
        vocoder_by_kind("wavenet", mel=MelConfig())
    with pytest.raises(ValueError, match="mel hop"):
        vocoder_by_kind("hifigan", mel=MelConfig(hop_length=256))
