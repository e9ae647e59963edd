"""Reading audio to float32 mono, and resampling.

soundfile does the decoding (torchaudio >= 2.9 routes its own load/save through torchcodec,
which we do not want as a dependency); torchaudio does the resampling.
"""

from __future__ import annotations

import io
import math
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
    ``no_samples``, ``non_finite``, ``bad_rate``, ``rate_too_high``, ``too_many_channels``,
    ``too_long``) so rejects tables can be grouped by it.
    """

    def __init__(self, source: str, reason: str, detail: str = ""):
        msg = f"{source}: {reason}" + (f" ({detail})" if detail else "")
        super().__init__(msg)
        self.source = source
        self.reason = reason
        self.detail = detail


# Decoded past what the caller asked for (read_audio's decode_seconds): a resampler's output
# near the end of a cut depends on the samples after it. torchaudio's sinc kernel spans at most
# one reduced-rate period plus a few zero crossings, under a second even for coprime rates.
DECODE_MARGIN_SECONDS = 1.0


def _name(source: AudioSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return getattr(source, "name", "<bytes>")


def _check_header(handle: BinaryIO | str, label: str, *, max_seconds: float | None, max_sample_rate: int | None,
                  max_channels: int | None) -> sf._SoundFileInfo:
    """The file's header, refused when it announces more than the caps allow: decoding a
    mislabelled multi-hour file, or one claiming 2 MHz x 64 channels, could exhaust a worker's
    memory before any sample is checked."""
    pos = None if isinstance(handle, str) else handle.tell()
    info = sf.info(handle)
    if pos is not None:
        handle.seek(pos)
    if max_sample_rate is not None and info.samplerate > max_sample_rate:
        raise AudioError(label, "rate_too_high", f"{info.samplerate} Hz > {max_sample_rate} Hz")
    if max_channels is not None and info.channels > max_channels:
        raise AudioError(label, "too_many_channels", f"{info.channels} > {max_channels}")
    if max_seconds is not None and info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
        raise AudioError(label, "too_long", f"{info.frames / info.samplerate:.0f} s > {max_seconds:.0f} s")
    return info


def read_audio(source: AudioSource, *, name: str | None = None, max_seconds: float | None = None,
               max_sample_rate: int | None = None, max_channels: int | None = None,
               decode_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode any file soundfile reads (wav of any width, flac, ogg, …) to float32 mono.

    Channels are averaged; the sample rate is left as it is (see :func:`resample`).

    Args:
        source: a path, the file's bytes, or a binary file object.
        name: how to name the input in errors (defaults to the path).
        max_seconds: reject longer files from their header, before decoding them.
        max_sample_rate: reject files whose header announces a higher rate (Hz).
        max_channels: reject files whose header announces more channels.
        decode_seconds: decode only the start of the file, this long (plus
            :data:`DECODE_MARGIN_SECONDS` so that resampling the cut matches resampling the
            whole): what the caller keeps of a long file, and all it holds in memory.

    Returns:
        ``(wav, sample_rate)`` with ``wav: (N,)`` float32.

    Raises:
        AudioError: missing, empty, undecodable, zero-length, too long, over a header cap or
            non-finite input.
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
        frames = -1  # soundfile: all of them
        if (max_seconds, max_sample_rate, max_channels, decode_seconds) != (None,) * 4:
            info = _check_header(handle, label, max_seconds=max_seconds, max_sample_rate=max_sample_rate,
                                 max_channels=max_channels)
            if decode_seconds is not None and info.samplerate > 0:
                frames = math.ceil((decode_seconds + DECODE_MARGIN_SECONDS) * info.samplerate)
        data, sr = sf.read(handle, frames=frames, dtype="float32", always_2d=True)  # (N, channels)
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


# torchaudio's sinc resampler builds one filter per output phase: (new / g) x (orig / g + taps)
# values for g = gcd(orig, new), in float64 while it builds them. 44100 -> 16000 needs 76 k;
# a rate sharing no factor with the target (44101 Hz) needs 700 M (5.6 GB): refused past this.
MAX_RESAMPLE_KERNEL = 2**24


def resample_kernel_size(orig_sr: int, target_sr: int, lowpass_filter_width: int = 6, rolloff: float = 0.99) -> int:
    """Values in the filter bank :func:`resample` builds (torchaudio's defaults)."""
    g = math.gcd(orig_sr, target_sr)
    orig, new = orig_sr // g, target_sr // g
    width = math.ceil(lowpass_filter_width * orig / (min(orig, new) * rolloff))
    return new * (2 * width + orig)


def load_audio(source: AudioSource, sample_rate: int, *, name: str | None = None, max_seconds: float | None = None,
               max_sample_rate: int | None = None, max_channels: int | None = None,
               decode_seconds: float | None = None) -> torch.Tensor:
    """Read, downmix and resample: the one call most code wants (the limits are
    :func:`read_audio`'s). Returns (N,) float32.

    Raises:
        AudioError: :func:`read_audio`'s, and ``bad_rate`` for a rate whose resampling filter
            would exceed :data:`MAX_RESAMPLE_KERNEL`.
    """
    wav, sr = read_audio(source, name=name, max_seconds=max_seconds, max_sample_rate=max_sample_rate,
                         max_channels=max_channels, decode_seconds=decode_seconds)
    if sr != sample_rate and (taps := resample_kernel_size(sr, sample_rate)) > MAX_RESAMPLE_KERNEL:
        raise AudioError(_name(source, name), "bad_rate",
                         f"resampling {sr} Hz to {sample_rate} Hz needs a {taps / 1e6:.0f} M-value filter")
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
