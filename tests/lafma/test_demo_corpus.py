"""The built-in demo corpus: deterministic, captioned by its attributes, held-out splits,
sounds that match their captions (pitch, count, direction, colour, level), idempotent writer."""

import itertools
import os
import re

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from lafma.data import (
    ATTRIBUTE_COLUMNS,
    COLUMNS,
    INSTRUMENTS,
    PATTERNS,
    REGISTERS,
    SYNTH_KINDS,
    demo_clips,
    render_instrument,
    split_of,
    write_demo_corpus,
)
from lafma.data.demo_instruments import REGISTER_OFFSET

SR = 16000
SECONDS = 2.56
N_SAMPLES = round(SR * SECONDS)


@pytest.fixture(scope="module")
def corpus():
    return list(demo_clips(80, seed=0))


def yin_f0(x: np.ndarray, sr: int = SR, fmin: float = 30.0, fmax: float = 3000.0) -> float:
    """Median YIN fundamental (Hz) over the clip's periodic frames (de Cheveigné & Kawahara)."""
    frame, max_lag, min_lag = 2048, int(sr / fmin), int(sr / fmax)
    lags = np.arange(1, max_lag)
    f0s = []
    for start in range(0, len(x) - frame - max_lag, frame // 2):
        seg = x[start : start + frame + max_lag].astype(np.float64)
        head = seg[:frame]
        if np.sqrt(np.mean(head**2)) < 1e-4:
            continue
        energy = np.concatenate([[0.0], np.cumsum(seg**2)])
        # d(tau) = sum_j (x_j - x_{j+tau})^2 over the frame, from energies and a correlation.
        corr = np.correlate(seg[: frame + max_lag - 1], head, mode="valid")[1:max_lag]
        d = energy[frame] + (energy[lags + frame] - energy[lags]) - 2 * corr
        cmnd = d * lags / np.maximum(np.cumsum(d), 1e-12)  # cumulative-mean normalised
        dips = np.nonzero(cmnd[min_lag:] < 0.15)[0]  # YIN's absolute threshold
        if len(dips) == 0:
            continue
        i = min_lag + dips[0]
        while i + 1 < len(cmnd) and cmnd[i + 1] < cmnd[i]:  # walk down to the local minimum
            i += 1
        f0s.append(sr / lags[i])
    return float(np.median(f0s)) if f0s else float("nan")


def midi(hz: float) -> float:
    return 69 + 12 * np.log2(hz / 440.0)


# --- determinism ------------------------------------------------------------------------------


def test_same_arguments_give_identical_clips():
    a, b = list(demo_clips(10, seed=3)), list(demo_clips(10, seed=3))
    assert [c.caption for c in a] == [c.caption for c in b]
    assert all(x.audio.tobytes() == y.audio.tobytes() for x, y in zip(a, b))
    other = list(demo_clips(10, seed=4))
    assert [c.caption for c in a] != [c.caption for c in other]


def test_clip_i_does_not_depend_on_n_or_on_what_was_rendered_before():
    small = list(demo_clips(5, seed=1))
    # A different corpus first: the shared soundfont synth must carry nothing over.
    list(demo_clips(7, seed=9))
    large = list(demo_clips(12, seed=1))
    for x, y in zip(small, large):
        assert (x.id, x.caption, x.split, x.attributes) == (y.id, y.caption, y.split, y.attributes)
        assert x.audio.tobytes() == y.audio.tobytes()


# --- audio ------------------------------------------------------------------------------------


def test_audio_is_finite_non_silent_right_length_and_unclipped(corpus):
    for clip in corpus:
        assert clip.audio.dtype == np.float32 and clip.audio.shape == (N_SAMPLES,)
        assert np.all(np.isfinite(clip.audio))
        peak = np.abs(clip.audio).max()
        assert 0.05 < peak < 1.0, (clip.caption, peak)
        assert np.sqrt(np.mean(clip.audio**2)) > 1e-3, clip.caption


def test_loud_clips_are_about_ten_db_louder_than_soft_ones(corpus):
    peak_db = {"soft": [], "loud": []}
    for clip in corpus:
        peak_db[clip.attributes["loudness"]].append(20 * np.log10(np.abs(clip.audio).max()))
    assert max(peak_db["loud"]) <= -0.9  # headroom: never at full scale
    gap = np.mean(peak_db["loud"]) - np.mean(peak_db["soft"])
    assert 8.0 < gap < 14.0


@pytest.mark.parametrize("instrument", ["cello", "flute", "bass guitar", "organ", "piano"])
def test_single_notes_sound_at_their_register(instrument):
    _, _, centre = INSTRUMENTS[instrument]
    for register in REGISTERS:
        audio = render_instrument(
            instrument, register, "single_note", None, "loud", np.random.default_rng(0)
        )
        expected = centre + REGISTER_OFFSET[register]
        # Within the key jitter (± 2 semitones) plus estimation error: an octave error fails.
        assert abs(midi(yin_f0(audio)) - expected) < 2.6, (instrument, register)


@pytest.mark.parametrize("instrument", ["violin", "trombone", "clarinet", "marimba"])
def test_low_register_clips_are_lower_than_high_ones_for_every_pattern(instrument):
    mean_pitch = {}
    for register in ("low", "high"):
        pitches = []
        for pattern in PATTERNS:
            rng = np.random.default_rng(7)  # the same key jitter in both registers
            audio = render_instrument(instrument, register, pattern, "slow", "soft", rng)
            pitches.append(midi(yin_f0(audio)))
        mean_pitch[register] = np.nanmean(pitches)
    # The registers are two octaves apart: at least one must survive estimation.
    assert mean_pitch["high"] - mean_pitch["low"] > 12


def _synth_audio(**attrs) -> np.ndarray:
    from lafma.data.demo_synth import render_synth

    return render_synth(attrs, np.random.default_rng(0), SR, N_SAMPLES)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_beeps_can_be_counted(count):
    audio = _synth_audio(kind="beeps", count=count, register="high")
    on = (np.abs(audio) > 0.1).astype(int)
    # Runs of "on" separated by more than a cycle of the tone: each run is one beep.
    gaps = np.diff(np.nonzero(on)[0])
    assert 1 + int(np.sum(gaps > SR // 100)) == count


def _centroid_hz(x: np.ndarray) -> float:
    power = np.abs(np.fft.rfft(x)) ** 2
    return float(np.sum(np.fft.rfftfreq(len(x), 1 / SR) * power) / np.sum(power))


@pytest.mark.parametrize("variant", ["rising", "falling"])
def test_slow_sweeps_go_their_way(variant):
    audio = _synth_audio(kind="sweep", variant=variant, tempo="slow")
    first, second = _centroid_hz(audio[: N_SAMPLES // 2]), _centroid_hz(audio[N_SAMPLES // 2 :])
    assert (second > 2 * first) if variant == "rising" else (first > 2 * second)


def test_noise_colours_darken_white_pink_brown():
    centroids = [
        _centroid_hz(_synth_audio(kind="noise", variant=v)) for v in SYNTH_KINDS["noise"]["variant"]
    ]
    assert centroids == sorted(centroids, reverse=True)
    assert centroids[0] > 3 * centroids[2]


# --- captions and splits ----------------------------------------------------------------------


_KIND_WORD = {
    "noise": "noise",
    "siren": "siren",
    "sweep": "sweep",
    "beeps": "beep",
    "ticking": "tick",
    "clicks": "click",
    "rumble": "rumble",
}
_PATTERN_WORD = {p: p.split("_")[-1] for p in PATTERNS}  # note, scale, chord, arpeggio


def test_captions_name_their_attributes(corpus):
    families = {c.attributes["family"] for c in corpus}
    assert families == {"instrument", "synth"}
    for clip in corpus:
        a, caption = clip.attributes, clip.caption
        assert set(a) == set(ATTRIBUTE_COLUMNS)
        assert a["loudness"] in caption  # "soft" / "loud" (also inside "softly" / "loudly")
        if a["family"] == "instrument":
            assert a["instrument"] in caption
            assert _PATTERN_WORD[a["pattern"]] in caption
            assert (a["register"] in caption) or (a["register"] == "middle" and "mid" in caption)
            assert a["tempo"] is None or a["tempo"] in caption
            for column in ("kind", "variant", "count"):
                assert a[column] is None
        else:
            assert _KIND_WORD[a["kind"]] in caption
            assert a["instrument"] is None and a["pattern"] is None
            if a["kind"] in ("noise", "rumble") or (a["kind"] == "sweep" and "tone" not in caption):
                assert a["variant"][:5] in caption  # "swell" in "swells", "rising" in "rising"
            if a["register"] is not None:
                assert a["register"] in caption
            if a["count"] is not None:
                words = ("one", "two", "three", "four", "five", "once", "twice")
                assert any(w in re.findall(r"[a-z]+", caption) for w in words)


def _split_key(attrs: dict) -> tuple:
    if attrs["family"] == "instrument":
        return attrs["family"], attrs["instrument"], attrs["pattern"], attrs["register"]
    return tuple((c, attrs[c]) for c in ATTRIBUTE_COLUMNS)


def test_held_out_combinations_never_occur_in_train():
    clips = list(demo_clips(60, seed=0))
    by_split = {
        s: {_split_key(c.attributes) for c in clips if c.split == s}
        for s in ("train", "validation", "test")
    }
    assert all(by_split.values()), {s: len(k) for s, k in by_split.items()}
    assert not by_split["test"] & by_split["train"]
    assert not by_split["validation"] & by_split["train"]
    # The split is a property of the combination, whatever the seed.
    for clip in list(demo_clips(30, seed=5)):
        assert clip.split == split_of(clip.attributes)


def _all_combinations():
    base = dict.fromkeys(ATTRIBUTE_COLUMNS)
    for inst, pattern, register in itertools.product(INSTRUMENTS, PATTERNS, REGISTERS):
        yield {
            **base,
            "family": "instrument",
            "instrument": inst,
            "pattern": pattern,
            "register": register,
        }
    for kind, columns in SYNTH_KINDS.items():
        for values in itertools.product(*columns.values(), ("soft", "loud")):
            yield {
                **base,
                "family": "synth",
                "kind": kind,
                "loudness": values[-1],
                **dict(zip(columns, values[:-1])),
            }


def test_every_held_out_word_is_taught_in_train():
    # Held-out combinations test composition, not new words: each value is seen in train.
    train_values: dict[str, set] = {c: set() for c in ATTRIBUTE_COLUMNS}
    held_out = []
    for combo in _all_combinations():
        if split_of(combo) == "train":
            for column, value in combo.items():
                train_values[column].add(value)
        else:
            held_out.append(combo)
    assert held_out
    for combo in held_out:
        for column, value in combo.items():
            assert value in train_values[column], (column, value)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="fraction_instruments"):
        next(demo_clips(1, fraction_instruments=1.5))
    with pytest.raises(ValueError, match="n and seed"):
        next(demo_clips(-1))


# --- writer -----------------------------------------------------------------------------------


def _snapshot(root) -> dict:
    return {
        p: (os.stat(p).st_mtime_ns, open(p, "rb").read())
        for p in sorted(str(q) for q in root.rglob("*") if q.is_file())
    }


def test_write_demo_corpus_writes_readable_wavs_and_manifest(tmp_path):
    manifest = write_demo_corpus(tmp_path, 6, seed=2)
    df = pd.read_csv(manifest)
    assert list(df.columns) == [*COLUMNS, *ATTRIBUTE_COLUMNS]
    assert len(df) == 6 and df["id"].is_unique
    clips = list(demo_clips(6, seed=2))
    assert list(df["caption"]) == [c.caption for c in clips]
    for row, clip in zip(df.itertuples(), clips):
        assert row.audio == f"audio/{row.id}.wav"
        audio, sr = sf.read(tmp_path / row.audio, dtype="float32")
        info = sf.info(tmp_path / row.audio)
        assert (sr, info.channels, info.subtype, audio.shape) == (SR, 1, "PCM_16", (N_SAMPLES,))
        assert np.max(np.abs(audio - clip.audio)) < 1e-4  # only 16-bit quantisation
        # Attributes that do not apply are empty cells (NaN), the others round-trip.
        for column in ATTRIBUTE_COLUMNS:
            value = getattr(row, column)
            if clip.attributes[column] is None:
                assert pd.isna(value)
            else:
                assert str(value).removesuffix(".0") == str(clip.attributes[column])


def test_write_demo_corpus_is_idempotent_and_resumable(tmp_path):
    write_demo_corpus(tmp_path, 6, seed=2)
    first = _snapshot(tmp_path)
    write_demo_corpus(tmp_path, 6, seed=2)
    assert _snapshot(tmp_path) == first  # same bytes, nothing even rewritten

    # A lost and a truncated file (an interrupted run) come back byte-identical.
    wavs = sorted((tmp_path / "audio").glob("*.wav"))
    wavs[0].unlink()
    wavs[1].write_bytes(wavs[1].read_bytes()[:1000])
    write_demo_corpus(tmp_path, 6, seed=2)
    assert {p: b for p, (_, b) in _snapshot(tmp_path).items()} == {
        p: b for p, (_, b) in first.items()
    }

    # Growing the corpus leaves the clips already written untouched.
    write_demo_corpus(tmp_path, 9, seed=2)
    grown = _snapshot(tmp_path)
    for path in first:
        if path.endswith(".wav"):
            assert grown[path][1] == first[path][1]
    assert len(pd.read_csv(tmp_path / "manifest.csv")) == 9


def test_write_demo_corpus_refuses_to_mix_corpora(tmp_path):
    write_demo_corpus(tmp_path, 2, seed=2)
    with pytest.raises(ValueError, match="another demo corpus"):
        write_demo_corpus(tmp_path, 2, seed=2, fraction_instruments=0.3)
