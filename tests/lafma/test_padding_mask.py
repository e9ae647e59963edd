"""Padding of short clips is masked out of every loss: the VAE, the vocoder and the LFM.

Clips shorter than ``audio.clip_seconds`` are zero-padded (their mel is the log floor there).
Each loss must (a) equal the unmasked loss exactly when nothing is padded, (b) not change when
the prediction changes on the padding (the unmasked one does), and the done-criterion: a tiny
model trained on clips that are all padded learns the padding without the mask and not with it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import Tensor

from lafma.audio.mel import MelSpectrogram
from lafma.config import to_dict
from lafma.flow import OTPath, flow_matching_loss
from lafma.models import build_unet, build_vae
from lafma.train import lfm_loss
from lafma.train.objectives import fill_padding, masked_mean, valid_frames, valid_mask
from lafma.vae import DiagonalGaussian, MelVAE, NLayerDiscriminator, VAELoss, mel_to_image
from lafma.vocoder import HiFiGANDiscriminator, discriminator_losses, generator_losses, mel_l1_loss
from pipelines.config import TrainConfig, load_pipeline_config
from pipelines.core.stage import digest
from pipelines.train.data import valid_crop

CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"
HOP = 160
FLOOR = math.log(1e-5)  # the log-mel of zero padding


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread: deterministic, and fast on a shared 2-core runner."""


# --------------------------------------------------------------------------- frames and crops


def test_valid_frames_counts_every_frame_with_a_real_sample_and_clamps():
    # Frame k covers samples [k·hop, (k+1)·hop): one real sample makes a frame real.
    got = valid_frames(torch.tensor([0, 1, 160, 161, 10_000, 10**9]), HOP, 32)
    assert got.tolist() == [0, 1, 1, 2, 32, 32]
    assert valid_frames(np.int32(320), HOP, 8).item() == 2  # numpy counts too (Parquet columns)
    assert valid_mask(torch.tensor([0, 2, 4]), 4).tolist() == [[False] * 4, [True, True, False, False], [True] * 4]


def test_latent_frames_are_real_where_any_of_their_mel_frames_is():
    from pipelines.stages.train import latent_valid_frames

    # 128 mel frames -> 32 latent frames (r = 4): 10 real mel frames -> 3 latent frames.
    got = latent_valid_frames([10 * HOP, 10 * HOP + 1, 1, 128 * HOP], HOP, 128, 32)
    assert got.tolist() == [3, 3, 1, 32]


def test_crops_land_inside_the_real_audio_and_the_short_clips_start_at_0():
    torch.manual_seed(0)
    b, t, frames = 5, 64, 16
    mel = torch.arange(t, dtype=torch.float32).expand(b, 3, t).clone()  # (B, 3, T): each value its frame index
    wav = torch.arange(t * HOP, dtype=torch.float32).expand(b, t * HOP).clone()  # each value its sample index
    # Real samples: full, 40 frames, 16 frames and a bit (17 real frames), exactly 16 frames, 5.5 frames.
    valid = torch.tensor([t * HOP, 40 * HOP, 16 * HOP + 7, 16 * HOP, 5 * HOP + 80])
    real = valid_frames(valid, HOP, t)
    starts = []
    for _ in range(200):
        crop, seg, crop_valid = valid_crop(mel, frames, valid, HOP, wav=wav)
        start = crop[:, 0, 0].long()  # (B,)
        starts.append(start)
        assert crop.shape == (b, 3, frames) and seg.shape == (b, frames * HOP)
        assert torch.equal(seg[:, 0].long(), start * HOP)  # the waveform is the same window
        assert (start + frames <= torch.clamp(real, min=frames)).all()  # inside the real frames
        # What of the crop is real, in samples: all of it where the clip is long enough.
        assert torch.equal(crop_valid, torch.clamp(valid - start * HOP, 0, frames * HOP))
        assert (valid_frames(crop_valid, HOP, frames)[:3] == frames).all()
    starts = torch.stack(starts)  # (draws, B)
    assert starts.max(0).values.tolist() == [t - frames, 40 - frames, 1, 0, 0]  # every start reached
    assert starts.min(0).values.tolist() == [0, 0, 0, 0, 0]
    # A short clip's crop holds all of its real audio (and the mask covers the rest).
    assert crop_valid[4].item() == 5 * HOP + 80
    # No crop asked for (or a crop as long as the clip): the clips as they are, and no draw.
    state = torch.get_rng_state()
    whole, _, whole_valid = valid_crop(mel, 0, valid, HOP)
    assert whole is mel and torch.equal(whole_valid, valid) and torch.equal(torch.get_rng_state(), state)


def test_the_jobs_crop_inside_the_real_audio_and_mask_only_when_asked():
    from pipelines.train.vae import VAETask
    from pipelines.train.vocoder import VocoderTask

    cfg = load_pipeline_config(CONFIG)  # 128 mel frames per clip; crops of 64 (VAE) and 16 (vocoder)
    t = cfg.mel_shape()[0]
    b = 4
    mel = np.tile(np.arange(t, dtype=np.float32), (b, cfg.mel.n_mels, 1))  # (B, n_mels, T): frame indices
    rows = {"mel": list(mel.reshape(b, -1)), "n_mels": np.full(b, cfg.mel.n_mels), "frames": np.full(b, t),
            "waveform": list(np.tile(np.arange(t * HOP, dtype=np.float32), (b, 1))),
            "valid_samples": np.array([t * HOP, 80 * HOP, 20 * HOP, 70 * HOP + 1], np.int32)}
    torch.manual_seed(0)
    vae, vocoder = VAETask(cfg, torch.device("cpu")), VocoderTask(cfg, torch.device("cpu"))
    for _ in range(20):
        batch = vae.batch(rows)
        start = batch["mel"][:, 0, 0].long()
        assert batch["mel"].shape[-1] == 64 and (start[[0, 1, 3]] + 64 <= torch.tensor([t, 80, 71])).all()
        assert start[2] == 0 and batch["valid_frames"].tolist()[2] == 20  # shorter than the crop: from 0
        assert VAETask.mask(batch).sum(1).tolist() == batch["valid_frames"].tolist()
        batch = vocoder.batch(rows)
        start = batch["mel"][:, 0, 0].long()
        assert batch["wav"].shape[-1] == 16 * HOP and torch.equal(batch["wav"][:, 0].long(), start * HOP)
        assert (start + 16 <= torch.tensor([t, 80, 20, 71])).all()
        assert batch["valid_samples"][:3].tolist() == [16 * HOP] * 3
    off = load_pipeline_config(CONFIG, ["train_vae.mask_padding=false", "train_vocoder.mask_padding=false"])
    assert set(VAETask(off, torch.device("cpu")).batch(rows)) == {"mel"}
    assert set(VocoderTask(off, torch.device("cpu")).batch(rows)) == {"mel", "wav"}


def test_the_switch_is_hashed_only_where_the_data_has_padding(tmp_path):
    from pipelines.core.stage import StageContext, write_marker
    from pipelines.stages.train import TrainLFMStage, TrainVAEStage

    assert TrainConfig().mask_padding is True

    def keys(padded: int, *overrides: str) -> tuple[str, str]:
        cfg = load_pipeline_config(CONFIG, list(overrides))
        ctx = StageContext(cfg=cfg, root=str(tmp_path), dataset="d")
        ctx.hashes |= {"audio": "a", "latents": "l", "text": "t", "train_vae": "v"}
        ctx.outputs["audio"] = str(tmp_path / f"audio-{padded}")
        write_marker(ctx.outputs["audio"], {"padded_clips": padded})
        return digest(TrainVAEStage().key(ctx)), digest(TrainLFMStage().key(ctx))

    # Full-length clips: masking changes nothing, and the stages trained before the switch stay.
    assert keys(0) == keys(0, "train_vae.mask_padding=false", "train_lfm.mask_padding=false")
    # Padded clips: a masked job is another training than an unmasked one (which is the old one).
    assert keys(3) != keys(0)
    assert keys(3, "train_vae.mask_padding=false", "train_lfm.mask_padding=false") == keys(0)
    # The flow model learns the padding by default (it has no duration to stop at); masked on request.
    assert keys(3)[1] == keys(0)[1] and keys(3, "train_lfm.mask_padding=true")[1] != keys(3)[1]


# --------------------------------------------------------------------------- the three losses


def _padded_batch(b: int = 3, n_mels: int = 16, t: int = 32, real: tuple[int, ...] = (32, 20, 9)):
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(b, n_mels, t, generator=g) - 5
    mask = valid_mask(torch.tensor(real), t)  # (B, T)
    mel = torch.where(mask[:, None, :], mel, torch.full_like(mel, FLOOR))
    recon = torch.randn(b, n_mels, t, generator=g) - 5
    posterior = DiagonalGaussian(torch.randn(b, 4, t // 4, n_mels // 4, generator=g),
                                 torch.randn(b, 4, t // 4, n_mels // 4, generator=g))
    return mel, recon, posterior, mask


def _vae_terms(loss: VAELoss, disc, mel, recon, posterior, mask):
    logits = disc(mel_to_image(fill_padding(recon, mel, None if mask is None else mask[:, None, :])))
    return loss.generator_losses(mel, recon, posterior, logits, step=0, adv_weight=torch.tensor(0.3), mask=mask)


def test_vae_loss_without_padding_is_exactly_the_unmasked_loss():
    torch.manual_seed(0)
    mel, recon, posterior, _ = _padded_batch()
    loss, disc = VAELoss(logvar_init=0.3), NLayerDiscriminator(ndf=8, n_layers=2)
    full = valid_mask(valid_frames(torch.full((3,), 32 * HOP), HOP, 32), 32)  # clips with no padding
    masked, plain = _vae_terms(loss, disc, mel, recon, posterior, full), _vae_terms(loss, disc, mel, recon, posterior,
                                                                                  None)
    for key in ("rec/nll", "rec/l1", "kl", "adv/gen"):
        assert torch.equal(masked[key], plain[key]), key
    assert torch.equal(loss.nll(mel, recon, full), loss.nll(mel, recon))


def test_vae_loss_ignores_the_reconstruction_of_the_padding():
    torch.manual_seed(0)
    mel, recon, posterior, mask = _padded_batch()
    loss, disc = VAELoss(), NLayerDiscriminator(ndf=8, n_layers=2)
    other = torch.where(mask[:, None, :], recon, recon + 7.0)  # the same on real frames, not on padding
    for key in ("rec/nll", "rec/l1", "adv/gen"):
        with_mask = [_vae_terms(loss, disc, mel, r, posterior, mask)[key] for r in (recon, other)]
        without = [_vae_terms(loss, disc, mel, r, posterior, None)[key] for r in (recon, other)]
        assert torch.equal(*with_mask), key
        assert not torch.allclose(*without), key
    # No gradient reaches the padding, through the likelihood or the discriminator.
    leaf = recon.clone().requires_grad_(True)
    terms = _vae_terms(loss, disc, mel, leaf, posterior, mask)
    (terms["rec/nll"] + terms["adv/gen"]).backward()
    pad = ~mask[:, None, :].expand_as(leaf)
    assert leaf.grad[pad].abs().max() == 0 and leaf.grad[~pad].abs().sum() > 0
    # Masked, the nll keeps the unmasked scale: the mean per real element times a clip's elements.
    elem = (mel - recon).abs() / torch.exp(loss.logvar) + loss.logvar  # (B, n_mels, T)
    expected = elem[~pad].mean() * mel[0].numel()
    torch.testing.assert_close(loss.nll(mel, recon, mask), expected)


def test_vocoder_losses_ignore_the_waveform_past_the_real_samples():
    torch.manual_seed(0)
    # eval: spectral norm's power iteration would otherwise change the discriminator at every call.
    mel_fn, disc = MelSpectrogram(), HiFiGANDiscriminator(width_mult=1 / 16).eval()
    frames = 16
    g = torch.Generator().manual_seed(0)
    valid = torch.tensor([frames * HOP, 1000])  # the second clip: 6.25 frames of audio, then zeros
    real = 0.3 * torch.randn(2, frames * HOP, generator=g) * valid_mask(valid, frames * HOP)
    mel_real = mel_fn(real)
    fake = 0.3 * torch.randn(2, frames * HOP, generator=g)
    other = fake.clone()
    other[1, 1000:] += 0.5  # a different prediction on the padding only

    def terms(wav, samples):
        return {**generator_losses(disc, mel_fn, real, wav, mel_real, samples),
                **discriminator_losses(disc, real, wav, samples)}

    with_mask, without = (terms(fake, valid), terms(other, valid)), (terms(fake, None), terms(other, None))
    for key in ("mel/l1", "adv/gen", "adv/feat", "adv/disc"):
        assert torch.equal(with_mask[0][key], with_mask[1][key]), key
        assert not torch.allclose(without[0][key], without[1][key]), key
    # Clips with no padding: exactly the unmasked losses.
    full = torch.full((2,), frames * HOP)
    plain, masked = terms(fake, None), terms(fake, full)
    for key in plain:
        assert torch.equal(plain[key], masked[key]), key
    assert torch.equal(mel_l1_loss(mel_fn, fake, mel_real, torch.ones(2, frames, dtype=torch.bool)),
                       mel_l1_loss(mel_fn, fake, mel_real))


def _lfm(velocity, x1, frame_mask, seed=0):
    ctx, mask = torch.randn(x1.shape[0], 3, 8), torch.ones(x1.shape[0], 3, dtype=torch.bool)
    loss, _ = lfm_loss(velocity, x1, ctx, mask, path=OTPath(), null_context=ctx[:1], null_mask=mask[:1],
                       cond_dropout=0.3, generator=torch.Generator().manual_seed(seed), frame_mask=frame_mask)
    return loss


def test_lfm_loss_averages_over_the_real_latent_frames_only():
    torch.manual_seed(0)
    x1 = torch.randn(3, 4, 8, 4)  # (B, C, T', F')
    frame_mask = valid_mask(torch.tensor([8, 5, 2]), 8)  # (B, T')
    pad = ~frame_mask[:, None, :, None]  # (B, 1, T', 1)

    def velocity(x, t, context, context_mask, bump=0.0):
        return 0.5 * x + bump * pad

    def bumped(x, t, context, context_mask):
        return velocity(x, t, context, context_mask, bump=3.0)

    assert torch.equal(_lfm(velocity, x1, frame_mask), _lfm(bumped, x1, frame_mask))
    assert not torch.allclose(_lfm(velocity, x1, None), _lfm(bumped, x1, None))
    # No padding: exactly today's loss.
    assert torch.equal(_lfm(velocity, x1, torch.ones(3, 8, dtype=torch.bool)), _lfm(velocity, x1, None))
    # The masked loss is the mean squared error over the real frames.
    x0 = torch.randn(x1.shape)
    t = torch.rand(3)
    err = flow_matching_loss(velocity, x1, OTPath(), t=t, x0=x0, reduction="none", context=None, context_mask=None)
    torch.testing.assert_close(masked_mean(err, ~pad), err[(~pad).expand_as(err)].mean())


# --------------------------------------------------------------------------- the done-criterion


def _structured_mels(b: int, n_mels: int, t: int, real: int) -> torch.Tensor:
    """(B, n_mels, T) smooth log-mel-like patterns in [-9, -3] on the first ``real`` frames, the
    log floor of zero padding after them."""
    g = torch.Generator().manual_seed(0)
    f = torch.arange(n_mels, dtype=torch.float32)[None, :, None]
    k = torch.arange(t, dtype=torch.float32)[None, None, :]
    phase = 6.28 * torch.rand(b, 1, 1, generator=g)
    rate = 0.2 + 0.4 * torch.rand(b, 1, 1, generator=g)
    mel = -6 + 3 * torch.sin(rate * k + phase) * torch.cos(0.4 * f + phase)
    mel[:, :, real:] = FLOOR
    return mel


def _frame_errors(err: Tensor, mask: Tensor) -> tuple[float, float]:
    """Mean of ``err`` over the real frames and over the padded frames (``mask`` broadcast)."""
    mask = mask.expand_as(err)
    return err[mask].mean().item(), err[~mask].mean().item()


def _train_vae(mel: Tensor, mask: Tensor, masked: bool, steps: int = 40) -> tuple[tuple[float, float], ...]:
    torch.manual_seed(0)
    vae = MelVAE(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, mid_attention=False)
    loss = VAELoss(kl_weight=1e-6)
    opt = torch.optim.Adam([*vae.parameters(), *loss.parameters()], lr=3e-3)
    g = torch.Generator().manual_seed(1)

    def errors() -> tuple[float, float]:
        with torch.no_grad():
            recon, _ = vae(mel, sample=False)
        return _frame_errors((recon - mel).abs(), mask[:, None, :])

    before = errors()
    for step in range(steps):
        recon, posterior = vae(mel, generator=g)
        terms = loss.generator_losses(mel, recon, posterior, None, step, mask=mask if masked else None)
        opt.zero_grad()
        (terms["rec/nll"] + loss.kl_weight * terms["kl"]).backward()
        opt.step()
    return before, errors()


def _train_unet(x1: Tensor, mask: Tensor, masked: bool, steps: int = 60) -> tuple[tuple[float, float], ...]:
    torch.manual_seed(0)
    cfg = load_pipeline_config(CONFIG)
    unet = build_unet(cfg)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    ctx = torch.randn(x1.shape[0], 3, cfg.context_dim, generator=torch.Generator().manual_seed(2))
    ctx_mask = torch.ones(x1.shape[0], 3, dtype=torch.bool)
    g = torch.Generator().manual_seed(1)

    def errors() -> tuple[float, float]:
        # The squared velocity error at 8 fixed times with fixed noise, per element.
        with torch.no_grad():
            g_eval = torch.Generator().manual_seed(123)
            err = torch.stack([
                flow_matching_loss(unet, x1, OTPath(), t=torch.full((x1.shape[0],), (k + 0.5) / 8), generator=g_eval,
                                   reduction="none", context=ctx, context_mask=ctx_mask) for k in range(8)]).mean(0)
        return _frame_errors(err, mask[:, None, :, None])

    before = errors()
    for _ in range(steps):
        loss, _ = lfm_loss(unet, x1, ctx, ctx_mask, path=OTPath(), null_context=ctx[:1], null_mask=ctx_mask[:1],
                           cond_dropout=0.0, generator=g, frame_mask=mask if masked else None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, errors()


@pytest.mark.slow
def test_a_vae_trained_on_padded_clips_learns_the_padding_only_without_the_mask():
    b, t, real = 4, 32, 16  # every clip padded: half its frames are real
    mel = _structured_mels(b, 16, t, real)  # (B, n_mels, T)
    mask = valid_mask(valid_frames(torch.full((b,), real * HOP), HOP, t), t)  # (B, T)
    (valid0, pad0), (valid_off, pad_off) = _train_vae(mel, mask, masked=False)
    _, (valid_on, pad_on) = _train_vae(mel, mask, masked=True)
    # Measured (L1 on real / padded frames): init 5.88 / 11.47; no mask 1.15 / 1.03; mask 0.79 / 13.08.
    print(f"VAE L1 real/padded: init {valid0:.3f}/{pad0:.3f}, no mask {valid_off:.3f}/{pad_off:.3f}, "
          f"mask {valid_on:.3f}/{pad_on:.3f}")
    assert valid_off < 0.4 * valid0 and valid_on < 0.4 * valid0  # both learn the real frames
    assert pad_off < 0.25 * pad0  # without the mask it has learned to draw the padding
    assert pad_on > 0.5 * pad0 and pad_on > 4 * pad_off  # with it, it has not


@pytest.mark.slow
def test_a_flow_model_trained_on_padded_latents_learns_the_padding_only_without_the_mask():
    b, c, t, f = 4, 8, 16, 8  # (B, C, T', F'); every latent padded: half its frames are real
    # Smooth latents of four clips (each with its own caption), then the padding's latent: one
    # value, the same in every clip, as the VAE encodes the log floor.
    channel, k, freq = (torch.arange(n, dtype=torch.float32) for n in (c, t, f))
    phase = 6.28 * torch.rand(b, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    x1 = torch.sin(0.5 * k[:, None] + phase + channel[:, None, None]) * torch.cos(0.6 * freq + phase)  # (B, C, T', F')
    x1[:, :, t // 2 :] = 1.0
    mask = valid_mask(torch.full((b,), t // 2), t)  # (B, T')
    (valid0, pad0), (valid_off, pad_off) = _train_unet(x1, mask, masked=False)
    _, (valid_on, pad_on) = _train_unet(x1, mask, masked=True)
    # Measured (velocity MSE on real / padded frames): init 1.26 / 2.01; no mask 0.59 / 0.50;
    # mask 0.39 / 1.69.
    print(f"LFM MSE real/padded: init {valid0:.3f}/{pad0:.3f}, no mask {valid_off:.3f}/{pad_off:.3f}, "
          f"mask {valid_on:.3f}/{pad_on:.3f}")
    assert valid_off < 0.7 * valid0 and valid_on < 0.7 * valid0  # both learn the real frames
    assert pad_off < 0.35 * pad0  # without the mask it has learned the padding's velocity
    assert pad_on > 0.7 * pad0 and pad_on > 2.5 * pad_off  # with it, it has not


# --------------------------------------------------------------------------- the latents stage


def test_the_latents_stage_writes_each_clips_real_latent_frames(tmp_path):
    from pipelines.core import storage
    from pipelines.core.stage import arrow_table
    from pipelines.stages.audio import SCHEMA as AUDIO_SCHEMA
    from pipelines.stages.text import caption_key
    from pipelines.stages.train import LATENT_SCHEMA, EncodeLatents
    from pipelines.train.weights import export_weights

    cfg = load_pipeline_config(CONFIG)
    t, n_mels = cfg.mel_shape()
    torch.manual_seed(0)
    export_weights(build_vae(cfg).state_dict(), cfg, str(tmp_path / "vae"), "vae")
    emb = np.zeros(4 * cfg.context_dim, np.float32)
    storage.write_parquet(str(tmp_path / "text" / "shard-00000.parquet"),
                          pa.table({"caption_key": [caption_key("a dog")], "caption": ["a dog"], "emb": [emb],
                                    "length": [4]}))
    valid = [cfg.clip_samples, 10 * HOP + 1]  # a full clip, and one of 11 mel frames -> 3 latent frames
    clips = [{"id": f"c{i}", "source_id": f"c{i}", "segment": 0, "audio_uri": "", "caption": "a dog",
              "captions": ["a dog"], "split": "train", "attributes": "", "valid_samples": v,
              "waveform": np.zeros(cfg.clip_samples, np.float32), "mel": np.full(n_mels * t, FLOOR, np.float32),
              "n_mels": n_mels, "frames": t} for i, v in enumerate(valid)]

    audio = str(tmp_path / "audio" / "shard-00000.parquet")
    storage.write_parquet(audio, arrow_table(clips, AUDIO_SCHEMA))
    encode = EncodeLatents(to_dict(cfg), str(tmp_path / "vae" / "vae.safetensors"), str(tmp_path / "text"),
                           str(tmp_path / "latents"))
    encode(pa.table({"shard": [0], "rows": [[{"file": audio}]]}))
    out = storage.read_parquet_file(str(tmp_path / "latents" / "shard-00000.parquet"))
    assert out.schema == LATENT_SCHEMA
    assert out.column("valid_frames").to_pylist() == [cfg.latent_shape()[1], 3]
