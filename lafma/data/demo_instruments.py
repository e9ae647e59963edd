"""Instrument clips of the demo corpus: General-MIDI instruments playing short patterns.

The soundfont is the General-MIDI ``TimGM6mb.sf2`` that ships inside the ``pretty_midi`` wheel;
``tinysoundfont`` renders it offline, sample-accurately, into a numpy buffer (no audio device).
An instrument clip has an instrument (grouped in families), a register (an octave below or
above the instrument's middle), a pattern, a tempo (for patterns with more than one onset) and
a loudness. Everything random comes from the ``rng`` passed in.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading

import numpy as np

from lafma.data.demo_synth import LOUDNESS_ADVERB

# name -> (instrument group, General-MIDI program (0-based), middle-register centre as a
# sounding MIDI key). Centres sit about an octave inside each instrument's range, so low / high
# (an octave down / up, see REGISTER_OFFSET) stay idiomatic. Programs and centres were chosen by
# scanning TimGM6mb.sf2: every key a clip can use (centre ± 20) sounds, at every velocity used,
# at its own pitch. That ruled out its alto sax (silent key 64), oboe and glockenspiel (samples
# an octave off in parts of their range) and church organ (16-foot rank in its upper half only).
INSTRUMENTS: dict[str, tuple[str, int, int]] = {
    "piano": ("piano", 0, 60),
    "electric piano": ("piano", 4, 60),
    "harpsichord": ("piano", 6, 62),
    "organ": ("organ", 16, 60),
    "reed organ": ("organ", 20, 60),
    "accordion": ("organ", 21, 60),
    "acoustic guitar": ("guitar", 24, 57),
    "electric guitar": ("guitar", 27, 57),
    "distorted guitar": ("guitar", 30, 57),
    "violin": ("strings", 40, 74),
    "viola": ("strings", 41, 65),
    "cello": ("strings", 42, 55),
    "harp": ("strings", 46, 64),
    "trumpet": ("brass", 56, 68),
    "trombone": ("brass", 57, 55),
    "tuba": ("brass", 58, 43),
    "french horn": ("brass", 60, 60),
    "saxophone": ("reed", 66, 62),
    "clarinet": ("reed", 71, 67),
    "english horn": ("reed", 69, 65),
    "bassoon": ("reed", 70, 50),
    "flute": ("pipe", 73, 79),
    "piccolo": ("pipe", 72, 84),
    "pan flute": ("pipe", 75, 76),
    "marimba": ("mallet", 12, 65),
    "xylophone": ("mallet", 13, 79),
    "vibraphone": ("mallet", 11, 70),
    "celesta": ("mallet", 8, 80),
    "bass guitar": ("bass", 33, 43),
    "double bass": ("bass", 43, 43),
    "synth bass": ("bass", 38, 43),
    "synth lead": ("synth", 81, 67),
    "synth pad": ("synth", 89, 60),
}
# TimGM6mb's "Organ 1" has a 16-foot (sub-octave) drawbar: it sounds an octave below the key
# pressed, so it is played an octave up to sound where the table says.
_KEY_SHIFT = {"organ": 12}
REGISTERS = ("low", "middle", "high")
REGISTER_OFFSET = {"low": -12, "middle": 0, "high": 12}  # semitones: an octave apart
PATTERNS = (
    "single_note",
    "rising_scale",
    "falling_scale",
    "chord",
    "arpeggio",
    "repeated_note",
)
TEMPOS = ("slow", "fast")
UNTIMED = ("single_note", "chord")  # one onset: tempo does not apply
_TEMPO_STEP_S = {"slow": 0.28, "fast": 0.14}  # 8-note scale fits a 2.56 s clip when slow
_VELOCITY = {"soft": 55, "loud": 110}  # MIDI velocity also changes the timbre, not just level
_VELOCITY_JITTER = 8  # per note: a human-ish, uneven touch
_LEAD_S, _RELEASE_S = 0.05, 0.15  # silence before the first onset; release room at the end
_FLUSH_S = 0.05  # > tinysoundfont's quick release (10 ms measured at 16 kHz is enough)
_MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11, 12)
_CHORD = (0, 4, 7, 12)  # major triad plus the octave
_ARPEGGIO = (0, 4, 7, 12, 7, 4)  # up and back down the chord, round and round
_PATTERN_SPAN = 6  # patterns are built from centre - 6 so their mean pitch is the centre
_PITCH_JITTER = 2  # semitones either side: same caption, not the same key every time


def pick(rng: np.random.Generator, values: tuple):
    """One of ``values``, uniformly (by index, so values keep their Python types)."""
    return values[int(rng.integers(len(values)))]


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def sample_instrument_attributes(rng: np.random.Generator) -> dict:
    """Draw instrument, register and pattern uniformly, then a tempo where one applies."""
    instrument = pick(rng, tuple(INSTRUMENTS))
    pattern = pick(rng, PATTERNS)
    return {
        "instrument": instrument,
        "instrument_group": INSTRUMENTS[instrument][0],
        "register": pick(rng, REGISTERS),
        "pattern": pattern,
        "tempo": None if pattern in UNTIMED else pick(rng, TEMPOS),
    }


def instrument_caption(a: dict, rng: np.random.Generator) -> str:
    """One of four caption templates, naming every attribute of the clip."""
    tempo = f"{a['tempo']} " if a["tempo"] else ""
    phrase = {
        "single_note": "a single long note",
        "chord": "a chord",
        "rising_scale": f"a {tempo}rising scale",
        "falling_scale": f"a {tempo}falling scale",
        "arpeggio": f"a {tempo}arpeggio",
        "repeated_note": f"a {tempo}repeated note",
    }[a["pattern"]]
    inst, reg, loud = a["instrument"], a["register"], a["loudness"]
    adv = LOUDNESS_ADVERB[loud]
    templates = (
        f"{_article(inst)} {adv} plays {phrase} in a {reg} register",
        f"{phrase} played {adv} on {_article(inst)}, {reg} register",
        f"{_article(loud)} {'mid-range' if reg == 'middle' else reg} {inst} playing {phrase}",
        f"the sound of {_article(inst)} playing {phrase} {adv} in its {reg} register",
    )
    return pick(rng, templates)


def _note_events(
    pattern: str, tempo: str | None, centre: int, seconds: float
) -> list[tuple[float, float, int]]:
    """``(onset_s, offset_s, key)`` per note; the last note is held until the release."""
    end = seconds - _RELEASE_S
    root = centre - _PATTERN_SPAN
    if pattern == "single_note":
        return [(_LEAD_S, end, centre)]
    if pattern == "chord":
        return [(_LEAD_S, end, root + k) for k in _CHORD]
    step = _TEMPO_STEP_S[tempo]
    onsets = np.arange(_LEAD_S, end - 0.5 * step, step)
    if pattern in ("rising_scale", "falling_scale"):
        keys = [root + k for k in _MAJOR_SCALE]
        keys = keys if pattern == "rising_scale" else keys[::-1]
    elif pattern == "arpeggio":
        keys = [root + _ARPEGGIO[j % len(_ARPEGGIO)] for j in range(len(onsets))]
    else:
        keys = [centre] * len(onsets)
    onsets = onsets[: len(keys)]
    # Slightly detached notes (90 % of the step) so repeated notes are heard as repeated.
    offsets = [*(onsets[1:] - 0.1 * step), end]
    return list(zip(onsets.tolist(), offsets, keys[: len(onsets)]))


@functools.cache
def _soundfont_path() -> str:
    # Found without importing pretty_midi (and its mido dependency): only the file is needed.
    spec = importlib.util.find_spec("pretty_midi")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the demo corpus needs pretty_midi (its wheel ships the soundfont)")
    return os.path.join(next(iter(spec.submodule_search_locations)), "TimGM6mb.sf2")


_local = threading.local()  # a tinysoundfont Synth is stateful: one per thread and rate


def _synth(sample_rate: int):
    synths = _local.__dict__.setdefault("synths", {})
    if sample_rate not in synths:
        import tinysoundfont  # imported here: only instrument clips need it

        synth = tinysoundfont.Synth(samplerate=sample_rate)
        synths[sample_rate] = (synth, synth.sfload(_soundfont_path()))
    return synths[sample_rate]


def render_instrument(
    instrument: str,
    register: str,
    pattern: str,
    tempo: str | None,
    loudness: str,
    rng: np.random.Generator,
    sample_rate: int = 16000,
    clip_seconds: float = 2.56,
) -> np.ndarray:
    """Render an instrument playing a pattern through the General-MIDI soundfont.

    Args:
        instrument: a key of :data:`INSTRUMENTS`.
        register: ``low``, ``middle`` or ``high``: an octave down, the centre, an octave up.
        pattern: one of :data:`PATTERNS`.
        tempo: ``slow`` or ``fast`` (ignored for the patterns in :data:`UNTIMED`).
        loudness: ``soft`` or ``loud`` (MIDI velocity; the level is set later, by the caller).
        rng: the clip's random stream (key jitter, velocities).
        sample_rate: Hz.
        clip_seconds: length of the clip.

    Returns:
        ``(round(sample_rate * clip_seconds),)`` float64 mono, not normalised.
    """
    _, program, centre = INSTRUMENTS[instrument]
    centre += REGISTER_OFFSET[register] + int(rng.integers(-_PITCH_JITTER, _PITCH_JITTER + 1))
    n = round(sample_rate * clip_seconds)
    events = []  # (sample, order, key, velocity): note-offs (order 0) before note-ons
    key_shift = _KEY_SHIFT.get(instrument, 0)
    for onset, offset, pitch in _note_events(pattern, tempo, centre, clip_seconds):
        jitter = int(rng.integers(-_VELOCITY_JITTER, _VELOCITY_JITTER + 1))
        velocity = _VELOCITY[loudness] + jitter
        key = pitch + key_shift
        events += [(round(onset * sample_rate), 1, key, velocity)]
        events += [(round(offset * sample_rate), 0, key, 0)]
    synth, sfid = _synth(sample_rate)
    # Voices of the previous clip must be gone, or their tail leaks into this one and a clip
    # would depend on what was rendered before it. sounds_off() only starts a quick (few ms)
    # release, so render that away before the first note.
    synth.sounds_off()
    synth.generate(round(_FLUSH_S * sample_rate))
    synth.program_select(0, sfid, 0, program)
    out, pos = np.zeros(n), 0
    for sample, _, key, velocity in sorted(events) + [(n, 0, None, 0)]:
        if sample > pos:  # render up to the event, sample-accurately
            stereo = np.frombuffer(synth.generate(sample - pos), dtype=np.float32)
            out[pos:sample] = stereo.reshape(-1, 2).mean(axis=1)  # (frames, 2) -> mono
            pos = sample
        if key is not None and velocity:
            synth.noteon(0, key, velocity)
        elif key is not None:
            synth.noteoff(0, key)
    return out
