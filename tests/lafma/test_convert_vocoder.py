"""Published HiFi-GAN vocoders import sample for sample; transformers' SpeechT5HifiGan is the oracle."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

from lafma.config import HiFiGANConfig
from lafma.convert.checkpoint import CheckpointError
from lafma.convert.vocoder import convert_hifigan, convert_speecht5_hifigan, convert_vocoder
from lafma.vocoder.hifigan import HiFiGANGenerator

TOL = 1e-5
FRAMES = 24


def oracle(n_mels: int = 16, rates=(5, 4, 2, 2, 2), kernels=(16, 16, 8, 4, 4), dilations=((1, 3, 5),) * 3,
           normalize_before: bool = False) -> SpeechT5HifiGan:
    """A small published-architecture vocoder with weights loud enough that nothing is ~0."""
    torch.manual_seed(0)
    cfg = SpeechT5HifiGanConfig(model_in_dim=n_mels, upsample_initial_channel=32, upsample_rates=list(rates),
                                upsample_kernel_sizes=list(kernels), resblock_dilation_sizes=[list(d) for d in dilations],
                                normalize_before=normalize_before)
    model = SpeechT5HifiGan(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
                m.reset_parameters()  # PyTorch's init instead of N(0, 0.01), biases non-zero
                m.bias.add_(0.1 * torch.randn_like(m.bias))
        if normalize_before:
            model.mean.copy_(torch.randn(n_mels))
            model.scale.copy_(0.5 + torch.rand(n_mels))
    return model


def reference_wave(model: SpeechT5HifiGan, mel: torch.Tensor) -> torch.Tensor:
    """mel: (B, n_mels, T) → (B, T * hop), the oracle's output with its overshoot cropped."""
    with torch.no_grad():
        wav = model(mel.transpose(1, 2))  # takes (B, T, n_mels)
    hop = math.prod(model.config.upsample_rates)
    return wav[:, :mel.shape[-1] * hop]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape
    return ((out - ref).abs().max() / ref.abs().max()).item()


def mel_for(model: SpeechT5HifiGan, frames: int = FRAMES) -> torch.Tensor:
    return torch.randn(2, model.config.model_in_dim, frames, generator=torch.Generator().manual_seed(1))


def published_state(model: SpeechT5HifiGan, plain: bool = False) -> dict[str, torch.Tensor]:
    """The oracle's weights in the reference training code's key layout (old weight norm)."""
    sd = {}
    for key, value in model.state_dict().items():
        if key in ("mean", "scale"):
            continue
        key = key.replace("upsampler.", "ups.")
        if key.endswith(".weight") and not plain:
            base = key[:-len(".weight")]
            # dim=0 weight norm; v at another scale than w, so a converter ignoring g fails.
            sd[base + ".weight_g"] = torch.linalg.vector_norm(value, dim=(1, 2), keepdim=True)
            sd[base + ".weight_v"] = 2.5 * value
        else:
            sd[key] = value.clone()
    # torch.compile leaves _orig_mod. in some published keys.
    return {("_orig_mod." + k if k.startswith(("ups.", "resblocks.1.")) else k): v for k, v in sd.items()}


def published_json(model: SpeechT5HifiGan, **override) -> dict:
    c = model.config
    cfg = {"resblock": "1", "num_gpus": 0, "batch_size": 16, "learning_rate": 2e-4, "adam_b1": 0.8,
           "adam_b2": 0.99, "lr_decay": 0.999, "seed": 1234, "upsample_rates": list(c.upsample_rates),
           "upsample_kernel_sizes": list(c.upsample_kernel_sizes),
           "upsample_initial_channel": c.upsample_initial_channel,
           "resblock_kernel_sizes": list(c.resblock_kernel_sizes),
           "resblock_dilation_sizes": [list(d) for d in c.resblock_dilation_sizes], "segment_size": 8192,
           "num_mels": c.model_in_dim, "num_freq": 513, "n_fft": 1024, "hop_size": math.prod(c.upsample_rates),
           "win_size": 1024, "sampling_rate": 16000, "fmin": 0, "fmax": 8000, "fmax_for_loss": None,
           "num_workers": 4, "dist_config": {"dist_backend": "nccl", "dist_url": "tcp://localhost:54321",
                                             "world_size": 1}}
    return {**cfg, **override}


def write_published(tmp_path, model, name="hifigan_16k_64bins", with_json=True, plain=False, **json_override):
    ckpt = tmp_path / f"{name}.ckpt"
    torch.save({"generator": published_state(model, plain)}, ckpt)
    if with_json:
        (tmp_path / f"{name}.json").write_text(json.dumps(published_json(model, **json_override)))
    return str(ckpt)


@pytest.mark.parametrize("plain", [False, True], ids=["weight_g_v", "weight_norm_removed"])
def test_published_checkpoint_reproduces_the_reference(tmp_path, plain):
    model = oracle()
    mel = mel_for(model)
    ref = reference_wave(model, mel)
    converted = convert_hifigan(write_published(tmp_path, model, plain=plain))  # finds the .json beside it
    gen = converted.generator()
    with torch.no_grad():
        out = gen(mel)
        assert rel_err(out, ref) <= TOL
        assert rel_err(gen.remove_weight_norm()(mel), ref) <= TOL
    assert converted.config["upsample_padding"] == "reference"
    assert HiFiGANConfig(**converted.config).upsample_rates == (5, 4, 2, 2, 2)
    assert converted.mel == {"sample_rate": 16000, "n_fft": 1024, "win_length": 1024, "hop_length": 160,
                             "n_mels": 16, "f_min": 0, "f_max": 8000}


def test_explicit_json_with_other_rates(tmp_path):
    model = oracle(rates=(4, 4), kernels=(8, 7), dilations=((1, 3), (2, 4), (1, 1)))
    mel = mel_for(model)
    ckpt = write_published(tmp_path, model, name="g_00100000", with_json=False)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(published_json(model)))
    converted = convert_vocoder(ckpt, str(cfg))
    assert converted.config["resblock_dilation_sizes"] == ((1, 3), (2, 4), (1, 1))
    with torch.no_grad():
        assert rel_err(converted.generator()(mel), reference_wave(model, mel)) <= TOL


@pytest.mark.parametrize("normalize_before", [False, True])
def test_speecht5_directory_reproduces_the_reference(tmp_path, normalize_before):
    model = oracle(normalize_before=normalize_before)
    model.save_pretrained(tmp_path)
    mel = mel_for(model, frames=64)
    ref = reference_wave(model, mel)
    converted = convert_vocoder(str(tmp_path))
    assert converted.source == "speecht5_hifigan"
    assert converted.mel == {"n_mels": 16, "sample_rate": 16000}
    with torch.no_grad():
        out = converted.generator()(mel)
    if normalize_before:
        # conv_pre zero-pads the raw mel where the source padded the normalised one: exact only
        # where its 7 taps lie inside the input; the difference spreads over the generator's
        # receptive field (about 13 frames here).
        edge = 16 * 160
        assert rel_err(out[:, edge:-edge], ref[:, edge:-edge]) <= TOL
        assert rel_err(out, ref) > TOL  # the edge effect is real, not hidden by the crop above
    else:
        assert rel_err(out, ref) <= TOL


def test_speecht5_other_leaky_relu_slope_is_refused(tmp_path):
    model = oracle()
    model.config.leaky_relu_slope = 0.2
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="leaky_relu_slope"):
        convert_speecht5_hifigan(str(tmp_path))


def test_16k_shapes_need_no_json(tmp_path):
    model = oracle(n_mels=64)
    mel = mel_for(model)
    converted = convert_hifigan(write_published(tmp_path, model, with_json=False))
    assert converted.n_mels == 64 and converted.mel == {"n_mels": 64}
    assert {k: converted.config[k] for k in ("upsample_rates", "resblock_dilation_sizes")} == {
        "upsample_rates": (5, 4, 2, 2, 2), "resblock_dilation_sizes": ((1, 3, 5),) * 3}
    with torch.no_grad():
        assert rel_err(converted.generator()(mel), reference_wave(model, mel)) <= TOL


def test_other_kernels_without_json_ask_for_the_config(tmp_path):
    model = oracle(rates=(4, 4), kernels=(8, 8))
    with pytest.raises(CheckpointError, match="--vocoder-config"):
        convert_hifigan(write_published(tmp_path, model, with_json=False))


def test_config_of_another_checkpoint_is_refused(tmp_path):
    model = oracle()
    with pytest.raises(CheckpointError, match="upsample_kernel_sizes"):
        convert_hifigan(write_published(tmp_path, model, upsample_kernel_sizes=[16, 16, 8, 4, 8]))


def test_resblock2_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="ResBlock2"):
        convert_hifigan(write_published(tmp_path, oracle(), resblock="2"))


def test_leftover_and_missing_keys_are_listed(tmp_path):
    sd = published_state(oracle())
    sd["resblocks.0.extra.weight_g"] = torch.ones(1)
    del sd["conv_post.bias"]
    path = tmp_path / "g.ckpt"
    torch.save({"generator": sd}, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys: resblocks\.0\.extra.*missing keys: conv_post\.bias"):
        convert_hifigan(str(path))


class Pickled:
    """Not a tensor or container: torch.load(weights_only=True) must not rebuild it."""


def test_checkpoint_needing_arbitrary_pickle_is_refused(tmp_path):
    path = tmp_path / "g.ckpt"
    torch.save({"generator": published_state(oracle()), "cfg": Pickled()}, path)
    with pytest.raises(CheckpointError, match="arbitrary pickle.*weights_only"):
        convert_hifigan(str(path))


@pytest.mark.parametrize("frames", [1, 7])
def test_reference_padding_is_not_exact_padding(tmp_path, frames):
    model = oracle()
    mel = mel_for(model, frames)
    ref = reference_wave(model, mel)
    converted = convert_hifigan(write_published(tmp_path, model))
    exact = HiFiGANGenerator(**{**converted.config, "upsample_padding": "exact"}, n_mels=converted.n_mels)
    exact.load_state_dict(converted.state_dict)  # same keys and shapes, other function
    with torch.no_grad():
        out_ref, out_exact = converted.generator()(mel), exact.eval()(mel)
    assert out_ref.shape == out_exact.shape == (2, frames * 160)
    assert rel_err(out_ref, ref) <= TOL
    # The exact padding shifts the odd stage by a sample: the reference waveform is lost.
    assert rel_err(out_exact, ref) > 1e-2


def test_paddings_agree_when_every_kernel_minus_rate_is_even():
    torch.manual_seed(0)
    kw = dict(upsample_rates=(4, 2), upsample_kernel_sizes=(8, 4), upsample_initial_channel=16, n_mels=8)
    exact, ref = HiFiGANGenerator(**kw).eval(), HiFiGANGenerator(**kw, upsample_padding="reference").eval()
    ref.load_state_dict(exact.state_dict())
    mel = torch.randn(1, 8, 5)
    torch.testing.assert_close(ref(mel), exact(mel))
    with pytest.raises(ValueError, match="upsample_padding"):
        HiFiGANGenerator(**kw, upsample_padding="same")
