"""The offline default embedder: the sound-effects CNN whose weights ship in the ``aisfx`` wheel.

aisfx (Ma & Lerch, "Representation Learning for the Automatic Indexing of Sound Effects
Libraries", ISMIR 2022; weights CC BY 4.0) trains a 4-block VGG-style CNN (the DCASE
cross-task baseline "Cnn_9layers", max pooling) on sound-effects libraries, one classifier
head per library. Its 512-d embedding of a ~2.3 s log-mel block is what we call the
embedding; the network is rebuilt here in our own code and loads only from a safetensors
file that :func:`convert_aisfx` writes once from the wheel's pickle.

Front end, as aisfx's own librosa path computes it (its paper used Essentia with the same
parameters): peak-normalise the clip, 44.1 kHz, Hann STFT 2048 / hop 1024, power spectrum,
96 HTK-mel bands over 0–22 050 Hz each summing to one, ``log10(1e4 · x + 1)``, divided by
the training-set maximum. Blocks of 100 frames with a 50-frame hop; the clip embedding is
the mean of its block embeddings.

Numbers measured with it are this project's own scale (name ``aisfx-<version>``): nobody
else reports FD or KL with this network.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch
import torchaudio
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lafma.metrics.embedders.base import AudioEmbedder
from lafma.metrics.embedders.checkpoints import (
    CheckpointFormatError,
    load_checked,
    load_torch_file,
    require_file,
    sha256_file,
)

SAMPLE_RATE = 44100
_N_FFT, _HOP, _N_MELS = 2048, 1024, 96
# aisfx's "original" min-max normalisation: 0 and the largest log-mel value over all of its
# training sets, so inputs sit in [0, ~1] as they did in training.
_LOG_MEL_MAX = 9.457798957824707
_BLOCK, _BLOCK_HOP = 100, 50  # frames: ~2.3 s blocks at 50 % overlap, the paper's setting
_WIDTH = 64  # channels of the first block; doubles per block up to 512
_FORMAT = "lafma.aisfx/1"
_META_KEY = "lafma"
# The head whose classes are the Universal Category System categories of a mixed set of
# UCS-compliant libraries: the most general taxonomy among the nine heads.
DEFAULT_HEAD = "ucsMixed"


class _ConvBlock(nn.Module):
    """Two 3×3 conv + BN + ReLU, then max-pooling (none for the last block)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor, pool: bool) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return nn.functional.max_pool2d(x, 2) if pool else x


class _EmbeddingNet(nn.Module):
    def __init__(self, width: int = _WIDTH):
        super().__init__()
        chans = [1, width, 2 * width, 4 * width, 8 * width]
        for i in range(4):
            self.add_module(f"conv_block{i + 1}", _ConvBlock(chans[i], chans[i + 1]))

    def forward(self, spec: Tensor) -> Tensor:
        """spec: (B, T, n_mels) → (B, 8·width): mean over frequency, max over time."""
        x = spec.unsqueeze(1)  # (B, 1, T, F)
        for i in range(4):
            x = getattr(self, f"conv_block{i + 1}")(x, pool=i < 3)
        return x.mean(dim=3).amax(dim=2)  # (B, C, T', F') -> (B, C)


class AisfxNet(nn.Module):
    """The aisfx network: embedding CNN plus one 3-layer MLP head per training library.

    Parameter names equal those of the published checkpoint (``embedding_net.*``,
    ``fc.<i>.{0,2,4}.*``), so conversion is a change of file format only.

    Args:
        heads: ``[(library name, number of classes), …]`` in head-index order.
    """

    def __init__(self, heads: list[tuple[str, int]], width: int = _WIDTH):
        super().__init__()
        self.heads = [name for name, _ in heads]
        d = 8 * width
        self.embedding_net = _EmbeddingNet(width)
        self.fc = nn.ModuleList(
            nn.Sequential(nn.Linear(d, d // 2), nn.ReLU(), nn.Linear(d // 2, d // 4), nn.ReLU(),
                          nn.Linear(d // 4, k))
            for _, k in heads
        )

    def forward(self, spec: Tensor) -> Tensor:
        """spec: (B, T, 96) normalised log-mel → (B, 512)."""
        return self.embedding_net(spec)

    def head_logits(self, emb: Tensor, head: str) -> Tensor:
        """emb: (B, 512) → (B, K) logits of the named head (trained with cross-entropy)."""
        return self.fc[self.heads.index(head)](emb)


def _packaged_checkpoint() -> tuple[Path, str]:
    """Where the installed aisfx wheel keeps its pickle, and its version (aisfx is not imported)."""
    spec = importlib.util.find_spec("aisfx")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the aisfx package is not installed: pip install --no-deps aisfx")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "checkpoint.pth"
    return require_file(path, "aisfx"), importlib.metadata.version("aisfx")


def convert_aisfx(out_path: str | os.PathLike, source: str | os.PathLike | None = None,
                  version: str | None = None) -> Path:
    """Convert aisfx's pickled checkpoint to safetensors, once, at set-up.

    The pickle holds ``(state_dict, {library: (head index, classes)})`` with numpy integers;
    it is read with ``weights_only=True`` and numpy scalars allowed (no code can run), and its
    keys are checked against :class:`AisfxNet` before anything is written. The output is
    written atomically (temporary file, then rename).

    Args:
        out_path: the safetensors file to write.
        source: the pickle; default: the one inside the installed ``aisfx`` package.
        version: recorded in the output (and the embedder's name); default: the package's.

    Returns:
        ``out_path`` as a Path.
    """
    if source is None:
        source, pkg_version = _packaged_checkpoint()
        version = version or pkg_version
    source = require_file(source, "aisfx")
    loaded = load_torch_file(source)
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2 and isinstance(loaded[1], dict)):
        raise CheckpointFormatError(source, "aisfx", detail="expected a (state_dict, heads) pair")
    weights, ds_dict = loaded
    heads = sorted(((str(n), int(k)) for n, (_, k) in ds_dict.items()),
                   key=lambda h: int(ds_dict[h[0]][0]))
    net = AisfxNet(heads)
    load_checked(net, weights, source, "aisfx")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"format": _FORMAT, "aisfx_version": version or "unknown", "heads": heads,
            "source_sha256": sha256_file(source)}
    # One metadata entry holding sorted JSON: safetensors writes several entries in hash-map
    # order, which changes the file's bytes (and so its SHA-256) from one conversion to the next.
    metadata = {_META_KEY: json.dumps(info, sort_keys=True)}
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def ensure_aisfx_weights(directory: str | os.PathLike) -> Path:
    """``<directory>/aisfx-<version>.safetensors``, converting from the installed wheel if absent."""
    source, version = _packaged_checkpoint()
    out = Path(directory) / f"aisfx-{version}.safetensors"
    return out if out.is_file() else convert_aisfx(out, source, version)


class AisfxEmbedder(AudioEmbedder):
    """aisfx as an :class:`AudioEmbedder`: 512-d embeddings and softmax logits of one head.

    Args:
        weights: the safetensors file written by :func:`convert_aisfx`.
        head: which library's classifier :meth:`classify` uses (see ``heads``); the class
            names are not published with the weights, only their number.
    """

    sample_rate = SAMPLE_RATE
    dim = 8 * _WIDTH
    head_activation = "softmax"
    fd_unit = "clip"

    def __init__(self, weights: str | os.PathLike, head: str = DEFAULT_HEAD):
        super().__init__()
        path = require_file(weights, "aisfx (safetensors)")
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
        if meta.get("format") != _FORMAT:
            raise CheckpointFormatError(path, "lafma aisfx safetensors",
                                        detail=f"format {meta.get('format')!r}, expected {_FORMAT!r}; "
                                               "write it with convert_aisfx()")
        heads = [(str(n), int(k)) for n, k in meta["heads"]]
        self.net = AisfxNet(heads)
        load_checked(self.net, load_file(str(path)), path, "lafma aisfx safetensors")
        self.net.eval().requires_grad_(False)
        if head not in self.net.heads:
            raise ValueError(f"aisfx head {head!r} unknown; choose one of {self.net.heads}")
        self.head = head
        self.heads = dict(heads)
        self.num_classes = self.heads[head]
        self.name = f"aisfx-{meta['aisfx_version']}"
        self.weights_sha256 = sha256_file(path)
        fb = torchaudio.functional.melscale_fbanks(
            _N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, _N_MELS, SAMPLE_RATE, norm=None, mel_scale="htk")
        # librosa's norm=1 / Essentia's unit_sum: every band's weights sum to one.
        self.register_buffer("mel_fb", fb / fb.sum(dim=0, keepdim=True).clamp_min(1e-12), persistent=False)
        self.register_buffer("window", torch.hann_window(_N_FFT), persistent=False)

    def log_mel(self, wave: Tensor) -> Tensor:
        """wave: (B, N) at 44.1 kHz → normalised log-mel (B, T, 96), T = 1 + N // 1024."""
        peak = wave.abs().amax(dim=1, keepdim=True)
        wave = wave / torch.where(peak > 0, peak, torch.ones_like(peak))
        spec = torch.stft(wave, _N_FFT, _HOP, window=self.window, center=True, pad_mode="constant",
                          return_complex=True).abs().pow(2)  # (B, 1025, T)
        mel = spec.transpose(1, 2) @ self.mel_fb  # (B, T, 96)
        return torch.log10(1e4 * mel + 1) / _LOG_MEL_MAX

    def blocks(self, wave: Tensor, sample_rate: int | None = None) -> Tensor:
        """Log-mel blocks (B, n_blocks, 100, 96); a clip shorter than one block is zero-padded."""
        spec = self.log_mel(self.prepare(wave, sample_rate))
        if spec.shape[1] < _BLOCK:  # zeros are silence after log10(1e4 x + 1)
            spec = nn.functional.pad(spec, (0, 0, 0, _BLOCK - spec.shape[1]))
        # Partial trailing blocks are dropped, as aisfx does by default.
        return spec.unfold(1, _BLOCK, _BLOCK_HOP).transpose(2, 3)  # (B, nb, 96, 100) -> (B, nb, 100, 96)

    @torch.no_grad()
    def frame_embeddings(self, wave: Tensor, sample_rate: int | None = None) -> Tensor:
        """Block embeddings (B, n_blocks, 512)."""
        blocks = self.blocks(wave, sample_rate)
        b, nb = blocks.shape[:2]
        return self.net(blocks.reshape(b * nb, _BLOCK, _N_MELS)).view(b, nb, -1)

    @torch.no_grad()
    def classify(self, wave: Tensor, sample_rate: int | None = None) -> Tensor:
        """Log of the block-averaged softmax of the chosen head: (B, K) logits.

        Averaging probabilities (not logits) over blocks gives the clip's class distribution;
        its log is a valid logit vector for any softmax-based metric.
        """
        return self.embed_and_classify(wave, sample_rate)[1]

    @torch.no_grad()
    def embed_and_classify(self, wave: Tensor, sample_rate: int | None = None) -> tuple[Tensor, Tensor]:
        """One pass: clip embeddings (B, 512) and head logits (B, K)."""
        emb = self.frame_embeddings(wave, sample_rate)  # (B, nb, 512)
        probs = self.net.head_logits(emb, self.head).softmax(dim=-1).mean(dim=1)  # (B, K)
        return emb.mean(dim=1), probs.clamp_min(1e-30).log()
