"""benchmarks/audiocaps_like.py: the manifest reader takes its corpus whole, one to five
captions a clip, and the same seed writes the same corpus."""

from __future__ import annotations

import numpy as np
import soundfile as sf

from benchmarks.audiocaps_like import write_corpus
from lafma.data.manifest import read_manifest


def test_every_clip_reads_back_with_its_captions_and_real_audio(tmp_path):
    manifest = write_corpus(tmp_path / "a", 40, seconds=2.0, rate=8000, seed=3)
    parsed = read_manifest(str(manifest))
    assert parsed.layout == "clotho" and not parsed.rejects
    assert len(parsed.rows) == 40
    counts = [len(r["captions"]) for r in parsed.rows]
    assert set(counts) == {1, 2, 3, 4, 5}  # every count drawn at 40 clips with this seed
    assert {r["split"] for r in parsed.rows} <= {"train", "validation", "test"}
    audio, rate = sf.read(parsed.rows[0]["audio_uri"])
    assert rate == 8000 and audio.shape == (16000,)
    assert 0.05 < np.abs(audio).max() <= 0.9  # signal, not silence, and not clipped


def test_the_same_seed_writes_the_same_corpus(tmp_path):
    one, two = write_corpus(tmp_path / "1", 5, seconds=1.0, seed=7), write_corpus(tmp_path / "2", 5, seconds=1.0, seed=7)
    assert one.read_bytes() == two.read_bytes()
    assert (one.parent / "audio" / "000004.wav").read_bytes() == (two.parent / "audio" / "000004.wav").read_bytes()
