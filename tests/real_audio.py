"""A small corpus of real recordings for the tests: the sound files three Debian packages ship.

``alsa-utils`` (a voice naming each speaker, and a noise burst), ``sound-theme-freedesktop``
(desktop sounds and a voice naming audio channels) and ``oxygen-sounds`` (KDE's desktop sounds):
94 files of real audio at 8, 22.05, 44.1, 48 and 96 kHz, mono and stereo, WAV and Ogg Vorbis,
0.06 to 13.4 s long. ``apt-get download`` fetches the packages (no root needed once the
package lists exist) and ``dpkg-deb -x`` unpacks them into the repository's ``.cache/``; a
machine that cannot do either fails the tests that need them, with the reason, instead of
skipping them.

Captions come from the file names ("Oxygen-Im-Message-In" is "an instant message in sound"),
which is enough to train on and to check that evaluation works on data without attributes.
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
from pathlib import Path

PACKAGES = ("alsa-utils", "sound-theme-freedesktop", "oxygen-sounds")
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "real-audio"
SUFFIXES = (".wav", ".ogg", ".oga")
_WORDS = {"im": "instant message", "sys": "system", "k3b": "disc burning", "app": "application",
          "foes": "failed", "msg": "message", "irc": "chat"}


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, timeout=300)
    except FileNotFoundError as e:
        raise RuntimeError(f"{cmd[0]} is not installed: the real-audio tests need Debian's apt and dpkg") from e
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{' '.join(cmd)} failed: {e.stderr.strip()[-500:]}") from e


def real_sounds(cache: Path = CACHE) -> list[Path]:
    """The packages' sound files (downloaded and unpacked once into ``cache``), sorted."""
    root = cache / "root"
    done = cache / "_COMPLETE"
    if not done.exists():
        debs = cache / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        try:
            _run(["apt-get", "download", *PACKAGES], debs)
        except RuntimeError:
            _run(["apt-get", "update", "-qq"], debs)  # package lists missing or stale: fetch them once
            _run(["apt-get", "download", *PACKAGES], debs)
        shutil.rmtree(root, ignore_errors=True)
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(root)], cache)
        done.write_text("\n".join(sorted(p.name for p in debs.glob("*.deb"))) + "\n")
    files = sorted(p for p in (root / "usr" / "share" / "sounds").rglob("*") if p.suffix in SUFFIXES)
    if len(files) < 90:
        raise RuntimeError(f"expected the 94 sound files of {', '.join(PACKAGES)} under {root}; found {len(files)}")
    return files


def caption_for(path: Path) -> str:
    """A caption from the file name: what the voice says, or which sound it is."""
    stem = path.stem
    if path.parent.name == "alsa":  # Front_Center.wav: a voice names the speaker
        return "white noise" if stem == "Noise" else f"a voice says {stem.replace('_', ' ').lower()}"
    if stem.startswith("audio-channel-"):
        return "a voice says " + stem.removeprefix("audio-channel-").replace("-", " ")
    words = [w.lower() for w in re.split(r"[-_]", stem) if w and w.lower() != "oxygen"]
    words = " ".join(_WORDS.get(w, w) for w in words)
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words} sound"


def write_csv(files: list[Path], out: Path) -> Path:
    """A two-column manifest (``audio,caption``, absolute paths, no split column)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["audio", "caption"])
        w.writerows([str(p), caption_for(p)] for p in files)
    return out


def write_audiofolder(files: list[Path], out: Path, test_every: int = 6) -> Path:
    """The same files as a Hugging Face audiofolder: ``train/`` and ``test/`` sub-folders (every
    ``test_every``-th file in test), each with its ``metadata.csv`` (``file_name,caption``)."""
    for split in ("train", "test"):
        (out / split).mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for i, p in enumerate(files):
        split = "test" if i % test_every == 0 else "train"
        name = f"{p.parent.name}-{p.name}"  # names repeat across the packages' folders
        shutil.copyfile(p, out / split / name)
        rows[split].append((name, caption_for(p)))
    for split, items in rows.items():
        with (out / split / "metadata.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "caption"])
            w.writerows(items)
    return out
