"""Synthesised sounds of the demo corpus: noise colours, sirens, sweeps, beeps, ticks, rumble.

Each kind has a small attribute vocabulary (:data:`SYNTH_KINDS`), a numpy renderer and a few
caption templates. Renderers return unnormalised float64 audio; :mod:`lafma.data.demo` fades,
peak-normalises and names the clip. Everything random comes from the ``rng`` passed in, so a
clip is a pure function of its seed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

LOUDNESS = ("soft", "loud")
LOUDNESS_ADVERB = {"soft": "softly", "loud": "loudly"}

# kind -> {attribute column: its values}. Every kind also gets a loudness.
SYNTH_KINDS: dict[str, dict[str, tuple]] = {
    "noise": {"variant": ("white", "pink", "brown")},
    "siren": {"register": ("low", "high"), "tempo": ("slow", "fast")},
    "sweep": {"variant": ("rising", "falling"), "tempo": ("slow", "fast")},
    "beeps": {"count": (1, 2, 3, 4, 5), "register": ("low", "high")},
    "ticking": {"tempo": ("slow", "fast")},
    "clicks": {"tempo": ("slow", "fast")},
    "rumble": {"variant": ("steady", "swelling")},
}

_COUNT_WORDS = ("one", "two", "three", "four", "five")
_TIMES = ("once", "twice", "three times", "four times", "five times")

# Noise colours as power-law exponents of the power spectrum (S(f) ~ 1 / f^alpha).
_NOISE_ALPHA = {"white": 0.0, "pink": 1.0, "brown": 2.0}
# Below this the 1/f shaping is flattened: it would otherwise pour energy into inaudible DC drift.
_NOISE_FLOOR_HZ = 20.0
# Two octaves apart, so "low" and "high" are unmistakable; both well inside a 16 kHz band.
_SIREN_HZ = {"low": 450.0, "high": 1100.0}
_SIREN_DEPTH_OCT = 0.5  # the pitch swings half an octave either side of its centre
_SIREN_RATE_HZ = {"slow": 0.4, "fast": 4.0}  # a wail vs a yelp, as emergency sirens do
_SWEEP_HZ = (150.0, 4000.0)
_SWEEPS_PER_CLIP = {"slow": 1, "fast": 3}
_BEEP_HZ = {"low": 500.0, "high": 2000.0}
_BEEP_S, _BEEP_PERIOD_S = 0.12, 0.3  # "short" beeps, clearly separated so they can be counted
_TICK_PERIOD_S = {"slow": 0.5, "fast": 0.125}
_TICK_HZ = (2800.0, 2200.0)  # alternating tick / tock, like a mechanical clock
_CLICK_RATE_HZ = {"slow": 5.0, "fast": 30.0}  # mean clicks per second of a Poisson process
_RUMBLE_CUTOFF_HZ = 120.0
_RUMBLE_TONE_HZ = (35.0, 60.0)  # range of the low hum under the rumble
_RAMP_S = 0.005  # raised-cosine edge of each beep or tick: no broadband click at its edges


def sample_synth_attributes(rng: np.random.Generator) -> dict:
    """Draw a kind uniformly, then each of its attributes uniformly (loudness excluded)."""
    kinds = list(SYNTH_KINDS)
    kind = kinds[int(rng.integers(len(kinds)))]
    attrs: dict = {"kind": kind}
    for column, values in SYNTH_KINDS[kind].items():
        attrs[column] = values[int(rng.integers(len(values)))]
    return attrs


def synth_caption(attrs: dict, rng: np.random.Generator) -> str:
    """One of the kind's caption templates, filled with the clip's attributes."""
    loud = attrs["loudness"]
    words = {"loud": loud, "loud_adv": LOUDNESS_ADVERB[loud], **attrs}
    kind = attrs["kind"]
    if kind == "siren":
        words["pace"] = {"slow": "slowly", "fast": "quickly"}[attrs["tempo"]]
    elif kind == "sweep":
        direction = {"rising": "upward", "falling": "downward"}[attrs["variant"]]
        words["direction"] = direction
        words["sweeps"] = (
            f"slow {attrs['variant']} sweep"
            if attrs["tempo"] == "slow"
            else f"fast repeated {attrs['variant']} sweeps"
        )
        words["again"] = "once, slowly" if attrs["tempo"] == "slow" else "again and again"
    elif kind == "beeps":
        count = attrs["count"]
        words.update(
            count_word=_COUNT_WORDS[count - 1],
            times=_TIMES[count - 1],
            beeps="beep" if count == 1 else "beeps",
        )
    elif kind in ("ticking", "clicks"):
        words["pace"] = {"slow": "slowly", "fast": "quickly"}[attrs["tempo"]]
        words["density"] = {"slow": "sparse", "fast": "rapid"}[attrs["tempo"]]
    elif kind == "rumble":
        words["motion"] = {"steady": "that holds steady", "swelling": "that swells and fades"}[
            attrs["variant"]
        ]
    templates = _TEMPLATES[kind]
    return templates[int(rng.integers(len(templates)))].format(**words)


_TEMPLATES: dict[str, tuple[str, ...]] = {
    "noise": (
        "{loud} {variant} noise",
        "a steady stream of {loud} {variant} noise",
        "{variant} noise playing {loud_adv}",
    ),
    "siren": (
        "a {loud} {register}-pitched siren wailing {pace}",
        "a {register} siren rising and falling {pace}, played {loud_adv}",
        "a {tempo} {register} siren, {loud}",
    ),
    "sweep": (
        "{sweeps} played {loud_adv}",
        "a {loud} tone sweeping {direction} {again}",
        "{loud} {sweeps}",
    ),
    "beeps": (
        "{count_word} short {register} {beeps}, played {loud_adv}",
        "a {register}-pitched tone beeps {times}, {loud_adv}",
        "{count_word} {loud} short {register} {beeps}",
    ),
    "ticking": (
        "a clock ticking {pace} and {loud_adv}",
        "{loud} {tempo} ticking",
        "the {tempo} {loud} ticking of a clock",
    ),
    "clicks": (
        "{loud} {density} clicks",
        "{density} irregular clicks, played {loud_adv}",
        "a {loud} crackle of {density} clicks",
    ),
    "rumble": (
        "a {loud} {variant} low rumble",
        "a deep {loud} rumble {motion}",
        "low rumble, {variant} and {loud}",
    ),
}


def render_synth(attrs: dict, rng: np.random.Generator, sample_rate: int, n: int) -> np.ndarray:
    """Render one synthesised clip.

    Args:
        attrs: a dict from :func:`sample_synth_attributes` (plus ``loudness``, unused here).
        rng: the clip's random stream.
        sample_rate: Hz.
        n: number of samples.

    Returns:
        ``(n,)`` float64, not normalised.
    """
    return _RENDERERS[attrs["kind"]](attrs, rng, sample_rate, n)


def _shaped_noise(rng: np.random.Generator, n: int, sample_rate: int, alpha: float) -> np.ndarray:
    # Shaping white noise's spectrum by f^(-alpha/2) in amplitude gives power ~ 1/f^alpha.
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.maximum(np.fft.rfftfreq(n, 1.0 / sample_rate), _NOISE_FLOOR_HZ)
    spectrum *= freqs ** (-alpha / 2)
    spectrum[0] = 0.0  # no DC offset
    return np.fft.irfft(spectrum, n)


def _noise(attrs: dict, rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    return _shaped_noise(rng, n, sr, _NOISE_ALPHA[attrs["variant"]])


def _tone(freq_hz: np.ndarray, sr: int, harmonics: tuple[float, ...] = (1.0,)) -> np.ndarray:
    """A tone following an instantaneous-frequency track; ``harmonics[k]`` weights (k+1)·f."""
    phase = 2 * np.pi * np.cumsum(freq_hz) / sr
    out = np.zeros_like(freq_hz)
    for k, weight in enumerate(harmonics, start=1):
        if k * freq_hz.max() < sr / 2:  # drop harmonics that would alias
            out += weight * np.sin(k * phase)
    return out


def _siren(attrs: dict, rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    t = np.arange(n) / sr
    lfo = np.sin(2 * np.pi * _SIREN_RATE_HZ[attrs["tempo"]] * t + rng.uniform(0, 2 * np.pi))
    freq = _SIREN_HZ[attrs["register"]] * 2.0 ** (_SIREN_DEPTH_OCT * lfo)
    # Odd harmonics at 1/k: a square-ish, penetrating timbre rather than a flute-like sine.
    return _tone(freq, sr, harmonics=(1.0, 0.0, 1 / 3, 0.0, 1 / 5))


def _sweep(attrs: dict, rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    lo, hi = _SWEEP_HZ[0], min(_SWEEP_HZ[1], 0.45 * sr)
    sweeps = _SWEEPS_PER_CLIP[attrs["tempo"]]
    pos = (np.arange(n) * sweeps / n) % 1.0  # position within the current sweep, 0 -> 1
    if attrs["variant"] == "falling":
        pos = 1.0 - pos
    tone = _tone(lo * (hi / lo) ** pos, sr)  # exponential: equal time per octave, as heard
    # Ramp each sweep in and out: the jump back to the start would otherwise splash a click.
    edges = np.array_split(np.arange(n), sweeps)
    return tone * np.concatenate([_ramped(len(e), sr) for e in edges])


def _ramped(length: int, sr: int) -> np.ndarray:
    ramp = min(int(_RAMP_S * sr), length // 2)
    env = np.ones(length)
    edge = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / max(ramp, 1))
    env[:ramp], env[length - ramp :] = edge, edge[::-1]
    return env


def _beeps(attrs: dict, rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    count = attrs["count"]
    period = min(_BEEP_PERIOD_S, n / sr / (count + 0.5))  # squeeze to fit a very short clip
    beep_len = int(min(_BEEP_S, 0.5 * period) * sr)
    slack = n / sr - count * period
    start = rng.uniform(0.1 * slack, 0.9 * slack)
    t = np.arange(beep_len) / sr
    beep = np.sin(2 * np.pi * _BEEP_HZ[attrs["register"]] * t) * _ramped(beep_len, sr)
    out = np.zeros(n)
    for j in range(count):
        i0 = int((start + j * period) * sr)
        out[i0 : i0 + beep_len] += beep[: n - i0]
    return out


def _impulses(times_s: np.ndarray, amps: np.ndarray, kernel: np.ndarray, sr: int, n: int):
    out = np.zeros(n)
    for t0, amp in zip(times_s, amps):
        i0 = int(t0 * sr)
        seg = kernel[: n - i0]
        out[i0 : i0 + len(seg)] += amp * seg
    return out


def _ticking(attrs: dict, rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    period = _TICK_PERIOD_S[attrs["tempo"]]
    times = np.arange(rng.uniform(0, period), n / sr, period)
    t = np.arange(int(0.03 * sr)) / sr
    decay = np.exp(-t / 0.004)  # a 4 ms ring: a hard, woody tick
    out = np.zeros(n)
    for j, freq in enumerate(_TICK_HZ):
        kernel = np.sin(2 * np.pi * freq * t) * decay + 0.5 * rng.standard_normal(len(t)) * decay
        mine = times[j :: len(_TICK_HZ)]
        out += _impulses(mine, np.ones(len(mine)), kernel, sr, n)
    return out


def _clicks(attrs: dict, rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    count = max(1, int(rng.poisson(_CLICK_RATE_HZ[attrs["tempo"]] * n / sr)))
    times = np.sort(rng.uniform(0, n / sr, count))
    amps = rng.uniform(0.3, 1.0, count) * rng.choice((-1.0, 1.0), count)
    t = np.arange(int(0.003 * sr)) / sr
    kernel = rng.standard_normal(len(t)) * np.exp(-t / 0.0005)  # a sub-millisecond snap
    return _impulses(times, amps, kernel, sr, n)


def _rumble(attrs: dict, rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    spectrum = np.fft.rfft(_shaped_noise(rng, n, sr, _NOISE_ALPHA["brown"]))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    spectrum /= 1.0 + (freqs / _RUMBLE_CUTOFF_HZ) ** 4  # 24 dB/octave low-pass
    noise = np.fft.irfft(spectrum, n)
    t = np.arange(n) / sr
    hum = np.sin(2 * np.pi * rng.uniform(*_RUMBLE_TONE_HZ) * t + rng.uniform(0, 2 * np.pi))
    out = noise / (np.std(noise) + 1e-12) + 0.5 * hum
    if attrs["variant"] == "swelling":
        out *= np.sin(np.pi * t / t[-1]) ** 2  # one swell up and back down over the clip
    return out


_RENDERERS: dict[str, Callable[[dict, np.random.Generator, int, int], np.ndarray]] = {
    "noise": _noise,
    "siren": _siren,
    "sweep": _sweep,
    "beeps": _beeps,
    "ticking": _ticking,
    "clicks": _clicks,
    "rumble": _rumble,
}
