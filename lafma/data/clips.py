"""Raw audio → fixed-length clips: crop, pad or segment, and the checks that reject a file."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lafma.audio.io import fit_length


@dataclass
class Clip:
    """One fixed-length clip cut from a file.

    Attributes:
        index: segment number within the file (0 for a cropped or padded file).
        wav: (clip_samples,) float32, zero-padded past ``valid_samples``.
        valid_samples: how many samples are real audio (the rest is padding).
    """

    index: int
    wav: torch.Tensor
    valid_samples: int


class ClipRejected(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def rms_db(wav: torch.Tensor) -> float:
    """Root-mean-square level in dBFS (−inf for digital silence)."""
    rms = float(wav.double().pow(2).mean().sqrt())
    return 20 * math.log10(rms) if rms > 0 else float("-inf")


def cut_clips(wav: torch.Tensor, *, sample_rate: int, clip_samples: int, min_samples: int,
              mode: str = "segment", max_segments: int = 8, max_seconds: float = 3600.0,
              silence_db: float = -70.0) -> list[Clip]:
    """Cut a resampled file into clips, or reject it.

    Args:
        wav: (N,) float32 at ``sample_rate``.
        clip_samples: length of every clip.
        min_samples: shorter files are rejected (one STFT frame is the least a mel needs).
        mode: ``crop`` keeps the start; ``segment`` cuts consecutive clips (the last is kept
            when at least half full, so a long file does not end in a mostly-padded clip).
        max_segments: at most this many clips per file.
        max_seconds: longer files are rejected as absurd.
        silence_db: clips quieter than this are dropped; a file with no audible clip is rejected.

    Raises:
        ClipRejected: ``too_short``, ``too_long`` or ``silent``.
    """
    n = wav.shape[-1]
    if n < min_samples:
        raise ClipRejected("too_short", f"{n} samples < {min_samples}")
    if n > max_seconds * sample_rate:
        raise ClipRejected("too_long", f"{n / sample_rate:.0f} s > {max_seconds:.0f} s")
    if mode == "crop" or n <= clip_samples:
        starts = [0]
    else:
        starts = [s for s in range(0, n, clip_samples) if s == 0 or n - s >= clip_samples // 2][:max_segments]
    clips = []
    for i, s in enumerate(starts):
        piece = wav[s : s + clip_samples]
        if rms_db(piece) >= silence_db:
            clips.append(Clip(i, fit_length(piece, clip_samples).contiguous(), piece.shape[-1]))
    if not clips:
        raise ClipRejected("silent", f"below {silence_db} dBFS")
    return clips
