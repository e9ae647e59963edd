"""An AudioCaps-shaped corpus of any size: N clips of 10 s with one to five captions each.

    python benchmarks/audiocaps_like.py /tmp/scale/n500 --clips 500 [--seconds 10] [--rate 16000]

Writes ``audio/<i>.wav`` (16-bit PCM, mono) and ``manifest.csv`` in the Clotho layout that
:mod:`lafma.data.manifest` reads (``file_name, caption_1 … caption_5``, plus ``split``): every
clip's captions in one row, the unused caption cells empty. AudioCaps' own CSV has one row per
caption, which the reader turns into one clip per caption; this layout keeps the one-clip,
several-captions shape that the text and latents stages join on.

The audio is real signal, not silence (the audio stage rejects silent clips): a few tones and
noise bursts with their own envelopes. Captions come from a small grammar with ~10^5
sentences, so at these sizes most are unique and a few repeat, as AudioCaps' do. Everything
is drawn from ``seed``: the same arguments write the same bytes.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import soundfile as sf

SOURCES = ["a dog", "a man", "a woman", "a child", "a crowd", "a car", "a motorcycle", "a train", "a bird",
           "birds", "rain", "the wind", "water", "a bell", "an engine", "a siren", "a clock", "a cat",
           "a baby", "people", "a helicopter", "a drill", "a sheep", "frogs", "an alarm"]
ACTIONS = ["barks", "speaks", "laughs", "cries", "cheers", "passes by", "accelerates", "idles", "chirps",
           "falls", "blows", "splashes", "rings", "hums", "wails", "ticks", "meows", "talks", "whistles",
           "beeps"]
PLACES = ["in the distance", "nearby", "outdoors", "in a small room", "on a busy street", "in a field",
          "over a loud hum", "while music plays", "with an echo", "close to the microphone", "in the rain",
          "near a river", "in a large hall", "under heavy wind", "at night"]
ENDINGS = ["", "", "", "repeatedly", "twice", "briefly", "then stops", "several times", "loudly",
           "softly"]
SPLITS = (("train", 0.9), ("validation", 0.05), ("test", 0.05))


def captions_for(rng: np.random.Generator, k: int) -> list[str]:
    """``k`` captions from the grammar (a clip's captions may repeat each other, as people's do)."""
    out = []
    for _ in range(k):
        words = [SOURCES[rng.integers(len(SOURCES))], ACTIONS[rng.integers(len(ACTIONS))],
                 PLACES[rng.integers(len(PLACES))], ENDINGS[rng.integers(len(ENDINGS))]]
        if rng.random() < 0.5:  # a second event, as many AudioCaps captions have
            words += ["and", SOURCES[rng.integers(len(SOURCES))], ACTIONS[rng.integers(len(ACTIONS))]]
        text = " ".join(w for w in words if w)
        out.append(text[0].upper() + text[1:])
    return out


def synth_clip(rng: np.random.Generator, seconds: float, rate: int) -> np.ndarray:
    """(seconds·rate,) float32 in [-1, 1]: tones and noise bursts under random envelopes."""
    n = int(round(seconds * rate))
    t = np.arange(n, dtype=np.float32) / rate
    x = np.zeros(n, np.float32)
    for _ in range(int(rng.integers(1, 4))):  # tones with a slow tremolo
        f, depth, speed = rng.uniform(80, 4000), rng.uniform(0, 0.8), rng.uniform(0.2, 6)
        x += rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * f * t) * (1 - depth * (0.5 + 0.5 * np.sin(2 * np.pi * speed * t)))
    for _ in range(int(rng.integers(1, 6))):  # noise bursts: onset, length and decay drawn per burst
        start, length = int(rng.integers(0, n)), int(rng.uniform(0.05, 1.5) * rate)
        burst = rng.standard_normal(min(length, n - start)).astype(np.float32)
        burst *= np.exp(-np.arange(burst.size, dtype=np.float32) / (rng.uniform(0.02, 0.5) * rate))
        x[start : start + burst.size] += rng.uniform(0.05, 0.5) * burst
    return (x / max(1.0, float(np.abs(x).max()) / 0.9)).astype(np.float32)  # no clipping


def write_corpus(root: Path, clips: int, *, seconds: float = 10.0, rate: int = 16000, seed: int = 0) -> Path:
    """Write ``clips`` wavs and their manifest under ``root``; returns the manifest's path.

    Args:
        root: output folder (created; its ``audio/`` and ``manifest.csv`` are overwritten).
        clips: how many clips.
        seconds: each clip's length.
        rate: sample rate of the files (the audio stage resamples anything else to 16 kHz).
        seed: draws the audio, the captions, their count (one to five) and the split.
    """
    rng = np.random.default_rng(seed)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    names, weights = zip(*SPLITS)
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["file_name", *(f"caption_{j}" for j in range(1, 6)), "split"])
        for i in range(clips):
            name = f"audio/{i:06d}.wav"
            sf.write(root / name, synth_clip(rng, seconds, rate), rate, subtype="PCM_16")
            caps = captions_for(rng, int(rng.integers(1, 6)))
            out.writerow([name, *caps, *[""] * (5 - len(caps)), names[rng.choice(len(names), p=weights)]])
    return manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--clips", type=int, default=500)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rate", type=int, default=16000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(write_corpus(args.root, args.clips, seconds=args.seconds, rate=args.rate, seed=args.seed))


if __name__ == "__main__":
    main()
