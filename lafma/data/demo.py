"""The built-in demo corpus: captioned clips the pipeline can learn from with no dataset at hand.

Two families of sound, both generated offline and deterministically:

* ``instrument`` clips: General-MIDI instruments from the soundfont that ships inside the
  ``pretty_midi`` wheel, rendered with ``tinysoundfont``, playing a pattern (single note,
  scales, chord, arpeggio, repeated note) in a register, tempo and loudness
  (:mod:`lafma.data.demo_instruments`);
* ``synth`` clips: numpy sounds (noise colours, sirens, sweeps, counted beeps, ticking, clicks,
  rumble) (:mod:`lafma.data.demo_synth`).

Every clip is faded at its edges and peak-normalised to its loudness class (soft and loud
differ by 11 dB), so the level in the caption is the level in the wav.

Clip ``i`` of seed ``s`` depends on ``(s, i)`` only, so a corpus can grow without changing the
clips it already has. Splits hold out whole attribute combinations (:func:`split_of`): a test
caption's combination never occurs in train, so the test split measures generalisation.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from lafma.data.demo_instruments import (
    instrument_caption,
    pick,
    render_instrument,
    sample_instrument_attributes,
)
from lafma.data.demo_synth import LOUDNESS, render_synth, sample_synth_attributes, synth_caption

# Peak level after normalisation: 11 dB apart, the loud one with 1 dB of headroom.
_PEAK_DBFS = {"soft": -12.0, "loud": -1.0}
_PEAK_JITTER_DB = 1.0  # some level variety within a loudness class
_FADE_S = 0.01  # a 10 ms fade at each end: no click at the clip boundary
_HOLDOUT_PERCENT = {"test": 10, "validation": 10}
# Bump when a change alters any clip: a corpus on disk from another version is then refused
# instead of being silently mixed with new clips.
DEMO_VERSION = 1

COLUMNS = ("id", "audio", "caption", "split")
ATTRIBUTE_COLUMNS = (
    "family",
    "instrument",
    "instrument_group",
    "kind",
    "variant",
    "register",
    "pattern",
    "tempo",
    "loudness",
    "count",
)
# Attributes that define a held-out combination (loudness and tempo vary freely for
# instruments; synth kinds are small, so their whole attribute set is the combination).
_INSTRUMENT_SPLIT_KEY = ("instrument", "pattern", "register")
_PLAN_STREAM, _RENDER_STREAM = 0, 1  # independent random streams per clip


@dataclass
class DemoClip:
    """One generated clip.

    Attributes:
        id: stable name, ``demo-s<seed>-<index>``.
        caption: a natural-language description of the clip.
        split: ``train``, ``validation`` or ``test``.
        attributes: every column of :data:`ATTRIBUTE_COLUMNS` (``None`` where not applicable).
        audio: ``(N,)`` float32 in [-1, 1].
        sample_rate: Hz.
    """

    id: str
    caption: str
    split: str
    attributes: dict
    audio: np.ndarray
    sample_rate: int


@dataclass(frozen=True)
class _Plan:
    id: str
    caption: str
    split: str
    attributes: dict
    seed: int
    index: int


def split_of(attributes: dict) -> str:
    """The split of an attribute combination: a stable hash, independent of seed and order."""
    if attributes["family"] == "instrument":
        key_columns = _INSTRUMENT_SPLIT_KEY
    else:
        key_columns = tuple(c for c in ATTRIBUTE_COLUMNS if attributes.get(c) is not None)
    key = "|".join(f"{c}={attributes[c]}" for c in key_columns)
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100
    if bucket < _HOLDOUT_PERCENT["test"]:
        return "test"
    if bucket < _HOLDOUT_PERCENT["test"] + _HOLDOUT_PERCENT["validation"]:
        return "validation"
    return "train"


def _plan(index: int, seed: int, fraction_instruments: float) -> _Plan:
    rng = np.random.default_rng([seed, index, _PLAN_STREAM])
    attrs: dict = dict.fromkeys(ATTRIBUTE_COLUMNS)
    if rng.random() < fraction_instruments:
        attrs.update(family="instrument", **sample_instrument_attributes(rng))
        attrs["loudness"] = pick(rng, LOUDNESS)
        caption = instrument_caption(attrs, rng)
    else:
        attrs.update(family="synth", **sample_synth_attributes(rng))
        attrs["loudness"] = pick(rng, LOUDNESS)
        caption = synth_caption(attrs, rng)
    return _Plan(f"demo-s{seed}-{index:06d}", caption, split_of(attrs), attrs, seed, index)


def _finish(audio: np.ndarray, loudness: str, rng: np.random.Generator, sr: int) -> np.ndarray:
    """Fade the edges (no clicks at the clip boundary) and set the peak level for loudness."""
    fade = int(_FADE_S * sr)
    ramp = np.linspace(0.0, 1.0, fade)
    audio[:fade] *= ramp
    audio[len(audio) - fade :] *= ramp[::-1]
    peak = np.abs(audio).max()
    if not np.isfinite(peak) or peak <= 0:
        raise RuntimeError("demo clip rendered silent or non-finite: a bug in the generator")
    target_db = _PEAK_DBFS[loudness] - rng.uniform(0, _PEAK_JITTER_DB)
    return (audio * (10 ** (target_db / 20) / peak)).astype(np.float32)


def _render(plan: _Plan, sample_rate: int, clip_seconds: float) -> np.ndarray:
    rng = np.random.default_rng([plan.seed, plan.index, _RENDER_STREAM])
    a = plan.attributes
    if a["family"] == "instrument":
        keys = ("instrument", "register", "pattern", "tempo", "loudness")
        audio = render_instrument(*(a[k] for k in keys), rng, sample_rate, clip_seconds)
    else:
        audio = render_synth(a, rng, sample_rate, round(sample_rate * clip_seconds))
    return _finish(audio, a["loudness"], rng, sample_rate)


def _check(n: int, seed: int, sample_rate: int, clip_seconds: float, fraction: float) -> None:
    if n < 0 or seed < 0:
        raise ValueError(f"n and seed must be >= 0, got n={n}, seed={seed}")
    if sample_rate < 8000 or clip_seconds < 0.5:  # below these the patterns no longer fit
        raise ValueError(
            f"need sample_rate >= 8000 and clip_seconds >= 0.5, got "
            f"sample_rate={sample_rate}, clip_seconds={clip_seconds}"
        )
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction_instruments must be in [0, 1], got {fraction}")


def demo_clips(
    n: int,
    seed: int = 0,
    sample_rate: int = 16000,
    clip_seconds: float = 2.56,
    fraction_instruments: float = 0.6,
) -> Iterator[DemoClip]:
    """Generate the first ``n`` clips of the demo corpus for ``seed``.

    Args:
        n: number of clips.
        seed: corpus seed; clip ``i`` depends only on ``(seed, i)`` (and the arguments below).
        sample_rate: Hz.
        clip_seconds: length of every clip.
        fraction_instruments: probability that a clip is an instrument (else a synth sound).

    Yields:
        :class:`DemoClip` with ``audio: (round(sample_rate * clip_seconds),)`` float32.
    """
    _check(n, seed, sample_rate, clip_seconds, fraction_instruments)
    for i in range(n):
        plan = _plan(i, seed, fraction_instruments)
        audio = _render(plan, sample_rate, clip_seconds)
        yield DemoClip(plan.id, plan.caption, plan.split, plan.attributes, audio, sample_rate)


def _is_complete(path: Path, sample_rate: int, frames: int) -> bool:
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError):  # missing or truncated: write it again
        return False
    return (info.samplerate, info.frames, info.channels) == (sample_rate, frames, 1)


def write_demo_corpus(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    sample_rate: int = 16000,
    clip_seconds: float = 2.56,
    fraction_instruments: float = 0.6,
) -> Path:
    """Write ``out_dir/audio/<id>.wav`` (16-bit PCM mono) and ``out_dir/manifest.csv``.

    Idempotent and resumable: a wav already there with the right rate and length is not
    rendered again, each file appears atomically (written aside, then renamed), and the
    manifest is written last and only when its content changes. The same arguments give
    byte-identical files; a larger ``n`` adds clips and leaves the others as they are.
    ``out_dir/demo.json`` records the generator version and settings.

    Args:
        out_dir: corpus directory (created).
        n, seed, sample_rate, clip_seconds, fraction_instruments: as in :func:`demo_clips`.

    Returns:
        The manifest's path. Columns: :data:`COLUMNS` then :data:`ATTRIBUTE_COLUMNS`; empty
        cells are attributes that do not apply; ``audio`` is relative to ``out_dir``.

    Raises:
        ValueError: ``out_dir`` holds a corpus of another version, seed or settings.
    """
    _check(n, seed, sample_rate, clip_seconds, fraction_instruments)
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    # Clips already on disk are trusted only if they came from the same generator and settings.
    params = {
        "version": DEMO_VERSION,
        "seed": seed,
        "sample_rate": sample_rate,
        "clip_seconds": clip_seconds,
        "fraction_instruments": fraction_instruments,
    }
    params_path = out / "demo.json"
    if params_path.exists():
        found = json.loads(params_path.read_text(encoding="utf-8"))
        if found != params:
            raise ValueError(f"{out} holds another demo corpus ({found}), not {params}")
    else:
        params_path.write_text(json.dumps(params, sort_keys=True) + "\n", encoding="utf-8")
    frames = round(sample_rate * clip_seconds)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS + ATTRIBUTE_COLUMNS)
    for i in range(n):
        plan = _plan(i, seed, fraction_instruments)
        rel = f"audio/{plan.id}.wav"
        if not _is_complete(out / rel, sample_rate, frames):
            tmp = out / f"{rel}.tmp"
            audio = _render(plan, sample_rate, clip_seconds)
            sf.write(str(tmp), audio, sample_rate, subtype="PCM_16", format="WAV")
            os.replace(tmp, out / rel)
        attrs = [plan.attributes[c] for c in ATTRIBUTE_COLUMNS]
        writer.writerow([plan.id, rel, plan.caption, plan.split, *attrs])  # None -> ""
    manifest = out / "manifest.csv"
    if not manifest.exists() or manifest.read_text(encoding="utf-8") != text.getvalue():
        tmp = out / "manifest.csv.tmp"
        tmp.write_text(text.getvalue(), encoding="utf-8")
        os.replace(tmp, manifest)
    return manifest
