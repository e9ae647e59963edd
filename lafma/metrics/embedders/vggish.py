"""VGGish (Hershey et al., 2017) from user-supplied torchvggish checkpoints: FAD as AudioLDM reports it.

Files, in the layout torchvggish publishes:

* ``vggish-10086976.pth``: a state dict with ``features.{0,3,6,8,11,13}.{weight,bias}`` (six
  3×3 convs of a VGG stack) and ``embeddings.{0,2,4}.{weight,bias}`` (12288 → 4096 → 4096 → 128);
* ``vggish_pca_params-970ea276.pth`` (optional): ``pca_eigen_vectors`` (128, 128) and
  ``pca_means`` (128,), for the PCA + whitening + 8-bit quantisation of AudioSet's release.

Front end, from the VGGish reference description: 16 kHz, 25 ms periodic-Hann frames every
10 ms (no padding), |rfft| at 512 points, 64 HTK-mel bands over 125–7500 Hz with triangles
in mel space and the DC bin dropped, ``log(mel + 0.01)``, then non-overlapping 0.96 s
examples of 96 frames. One 128-d embedding per example.

audioldm_eval's FAD uses the raw 128-d output *without* the final ReLU and without PCA, and
pools every example of every clip into the Gaussian: those are the defaults here
(``fd_unit = "frame"``).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from lafma.metrics.embedders.base import AudioEmbedder
from lafma.metrics.embedders.checkpoints import (
    CheckpointFormatError,
    check_state_dict,
    load_checked,
    load_torch_file,
    require_file,
    sha256_file,
)

SAMPLE_RATE = 16000
_WIN, _HOP, _N_FFT = 400, 160, 512  # 25 ms, 10 ms, next power of two
_N_MELS, _FMIN, _FMAX = 64, 125.0, 7500.0
_LOG_OFFSET = 0.01
_EXAMPLE = 96  # frames per example: 0.96 s
_QUANT_MIN, _QUANT_MAX = -2.0, 2.0  # AudioSet's 8-bit quantisation range after PCA


def _hz_to_mel(f: Tensor) -> Tensor:
    return 1127.0 * torch.log1p(f / 700.0)  # the HTK formula VGGish uses


def vggish_mel_matrix() -> Tensor:
    """(257, 64) weights: triangles with mel-spaced edges, interpolated in mel (not Hz)."""
    bins = _N_FFT // 2 + 1
    spec_mel = _hz_to_mel(torch.linspace(0.0, SAMPLE_RATE / 2, bins, dtype=torch.float64))
    edges = torch.linspace(float(_hz_to_mel(torch.tensor(_FMIN))), float(_hz_to_mel(torch.tensor(_FMAX))),
                           _N_MELS + 2, dtype=torch.float64)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (spec_mel[:, None] - lower) / (centre - lower)
    falling = (upper - spec_mel[:, None]) / (upper - centre)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    weights[0] = 0.0  # the DC bin carries no band energy in the reference front end
    return weights.float()


class VGGishNet(nn.Module):
    """The VGG stack and its three fully connected layers; ``final_relu`` keeps the last ReLU."""

    def __init__(self, final_relu: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
                c_in = v
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Linear(512 * 6 * 4, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                                 nn.Linear(4096, 128)]
        self.embeddings = nn.Sequential(*head, *([nn.ReLU()] if final_relu else []))

    def forward(self, examples: Tensor) -> Tensor:
        """examples: (E, 96, 64) log-mel → (E, 128)."""
        x = self.features(examples.unsqueeze(1))  # (E, 512, 6, 4)
        # The weights were converted from TensorFlow, which flattens channels-last.
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # (E, 6*4*512)
        return self.embeddings(x)


class VGGishEmbedder(AudioEmbedder):
    """VGGish from torchvggish-format files as an :class:`AudioEmbedder` (no classifier).

    Args:
        checkpoint: ``vggish-10086976.pth``-style state dict.
        pca_params: optional ``vggish_pca_params-970ea276.pth``; when given, embeddings are
            PCA-whitened and quantised to [0, 255] as in AudioSet's released features.
        final_relu: keep the ReLU after the last layer (torchvggish's default); audioldm_eval
            drops it for FAD, so the default here is False.
    """

    sample_rate = SAMPLE_RATE
    dim = 128
    fd_unit = "frame"

    def __init__(self, checkpoint: str | os.PathLike, pca_params: str | os.PathLike | None = None,
                 final_relu: bool = False):
        super().__init__()
        path = require_file(checkpoint, "VGGish")
        state = load_torch_file(path)
        if not isinstance(state, dict):
            raise CheckpointFormatError(path, "torchvggish", detail=f"file holds a {type(state).__name__}")
        with torch.device("meta"):  # every tensor comes from the file
            self.net = VGGishNet(final_relu)
        load_checked(self.net, state, path, "torchvggish VGGish")
        self.net.eval().requires_grad_(False)
        self.register_buffer("mel_fb", vggish_mel_matrix(), persistent=False)
        self.register_buffer("window", torch.hann_window(_WIN, periodic=True), persistent=False)
        self.weights_sha256 = sha256_file(path)
        self.pca_sha256 = ""
        self.name = "vggish" + ("-relu" if final_relu else "")
        self.register_buffer("pca_matrix", None)  # set by _load_pca
        self.register_buffer("pca_means", None)
        if pca_params is not None:
            self._load_pca(require_file(pca_params, "VGGish PCA parameters"))
            self.name += "-pca"

    def _load_pca(self, path: os.PathLike) -> None:
        params = load_torch_file(path)
        if not isinstance(params, dict):
            raise CheckpointFormatError(path, "torchvggish PCA parameters", detail="not a dict")
        means = params.get("pca_means")
        if means is not None:  # published as (128,) or (128, 1)
            params = {**params, "pca_means": torch.as_tensor(means).reshape(-1)}
        check_state_dict(params, {"pca_eigen_vectors": (128, 128), "pca_means": (128,)}, path,
                         "torchvggish PCA parameters")
        self.pca_matrix = torch.as_tensor(params["pca_eigen_vectors"]).float()
        self.pca_means = torch.as_tensor(params["pca_means"]).float()
        self.pca_sha256 = sha256_file(path)

    def log_mel(self, wave: Tensor) -> Tensor:
        """wave: (B, N) at 16 kHz → (B, T, 64), T = 1 + (N - 400) // 160."""
        frames = wave.unfold(-1, _WIN, _HOP) * self.window  # (B, T, 400)
        mag = torch.fft.rfft(frames, n=_N_FFT).abs()  # (B, T, 257)
        return torch.log(mag @ self.mel_fb + _LOG_OFFSET)

    def examples(self, wave: Tensor, sample_rate: int | None = None) -> Tensor:
        """Non-overlapping 0.96 s log-mel examples (B, E, 96, 64); a partial one is dropped."""
        x = self.prepare(wave, sample_rate)
        min_samples = _WIN + (_EXAMPLE - 1) * _HOP
        if x.shape[1] < min_samples:
            raise ValueError(f"{self.name}: clips need >= {min_samples} samples (0.96 s) at 16 kHz, "
                             f"got {x.shape[1]}")
        return self.log_mel(x).unfold(1, _EXAMPLE, _EXAMPLE).transpose(2, 3)  # (B, E, 64, 96) -> (B, E, 96, 64)

    @torch.no_grad()
    def frame_embeddings(self, wave: Tensor, sample_rate: int | None = None) -> Tensor:
        """One 128-d embedding per 0.96 s example: (B, E, 128)."""
        ex = self.examples(wave, sample_rate)
        b, e = ex.shape[:2]
        emb = self.net(ex.reshape(b * e, _EXAMPLE, _N_MELS))  # (B*E, 128)
        if self.pca_matrix is not None:
            emb = (emb - self.pca_means) @ self.pca_matrix.T
            scale = 255.0 / (_QUANT_MAX - _QUANT_MIN)
            emb = torch.round((emb.clamp(_QUANT_MIN, _QUANT_MAX) - _QUANT_MIN) * scale)
        return emb.view(b, e, -1)

    def describe(self) -> dict[str, str | int]:
        return {**super().describe(), **({"embedder_pca_sha256": self.pca_sha256} if self.pca_sha256 else {})}

