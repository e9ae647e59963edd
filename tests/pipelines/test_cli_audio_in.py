"""``lafma generate --audio`` as a user runs it: inpainting and audio-to-audio from a wav file."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from lafma.audio.io import load_audio
from lafma.bundle import load_bundle
from tests.pipelines.test_generation_plan import make_bundle


def lafma(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.lafma_cli", "generate", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_generate_regenerates_a_region_of_a_wav_and_says_why_when_it_cannot(tmp_path):
    bundle = make_bundle(tmp_path / "bundle", 0)
    source = tmp_path / "in.wav"
    t = np.arange(int(1.28 * 22050)) / 22050  # another rate: read and resampled to the model's
    sf.write(source, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22050)
    out = tmp_path / "out.wav"
    run = lafma("rain on a roof", "-o", str(out), "--model", bundle, "--audio", str(source),
                "--regenerate", "0.4:0.8", "--seed", "3", "--steps", "2")
    assert run.returncode == 0, run.stderr[-2000:]
    pipe = load_bundle(bundle)
    want = pipe.generate(["rain on a roof"], seeds=[3], steps=2, audio=load_audio(str(source), pipe.sample_rate),
                         regenerate=(0.4, 0.8)).audio[0]
    got, rate = sf.read(out, dtype="float32")
    assert rate == pipe.sample_rate and len(got) == len(want)
    assert np.abs(got - want.clamp(-1, 1).numpy()).max() <= 1 / 2**15 + 1e-6  # 16-bit PCM
    assert not torch.equal(torch.from_numpy(got), torch.zeros(len(got)))

    for args, message in [(["--strength", "0.5"], "need --audio"),
                          (["--audio", str(source), "--regenerate", "0.8:0.4"], "start < end"),
                          (["--audio", str(source), "--regenerate", "half"], "expected START:END"),
                          (["--audio", str(tmp_path / "missing.wav")], "cannot read")]:
        bad = lafma("rain", "-o", str(tmp_path / "bad.wav"), "--model", bundle, *args)
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr[-1000:])
