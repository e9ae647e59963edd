"""The mel VAE, its posterior, discriminator and losses: shapes, closed forms, overfitting."""

from __future__ import annotations

import math

import pytest
import torch

from lafma.audio.mel import MelSpectrogram
from lafma.config import VAEConfig, VAELossConfig
from lafma.train import weighted_sum
from lafma.vae import (
    DiagonalGaussian,
    MelVAE,
    NLayerDiscriminator,
    VAELoss,
    adopt_weight,
    hinge_d_loss,
    mel_to_image,
)

TINY = dict(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=8)
# Measured on this implementation (encoder + decoder + quant convs). The design's "≈ 53 M" is
# this number in units of 2**20 (55 376 873 / 2**20 = 52.8).
PAPER_VAE_PARAMS = 55_376_873
PAPER_DISC_PARAMS = 2_763_585


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def one_thread():
    """Pin intra-op threads to one for every test here.

    On a shared 2-core runner, two OpenMP threads that wait on each other at every barrier can
    run 5-10x slower than one; one thread is also bitwise deterministic.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sine_mels(frames: int) -> torch.Tensor:
    """Two structured log-mels (2, 64, frames): a gated 440 Hz tone and a rising chirp."""
    sr, n = 16000, frames * 160
    t = torch.arange(n) / sr
    dur = n / sr
    tone = 0.5 * torch.sin(2 * math.pi * 440 * t) * (t < dur / 2)
    chirp = 0.3 * torch.sin(2 * math.pi * (300 + 3000 / dur * t) * t)
    return MelSpectrogram()(torch.stack([tone, chirp]))


# --------------------------------------------------------------------------- model


def test_paper_config_shapes_and_param_count():
    # Meta tensors carry shapes through every op without allocating or computing: the full
    # 1024-frame clip at paper size costs nothing.
    with torch.device("meta"):
        vae = MelVAE.from_config(VAEConfig())
        recon, posterior = vae(torch.empty(2, 64, 1024))
        disc = NLayerDiscriminator()
    assert posterior.mean.shape == (2, 8, 256, 16)
    assert recon.shape == (2, 64, 1024)
    assert _count(vae) == PAPER_VAE_PARAMS
    assert abs(_count(vae) - 53e6) / 53e6 < 0.05
    assert _count(disc) == PAPER_DISC_PARAMS


def test_paper_config_runs_on_a_short_clip():
    torch.manual_seed(0)
    vae = MelVAE.from_config(VAEConfig()).eval()
    with torch.no_grad():
        posterior = vae.encode(torch.randn(1, 64, 32))
        mel = vae.decode(posterior.mode())
    # Time is the image height: 32 frames → 8 latent rows, 64 bins → 16 latent columns.
    assert posterior.mean.shape == (1, 8, 8, 16)
    assert mel.shape == (1, 64, 32)
    assert torch.isfinite(mel).all()


def test_state_dict_follows_ldm_key_layout():
    # Same keys as AudioLDM's first_stage_model, so its released weights load directly.
    keys = set(MelVAE(**TINY).state_dict())
    for key in ("encoder.down.0.block.0.norm1.weight", "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down.1.downsample.conv.weight", "encoder.mid.attn_1.q.weight",
                "encoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight",
                "decoder.mid.block_2.conv2.weight", "decoder.up.2.block.1.conv1.weight",
                "decoder.up.1.upsample.conv.weight", "decoder.conv_out.weight"):
        assert key in keys, key
    assert "decoder.up.0.upsample.conv.weight" not in keys  # full resolution: nothing to upsample


def test_mel_normalisation_wraps_the_same_network_and_keeps_the_state_dict():
    torch.manual_seed(0)
    raw = MelVAE(**TINY).eval()
    centred = MelVAE(**TINY, mel_mean=-6.6, mel_std=3.6).eval()
    centred.load_state_dict(raw.state_dict())  # the same keys: AudioLDM weights load into either
    mel = _sine_mels(64)
    with torch.no_grad():
        post = centred.encode(mel)
        assert torch.allclose(post.mean, raw.encode((mel + 6.6) / 3.6).mean, atol=1e-5)
        z = post.mean
        assert torch.allclose(centred.decode(z), raw.decode(z) * 3.6 - 6.6, atol=1e-5)
        assert not torch.allclose(centred.decode(z), raw.decode(z), atol=1e-2)


def test_encode_rejects_indivisible_mel():
    with pytest.raises(ValueError, match="divisible by 4"):
        MelVAE(**TINY).encode(torch.zeros(1, 64, 30))


def test_discriminator_patch_shape():
    logits = NLayerDiscriminator(ndf=16, n_layers=3)(torch.randn(2, 1, 64, 32))
    assert logits.shape == (2, 1, 64 // 8 - 2, 32 // 8 - 2)


# --------------------------------------------------------------------------- posterior


def test_kl_of_standard_normal_is_zero():
    g = DiagonalGaussian(torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 4, 4))
    torch.testing.assert_close(g.kl(), torch.zeros(2))


def test_kl_closed_form_mean_one_unit_variance():
    # 0.5 * (mu² + σ² − 1 − log σ²) = 0.5 per element, 3 * 4 * 5 elements per sample.
    g = DiagonalGaussian(torch.ones(2, 3, 4, 5), torch.zeros(2, 3, 4, 5))
    torch.testing.assert_close(g.kl(), torch.full((2,), 30.0))


def test_nll_at_the_mean_is_the_normaliser():
    g = DiagonalGaussian(torch.randn(2, 3, 4, 5), torch.zeros(2, 3, 4, 5))
    torch.testing.assert_close(g.nll(g.mean), torch.full((2,), 0.5 * math.log(2 * math.pi) * 60))


def test_sample_is_reproducible_and_mode_is_mean():
    mean, logvar = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    g = DiagonalGaussian(mean, logvar)
    a = g.sample(torch.Generator().manual_seed(3))
    b = g.sample(torch.Generator().manual_seed(3))
    c = g.sample(torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(g.mode(), mean)


def test_logvar_is_clamped():
    g = DiagonalGaussian(torch.zeros(1, 2), torch.tensor([[-100.0, 100.0]]))
    assert g.logvar.tolist() == [[-30.0, 20.0]]


# --------------------------------------------------------------------------- losses


def test_adopt_weight_switches_on_at_disc_start():
    assert adopt_weight(1.0, step=9, threshold=10) == 0.0
    assert adopt_weight(1.0, step=10, threshold=10) == 1.0
    loss = VAELoss.from_config(VAELossConfig(disc_start=10, disc_factor=0.7))
    assert loss.disc_factor_at(9) == 0.0 and loss.disc_factor_at(10) == 0.7


def test_hinge_discriminator_loss_known_values():
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([-2.0, 1.0])
    # 0.5 * (mean(1, 0) + mean(0, 2)) = 0.5 * (0.5 + 1.0)
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.75))
    loss = VAELoss(disc_start=5)
    out = loss.discriminator_losses(real, fake)
    assert weighted_sum(out, loss.loss_weights(step=4)).item() == 0.0  # off before disc_start
    torch.testing.assert_close(weighted_sum(out, loss.loss_weights(step=5)), torch.tensor(0.75))
    torch.testing.assert_close(out["adv/disc"], torch.tensor(0.75))
    torch.testing.assert_close(out["logits/real"], torch.tensor(1.0))
    torch.testing.assert_close(out["logits/fake"], torch.tensor(-0.5))


def test_adaptive_weight_positive_with_fake_path_and_zero_without_graph():
    torch.manual_seed(0)
    vae, disc = MelVAE(**TINY), NLayerDiscriminator(ndf=16, n_layers=2)
    loss = VAELoss(disc_start=0, disc_weight=0.5)
    mel = torch.randn(2, 64, 32)
    recon, posterior = vae(mel)
    out = loss.generator_losses(mel, recon, posterior, disc(mel_to_image(recon)), step=0,
                                last_layer=vae.get_last_layer())
    assert torch.isfinite(out["adv/weight"]) and out["adv/weight"].item() > 0
    assert not out["adv/weight"].requires_grad
    with torch.no_grad():
        recon, posterior = vae(mel)
        out = loss.generator_losses(mel, recon, posterior, disc(mel_to_image(recon)), step=0,
                                    last_layer=vae.get_last_layer())
    assert out["adv/weight"].item() == 0.0


def test_generator_total_is_the_weighted_sum_of_its_terms():
    # LDM's objective written out: nll + kl_weight·KL + λ·disc_factor·(−mean D(x̂)), with
    # nll = Σ |x − x̂| / e^s + s per sample (s = 0.5 here) and λ the given adaptive weight.
    loss = VAELoss(kl_weight=0.1, logvar_init=0.5, disc_start=3, disc_factor=0.8)
    mel, recon = torch.zeros(2, 4, 6), torch.full((2, 4, 6), 2.0)
    posterior = DiagonalGaussian(torch.ones(2, 1, 2, 3), torch.zeros(2, 1, 2, 3))  # KL 0.5 per element
    logits, lam = torch.full((2, 1, 2, 2), -3.0), torch.tensor(4.0)
    nll = (2.0 / math.exp(0.5) + 0.5) * 24
    for step, factor in ((2, 0.0), (3, 0.8)):
        terms = loss.generator_losses(mel, recon, posterior, logits, step, adv_weight=lam)
        torch.testing.assert_close(terms["rec/nll"], torch.tensor(nll))
        torch.testing.assert_close(terms["kl"], torch.tensor(3.0))
        torch.testing.assert_close(terms["adv/gen"], torch.tensor(3.0))
        assert terms["rec/l1"].item() == 2.0 and terms["adv/weight"].item() == 4.0
        total = weighted_sum(terms, loss.loss_weights(step, terms["adv/weight"]))
        torch.testing.assert_close(total, torch.tensor(nll + 0.1 * 3.0 + 4.0 * factor * 3.0))


# --------------------------------------------------------------------------- training


@pytest.mark.slow
def test_tiny_vae_overfits_one_batch():
    torch.manual_seed(0)
    mel = _sine_mels(32)  # (2, 64, 32)
    # A decoder that ignored its latent could at best output the per-bin median of the two
    # mels; beating that by 2x shows the latent carries each mel's content.
    blind_l1 = ((mel[0] - mel[1]).abs().mean() / 2).item()
    vae = MelVAE(**TINY)
    loss = VAELoss(kl_weight=1e-6, disc_start=10**9)
    opt = torch.optim.Adam([*vae.parameters(), *loss.parameters()], lr=2e-3)
    history = []
    for step in range(120):
        recon, posterior = vae(mel)
        out = loss.generator_losses(mel, recon, posterior, None, step, vae.get_last_layer())
        opt.zero_grad(set_to_none=True)
        weighted_sum(out, loss.loss_weights(step, out["adv/weight"])).backward()
        opt.step()
        history.append(out["rec/l1"].item())
    assert history[-1] < history[0] / 8
    assert history[-1] < 0.5 * blind_l1
    assert out["adv/gen"].item() == 0.0 and out["adv/weight"].item() == 0.0


def test_one_gan_step_past_disc_start():
    torch.manual_seed(0)
    mel = _sine_mels(32)  # (2, 64, 32)
    vae, disc = MelVAE(**TINY), NLayerDiscriminator(ndf=16, n_layers=2)
    loss = VAELoss(kl_weight=1e-6, disc_start=10, disc_weight=0.5)
    opt_g = torch.optim.Adam([*vae.parameters(), *loss.parameters()], lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
    step = 10
    recon, posterior = vae(mel)

    # Discriminator first, on a detached reconstruction.
    d_out = loss.discriminator_losses(disc(mel_to_image(mel)), disc(mel_to_image(recon.detach())))
    opt_d.zero_grad(set_to_none=True)
    weighted_sum(d_out, loss.loss_weights(step)).backward()
    opt_d.step()

    # Then the generator, with D frozen so its weights collect no gradient from this loss.
    disc.requires_grad_(False)
    g_out = loss.generator_losses(mel, recon, posterior, disc(mel_to_image(recon)), step,
                                  vae.get_last_layer())
    opt_g.zero_grad(set_to_none=True)
    opt_d.zero_grad(set_to_none=True)
    weighted_sum(g_out, loss.loss_weights(step, g_out["adv/weight"])).backward()
    opt_g.step()
    disc.requires_grad_(True)

    for name, value in {**d_out, **g_out}.items():
        assert torch.isfinite(value), name
    assert d_out["adv/disc"].item() > 0
    assert g_out["adv/weight"].item() > 0
    assert all(p.grad is None for p in disc.parameters())
    assert vae.get_last_layer().grad is not None and loss.logvar.grad is not None
