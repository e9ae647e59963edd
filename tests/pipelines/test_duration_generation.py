"""Generation from a model conditioned on duration, as batch jobs, the served model and
``lafma generate`` reach it: any duration up to its clip length, a longer one refused with its
reason; a model without the embedding plans every duration, as before."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from lafma.bundle import load_bundle
from lafma.data.captions import GenerationRow
from pipelines.generation import model_defaults
from pipelines.row_generation import Clip, generate_rows
from pipelines.serving import generate_frame
from tests.lafma.test_bundle import duration_bundle

ON = ["unet.duration_embedding=true"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    return duration_bundle(tmp_path_factory.mktemp("duration"), ON)


def test_a_batch_job_plans_with_the_model_s_trained_maximum(bundle, tmp_path):
    assert model_defaults(bundle, str(tmp_path))["max_duration"] == 1.28
    plain = Path(duration_bundle(tmp_path))
    assert model_defaults(str(plain), str(tmp_path))["max_duration"] is None
    manifest = json.loads((plain / "lafma.json").read_text())
    del manifest["config"]["unet"]["duration_embedding"]  # a bundle written before the key existed
    (plain / "lafma.json").write_text(json.dumps(manifest))
    assert model_defaults(str(plain), str(tmp_path))["max_duration"] is None


def test_a_row_longer_than_the_model_learned_is_its_own_reject(bundle):
    pipe = load_bundle(bundle)
    short = GenerationRow("short", "short", "a bell", 1, 2, 3.0, "euler", 0.32)
    long = GenerationRow("long", "long", "a bell", 1, 2, 3.0, "euler", 2.0)
    # A row from a clip lasts as long as its clip: known only once the clip is read.
    from_clip = GenerationRow("clip", "clip", "a bell", 1, 2, 3.0, "euler", None, audio="in.wav", strength=0.5)
    results, rejected = generate_rows(pipe, [short, long, from_clip], {"clip": Clip(torch.zeros(32000), "sha")})
    assert [r.row.id for r in results] == ["short"] and results[0].pick.audio.shape[-1] == round(0.32 * 16000)
    assert {e.row_id: e.reason for e in rejected} == {"long": "bad_duration", "clip": "bad_duration"}
    assert "trained maximum, 1.28 s" in rejected[0].detail
    # The served model refuses it as a bad request that names the row and the reason.
    with pytest.raises(ValueError, match=r"row-000002: bad_duration \(2.0 s is longer than the model's trained"):
        generate_frame(pipe, pd.DataFrame({"caption": ["a bell", "a bell"], "duration": [0.64, 2.0]}))
    out = generate_frame(pipe, pd.DataFrame({"caption": ["a bell"], "duration": [0.64]}))
    assert out["duration"].tolist() == [0.64]


@pytest.mark.slow
def test_lafma_generate_makes_any_duration_up_to_the_maximum_and_says_why_not_past_it(bundle, tmp_path):
    def lafma(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipelines.lafma_cli", "generate", "a bell rings", "--model",
                               bundle, "--seed", "3", "--steps", "2", *args], capture_output=True, text=True, timeout=300)

    run = lafma("-o", str(tmp_path / "short.wav"), "--duration", "0.32")
    assert run.returncode == 0, run.stderr[-2000:]
    audio, rate = sf.read(tmp_path / "short.wav", dtype="float32")
    assert rate == 16000 and len(audio) == round(0.32 * 16000) and np.abs(audio).max() > 0
    bad = lafma("-o", str(tmp_path / "long.wav"), "--duration", "5")
    assert bad.returncode == 2 and "5 s is longer than this model's trained maximum, 1.28 s" in bad.stderr, bad.stderr
    assert not (tmp_path / "long.wav").exists()
