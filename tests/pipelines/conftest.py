"""Shared helpers of the pipeline tests: a manifest full of hostile inputs with the outcome each
must have, a copy of the trained store to change, waits on a run's events. The session's S3
server, Ray and trained store are fixtures of tests/conftest.py (the benchmark tests use them
too)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import BUCKET as BUCKET  # tests import it from here

SR = 16000


def copy_store(src: Path, dst: Path) -> Path:
    """A copy of a storage root that a test may change without touching the original.

    MLflow's sqlite store records absolute artifact locations (each experiment's, each run's,
    each model version's source); they are moved to the copy too, so nothing logged to the copy
    lands in the original's ``mlartifacts/``. Ray Train's run state names its checkpoints
    relative to the run directory, and every stage's output path derives from the root, so a
    stage run on the copy writes only there (absolute paths inside markers, such as an export's
    weights, are only read).
    """
    shutil.copytree(src, dst)
    db = sqlite3.connect(dst / "mlflow.db")
    with db:
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                              ("logged_models", "artifact_location"), ("model_versions", "source"),
                              ("model_versions", "storage_location")):
            db.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (str(src), str(dst)))
    db.close()
    return dst


def wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Poll ``condition`` until it holds, while ``proc`` runs: the point a test kills a run at is
    an event the run reports (``LAFMA_TEST_HOLD``, pipelines/core/stage.py), not a time window.
    Fails, killing ``proc``'s process group, if ``proc`` exits or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            pytest.fail(f"never happened: {what} (exit code {proc.returncode})")
        time.sleep(0.2)


def registered(store: Path, job: str, step: int) -> bool:
    """Whether Ray Train registered ``job``'s step-``step`` checkpoint as its latest: its run
    snapshot (rewritten after each registration) names it. The checkpoint's directory appears
    earlier, while its files upload, and a resumed run ignores it until then."""
    for snapshot in store.glob(f"ray_results/{job}-*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except ValueError:  # being written
            return False
        return latest.get("checkpoint_dir_name") == f"checkpoint_{step:09d}"
    return False


def tone(freq: float, seconds: float, sr: int = SR, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x * (0.5 + 0.1 * c) for c in range(channels)], axis=1) if channels > 1 else x


@dataclass
class Hostile:
    manifest: Path
    good_sources: set[str]
    expected_rejects: dict[str, str]  # id -> reason
    expected_rows: int
    long_caption_id: str
    files: list[Path] = field(default_factory=list)


def make_hostile(root: Path) -> Hostile:
    """Every bad input the data contract names, beside unusual but valid audio."""
    audio = root / "audio"
    audio.mkdir(parents=True)
    good = {
        "u8_8k": ("u8_8k.wav", tone(300, 1.0, 8000), 8000, "PCM_U8", "WAV"),
        "s16_stereo_22k": ("s16.wav", tone(400, 1.0, 22050, 2), 22050, "PCM_16", "WAV"),
        "s24_6ch_44k": ("s24.wav", tone(500, 1.0, 44100, 6), 44100, "PCM_24", "WAV"),
        "float_48k": ("f32.wav", tone(600, 1.0, 48000), 48000, "FLOAT", "WAV"),
        "flac_48k": ("a.flac", tone(700, 1.0, 48000, 2), 48000, "PCM_16", "FLAC"),
        "ogg_44k": ("a.ogg", tone(800, 1.0, 44100, 2), 44100, "VORBIS", "OGG"),
        "long": ("long.wav", tone(900, 12.0), SR, "PCM_16", "WAV"),  # 12 s -> 8 segments (max)
    }
    for name, data, sr, subtype, fmt in good.values():
        sf.write(audio / name, data, sr, subtype=subtype, format=fmt)
    ok = audio / "ok.wav"
    sf.write(ok, tone(1000, 1.0), SR)
    (audio / "zero.wav").write_bytes(b"")
    (audio / "truncated.wav").write_bytes(ok.read_bytes()[:40])
    (audio / "random.wav").write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    (audio / "notes.wav").write_text("not audio at all\n" * 100)
    x = tone(440, 1.0)
    x[50] = np.nan
    sf.write(audio / "nan.wav", x, SR, subtype="FLOAT")
    x = tone(440, 1.0)
    x[70] = np.inf
    sf.write(audio / "inf.wav", x, SR, subtype="FLOAT")
    sf.write(audio / "silent.wav", np.zeros(SR, np.float32), SR)
    sf.write(audio / "tiny.wav", tone(440, 0.03), SR)  # 480 samples < one 1024-sample frame
    bad_audio = {"missing": ("nope.wav", "missing"), "zero": ("zero.wav", "empty"),
                 "truncated": ("truncated.wav", "undecodable"), "random": ("random.wav", "undecodable"),
                 "text": ("notes.wav", "undecodable"), "nan": ("nan.wav", "non_finite"),
                 "inf": ("inf.wav", "non_finite"), "silent": ("silent.wav", "silent"),
                 "tiny": ("tiny.wav", "too_short")}
    lines = [b"id,audio,caption,split"]
    for rid, (name, *_rest) in good.items():
        lines.append(f"{rid},audio/{name},a clear tone called {rid},train".encode())
    for rid, (name, _) in bad_audio.items():
        lines.append(f"{rid},audio/{name},a caption for {rid},train".encode())
    long_caption = "a very long caption " * 300
    lines += [
        b"no_caption,audio/ok.wav,,train",
        b'blank_caption,audio/ok.wav,"   ",train',
        b"bad_utf8,audio/ok.wav,a caption with \xff\xfe bytes,train",
        f"long_caption,audio/ok.wav,{long_caption},validation".encode(),
        b"dup,audio/ok.wav,first of two,test",
        b"dup,audio/ok.wav,second of two,test",
    ]
    manifest = root / "manifest.csv"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    rejects = {rid: reason for rid, (_, reason) in bad_audio.items()}
    rejects.update(no_caption="missing_caption", blank_caption="missing_caption", bad_utf8="caption_not_utf8",
                   dup="duplicate_id")
    sources = set(good) | {"long_caption", "dup"}
    return Hostile(manifest, sources, rejects, expected_rows=len(sources) - 1 + 8, long_caption_id="long_caption")


@pytest.fixture
def hostile(tmp_path) -> Hostile:
    return make_hostile(tmp_path / "in")
