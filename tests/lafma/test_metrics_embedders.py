"""Literature embedders load files in their published layouts.

The checkpoints here are built by the tests, key by key from the published layouts, with
random weights: they check the format and the plumbing (strict loading, shapes, resampling,
errors), not the numbers, which need the real reference weights.
"""

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lafma.metrics.embedders import (
    AisfxEmbedder,
    CheckpointFormatError,
    ClapModel,
    PannsCnn14Embedder,
    VGGishEmbedder,
    build_embedder,
)
from lafma.metrics.embedders.panns import PRESETS, Cnn14
from lafma.metrics.embedders.vggish import vggish_mel_matrix

# Every test here runs with one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _random(shape, g: torch.Generator, scale: float) -> torch.Tensor:
    """Random values, cheaply: a 1 M-value random block tiled to the shape (one pass over memory)."""
    n = math.prod(shape)
    base = torch.randn(min(n, 1 << 20), generator=g).mul_(scale)
    out = torch.empty(n)
    full = n // base.numel()
    out[: full * base.numel()].view(full, -1).copy_(base)  # broadcast the block over every row
    out[full * base.numel():] = base[: n - full * base.numel()]
    return out.view(shape)


def _same_value(shape) -> torch.Tensor:
    """A tensor of the right shape stored as one number (stride 0): layout tests without 300 MB."""
    return torch.zeros(()).expand(shape) if shape else torch.zeros(())


def _bn(prefix: str, c: int) -> dict:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def cnn14_16k_layout() -> dict[str, tuple]:
    """Keys and shapes of ``Cnn14_16k_mAP=0.438.pth["model"]`` (as listed in audioset_tagging_cnn#18)."""
    layout = {"spectrogram_extractor.stft.conv_real.weight": (257, 1, 512),
              "spectrogram_extractor.stft.conv_imag.weight": (257, 1, 512),
              "logmel_extractor.melW": (257, 64), **_bn("bn0", 64)}
    chans = [1, 64, 128, 256, 512, 1024, 2048]
    for i in range(6):
        c_in, c_out = chans[i], chans[i + 1]
        layout |= {f"conv_block{i + 1}.conv1.weight": (c_out, c_in, 3, 3),
                   f"conv_block{i + 1}.conv2.weight": (c_out, c_out, 3, 3),
                   **_bn(f"conv_block{i + 1}.bn1", c_out), **_bn(f"conv_block{i + 1}.bn2", c_out)}
    return layout | {"fc1.weight": (2048, 2048), "fc1.bias": (2048,),
                     "fc_audioset.weight": (527, 2048), "fc_audioset.bias": (527,)}


def vggish_layout() -> dict[str, tuple]:
    """Keys and shapes of torchvggish's ``vggish-10086976.pth``."""
    convs = {0: (64, 1), 3: (128, 64), 6: (256, 128), 8: (256, 256), 11: (512, 256), 13: (512, 512)}
    layout = {}
    for i, (c_out, c_in) in convs.items():
        layout |= {f"features.{i}.weight": (c_out, c_in, 3, 3), f"features.{i}.bias": (c_out,)}
    for i, (n_out, n_in) in {0: (4096, 12288), 2: (4096, 4096), 4: (128, 4096)}.items():
        layout |= {f"embeddings.{i}.weight": (n_out, n_in), f"embeddings.{i}.bias": (n_out,)}
    return layout


def _random_state(layout: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(1000)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith(("running_mean", "bias")):
            state[k] = 0.1 * torch.randn(shape, generator=g)
        elif k.endswith("bn0.weight") or ".bn" in k:
            state[k] = torch.ones(shape)
        else:  # He-style scale keeps activations finite through the deep stack
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            state[k] = _random(shape, g, math.sqrt(2.0 / fan_in))
    return state


# ------------------------------------------------------------------ PANNs Cnn14


@pytest.fixture(scope="module")
def cnn14_file(big_dir):
    state = _random_state(cnn14_16k_layout(), seed=0)
    state["logmel_extractor.melW"] = state["logmel_extractor.melW"].abs()
    path = big_dir / "Cnn14_16k_mAP=0.438.pth"
    # The published file is a training checkpoint: numpy counters and sampler state beside the
    # model. weights_only=True alone refuses numpy; the loader allows numpy data (never code).
    sampler = {"random_state": np.random.RandomState(0).get_state(), "indexes": [np.arange(5)]}
    torch.save({"model": state, "iteration": np.int64(1000), "sampler": sampler}, path)
    return path


def test_cnn14_loads_the_published_layout_and_gives_2048_d_and_527_classes(cnn14_file):
    emb = PannsCnn14Embedder(cnn14_file)
    assert emb.name == "panns-cnn14-16k" and emb.sample_rate == 16000
    assert emb.weights_sha256 == hashlib.sha256(cnn14_file.read_bytes()).hexdigest()
    wave = 0.1 * torch.randn(2, 32000, generator=torch.Generator().manual_seed(1)) + 0.3  # with a DC offset
    e, logits = emb.embed_and_classify(wave)
    assert e.shape == (2, 2048) and logits.shape == (2, 527)
    assert torch.isfinite(e).all() and torch.isfinite(logits).all() and (e >= 0).all()  # fc1 ends in a ReLU
    assert emb.head_activation == "sigmoid" and emb.fd_unit == "clip"
    torch.testing.assert_close(emb.fd_features(wave), e)
    # audioldm_eval's reading: the DC offset is removed, and short clips are zero-padded to 2 s.
    torch.testing.assert_close(emb.embed(wave - 0.3), e, rtol=1e-4, atol=1e-4)
    short = wave[:1, :8000] - wave[:1, :8000].mean()
    padded = torch.nn.functional.pad(short, (0, 24000))
    torch.testing.assert_close(emb.embed(short), emb.embed(padded), rtol=1e-4, atol=1e-3)
    # Another rate is resampled to 16 kHz first.
    assert emb.embed(0.1 * torch.randn(1, 12000), sample_rate=32000).shape == (1, 2048)
    assert build_embedder("panns_cnn14_16k", cnn14_file).name == "panns-cnn14-16k"


def test_cnn14_front_end_is_a_centred_power_stft():
    net = Cnn14(PRESETS["16k"])  # analytic front end, no checkpoint
    wave = torch.randn(2, 4000, generator=torch.Generator().manual_seed(2))
    ours = net.spectrogram_extractor(wave)[:, 0].transpose(1, 2)  # (B, bins, T)
    ref = torch.stft(wave, 512, 160, window=torch.hann_window(512), center=True, pad_mode="reflect",
                     return_complex=True).abs().pow(2)
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)


def test_cnn14_wrong_key_or_shape_is_named(tmp_path):
    layout = cnn14_16k_layout()
    state = {k: _same_value(s) for k, s in layout.items()}
    state["fc_1.weight"] = state.pop("fc1.weight")
    path = tmp_path / "renamed.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointFormatError, match="fc_1.weight") as err:
        PannsCnn14Embedder(path)
    assert err.value.missing == ["fc1.weight"] and err.value.unexpected == ["fc_1.weight"]
    assert not err.value.mismatched and str(path) in str(err.value)

    state = {k: _same_value(s) for k, s in layout.items()}
    state["fc_audioset.weight"] = _same_value((10, 2048))  # a 10-class fine-tuned head
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointFormatError, match=r"fc_audioset.weight: file \(10, 2048\)"):
        PannsCnn14Embedder(path)


# ------------------------------------------------------------------ VGGish


@pytest.fixture(scope="module")
def vggish_files(big_dir):
    path = big_dir / "vggish-10086976.pth"
    torch.save(_random_state(vggish_layout(), seed=3), path)
    rng = np.random.default_rng(4)
    pca = big_dir / "vggish_pca_params-970ea276.pth"
    q, _ = np.linalg.qr(rng.standard_normal((128, 128)))
    torch.save({"pca_eigen_vectors": q, "pca_means": rng.standard_normal((128, 1))}, pca)  # numpy, as converted
    return path, pca


def test_vggish_gives_128_d_per_0_96_s_frame(vggish_files):
    path, _ = vggish_files
    emb = VGGishEmbedder(path)
    assert emb.name == "vggish" and emb.fd_unit == "frame"
    assert emb.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    wave = 0.1 * torch.randn(3, 32000, generator=torch.Generator().manual_seed(5))  # 2 s: two full frames
    frames = emb.frame_embeddings(wave)
    assert frames.shape == (3, 2, 128) and torch.isfinite(frames).all()
    assert emb.fd_features(wave).shape == (6, 128)  # FAD pools every frame of every clip
    torch.testing.assert_close(emb.embed(wave), frames.mean(1))
    assert (frames < 0).any()  # audioldm_eval's FAD drops the last ReLU, so do we by default
    assert (VGGishEmbedder(path, final_relu=True).frame_embeddings(wave) >= 0).all()
    with pytest.raises(ValueError, match="0.96 s"):
        emb.embed(torch.zeros(1, 15000))
    with pytest.raises(NotImplementedError):
        emb.classify(wave)


def test_vggish_pca_whitening_and_quantisation(vggish_files):
    path, pca = vggish_files
    emb = VGGishEmbedder(path, pca_params=pca, final_relu=True)
    out = emb.frame_embeddings(0.1 * torch.randn(1, 16000, generator=torch.Generator().manual_seed(6)))
    assert emb.name == "vggish-relu-pca" and out.shape == (1, 1, 128)
    assert out.min() >= 0 and out.max() <= 255 and torch.equal(out, out.round())  # 8-bit codes
    assert emb.describe()["embedder_pca_sha256"] == hashlib.sha256(pca.read_bytes()).hexdigest()


def test_vggish_front_end_puts_a_tone_in_its_mel_band():
    mel = lambda f: 1127.0 * math.log1p(f / 700.0)  # noqa: E731 (HTK)
    edges = np.linspace(mel(125.0), mel(7500.0), 66)
    expected = int(np.argmin(np.abs(edges[1:-1] - mel(1000.0))))  # band whose centre is nearest 1 kHz
    fb = vggish_mel_matrix()
    assert fb.shape == (257, 64) and (fb[0] == 0).all()
    t = torch.arange(16000) / 16000
    frames = (torch.sin(2 * math.pi * 1000 * t)).unfold(0, 400, 160) * torch.hann_window(400)
    bands = torch.fft.rfft(frames, n=512).abs() @ fb
    assert (bands.argmax(dim=1) == expected).all()


def test_vggish_wrong_key_is_named(tmp_path):
    state = {k: _same_value(s) for k, s in vggish_layout().items()}
    del state["embeddings.4.bias"]
    state["embeddings.5.bias"] = _same_value((128,))
    path = tmp_path / "vggish.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointFormatError, match="embeddings.4.bias") as err:
        VGGishEmbedder(path)
    assert err.value.unexpected == ["embeddings.5.bias"]


# ------------------------------------------------------------------ LAION-CLAP: see test_metrics_clap.py


# ------------------------------------------------------------------ common


@pytest.mark.parametrize("make", [PannsCnn14Embedder, VGGishEmbedder, ClapModel, AisfxEmbedder],
                         ids=["cnn14", "vggish", "clap", "aisfx"])
def test_a_missing_checkpoint_names_its_path(make, tmp_path):
    path = tmp_path / "weights" / "not-downloaded.pth"
    with pytest.raises(FileNotFoundError, match=str(path)):
        make(path)


def test_a_pickled_object_is_refused_not_run(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "hook": Path("/etc/passwd")}, path)  # any non-data global
    with pytest.raises(Exception, match="Unsupported global|weights_only"):
        PannsCnn14Embedder(path)
