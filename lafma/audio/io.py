"""Reading audio to float32 mono, and resampling.

soundfile does the decoding (torchaudio >= 2.9 routes its own load/save through torchcodec,
which we do not want as a dependency); torchaudio does the resampling.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch
import torchaudio

AudioSource = str | os.PathLike | bytes | BinaryIO


class AudioError(ValueError):
    """An input that cannot be used as audio. ``source`` names it, ``reason`` says why.

    ``reason`` is a short machine-friendly code (``missing``, ``empty``, ``undecodable``,
    ``no_samples``, ``non_finite``, ``bad_rate``, ``too_long``) so rejects tables can be grouped by it.
    """

    def __init__(self, source: str, reason: str, detail: str = ""):
        msg = f"{source}: {reason}" + (f" ({detail})" if detail else "")
        super().__init__(msg)
        self.source = source
        self.reason = reason
        self.detail = detail


def _name(source: AudioSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return getattr(source, "name", "<bytes>")


def read_audio(source: AudioSource, *, name: str | None = None,
               max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode any file soundfile reads (wav of any width, flac, ogg, …) to float32 mono.

    Channels are averaged; the sample rate is left as it is (see :func:`resample`).

    Args:
        source: a path, the file's bytes, or a binary file object.
        name: how to name the input in errors (defaults to the path).
        max_seconds: reject longer files from their header, before decoding them.

    Returns:
        ``(wav, sample_rate)`` with ``wav: (N,)`` float32.

    Raises:
        AudioError: missing, empty, undecodable, zero-length, too long or non-finite input.
    """
    label = _name(source, name)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise AudioError(label, "missing", "no such file")
        if path.is_dir():
            raise AudioError(label, "undecodable", "is a directory")
        if path.stat().st_size == 0:
            raise AudioError(label, "empty", "zero-byte file")
        handle: BinaryIO | str = str(path)
    elif isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise AudioError(label, "empty", "zero-byte input")
        handle = io.BytesIO(source)
    else:
        handle = source
    try:
        if max_seconds is not None:
            # The header says how long the file is; decoding a mislabelled multi-hour file
            # first (and resampling it) could exhaust a worker's memory.
            info = sf.info(handle)
            if isinstance(handle, io.BytesIO):
                handle.seek(0)
            if info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
                raise AudioError(label, "too_long", f"{info.frames / info.samplerate:.0f} s > {max_seconds:.0f} s")
        data, sr = sf.read(handle, dtype="float32", always_2d=True)  # (N, channels)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(label, "undecodable", str(e).splitlines()[0][:200]) from None
    if sr <= 0:
        raise AudioError(label, "bad_rate", f"sample rate {sr}")
    if data.shape[0] == 0:
        raise AudioError(label, "no_samples", "decoded to zero samples")
    wav = data.mean(axis=1, dtype=np.float32)  # (N, ch) -> (N,)
    if not np.isfinite(wav).all():
        raise AudioError(label, "non_finite", f"{int((~np.isfinite(wav)).sum())} NaN/Inf samples")
    return np.ascontiguousarray(wav), int(sr)


def resample(wav: np.ndarray | torch.Tensor, orig_sr: int, target_sr: int) -> torch.Tensor:
    """Band-limited resampling (torchaudio's windowed sinc). wav: (..., N) → (..., N')."""
    x = torch.as_tensor(wav, dtype=torch.float32)
    if orig_sr == target_sr:
        return x
    return torchaudio.functional.resample(x, orig_sr, target_sr)


def load_audio(source: AudioSource, sample_rate: int, *, name: str | None = None,
               max_seconds: float | None = None) -> torch.Tensor:
    """Read, downmix and resample: the one call most code wants. Returns (N,) float32."""
    wav, sr = read_audio(source, name=name, max_seconds=max_seconds)
    return resample(wav, sr, sample_rate)


def write_audio(path: str | os.PathLike, wav: np.ndarray | torch.Tensor, sample_rate: int) -> None:
    """Write (N,) float audio as 16-bit PCM wav, clipping to [-1, 1]."""
    x = torch.as_tensor(wav).detach().float().cpu().clamp(-1, 1).numpy()
    sf.write(os.fspath(path), x, sample_rate, subtype="PCM_16")


def fit_length(wav: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Crop or zero-pad the last dim to exactly ``num_samples``. wav: (..., N)."""
    n = wav.shape[-1]
    if n >= num_samples:
        return wav[..., :num_samples]
    return torch.nn.functional.pad(wav, (0, num_samples - n))
