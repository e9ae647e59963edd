"""Batch generation and the pyfunc starting from clips: inpainting, continuation and
audio-to-audio rows beside plain ones in one caption file; a clip that cannot be read is its
row's reject, never the job's failure."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from mlflow.exceptions import MlflowException

from lafma.audio.io import load_audio
from lafma.bundle import load_bundle
from lafma.data.captions import plan_generation
from pipelines.core.limits import ClipLimits, check_request
from pipelines.generation import _hash, row_hash, run_generation
from pipelines.serving import generate_frame
from tests.pipelines.test_generate import write_csv
from tests.pipelines.test_generation_plan import make_bundle, settings

PCM = 1 / 2**15  # a wav holds 16-bit samples
# Clips batched otherwise than a reference generation differ by float rounding (CPU kernels
# choose their blocking by batch size); well under one PCM step after peak normalisation.
BATCHING = 1e-5


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    return make_bundle(tmp_path_factory.mktemp("clips") / "bundle", 0)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    """One second at 22.05 kHz (not the model's rate): a rising tone, then noise."""
    path = tmp_path_factory.mktemp("input") / "in.wav"
    sr = 22050
    t = np.arange(sr) / sr
    wave = 0.4 * np.sin(2 * np.pi * (300 + 400 * t) * t)
    wave[sr // 2:] = 0.2 * np.random.default_rng(1).standard_normal(sr - sr // 2)
    sf.write(path, wave.astype(np.float32), sr)
    return path


def read_wav(path: Path) -> torch.Tensor:
    return torch.from_numpy(sf.read(path, dtype="float32")[0])


def test_plain_rows_hash_as_they_did_before_clips_and_candidates_existed():
    """An older plan.json's row hashes: a job planned then still resumes."""
    rows, _ = plan_generation([{"id": "a", "caption": "a bell", "seed": 4}], job_seed=0, steps=2, guidance=3.0,
                              solver="euler", duration=1.28)
    r = rows[0]
    assert row_hash(r) == _hash([r.id, r.name, r.caption, 4, 2, 3.0, "euler", 1.28])


def test_a_caption_file_mixes_inpainting_audio_to_audio_and_plain_rows(ray_local, bundle, clip_file, tmp_path):
    folder = clip_file.parent
    rows = [
        {"id": "plain", "caption": "a bell rings", "seed": 1},
        {"id": "inpaint", "caption": "a dog barks", "seed": 2, "audio": "in.wav", "start": 0.3, "end": 0.6},
        {"id": "a2a", "caption": "rain on a roof", "seed": 3, "audio": str(clip_file), "strength": 0.5},
        {"id": "continue", "caption": "wind", "seed": 4, "audio": "in.wav", "start": 1.0, "end": 1.28,
         "duration": 1.28},
        {"id": "missing", "caption": "a bell", "audio": "nope.wav", "strength": 0.5},
        {"id": "web", "caption": "a bell", "audio": "http://127.0.0.1:9/x.wav", "strength": 0.5},
        {"id": "backwards", "caption": "a bell", "audio": "in.wav", "start": 0.6, "end": 0.3},
    ]
    captions = write_csv(folder / "captions.csv", rows)  # relative clips lie beside the caption file
    out = tmp_path / "out"
    summary = run_generation(str(captions), str(out), settings(bundle), root=str(tmp_path))
    assert summary["rows"] == 4 and summary["rejected"] == 3
    assert summary["reasons"] == {"bad_region": 1, "missing": 1, "scheme_not_allowed": 1}
    rejects = {r["id"]: r for r in pq.read_table(out / "rejects").to_pylist()}
    assert rejects["missing"]["audio_uri"] == str(folder / "nope.wav") and rejects["missing"]["reason"] == "missing"
    assert "http" in rejects["web"]["detail"]
    assert not (out / "wavs" / "missing.wav").exists()

    got = {r["id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    digest = hashlib.sha256(clip_file.read_bytes()).hexdigest()
    assert (got["inpaint"]["audio"], got["inpaint"]["audio_sha256"]) == (str(clip_file), digest)
    assert (got["inpaint"]["start"], got["inpaint"]["end"], got["inpaint"]["strength"]) == (0.3, 0.6, None)
    assert got["a2a"]["strength"] == 0.5 and got["a2a"]["start"] is None
    assert got["plain"]["audio"] is None and got["plain"]["candidates"] is None
    # A row without a duration lasts as long as its clip; continuation as long as it asked.
    assert got["inpaint"]["duration"] == pytest.approx(1.0) and got["continue"]["duration"] == 1.28
    assert got["a2a"]["nfe"] == 2 and got["plain"]["nfe"] == 4  # strength 0.5: half the 2 steps, guided

    # Each row is what the library makes of the same clip and seed ...
    pipe = load_bundle(bundle)
    clip = load_audio(str(clip_file), pipe.sample_rate)
    asked = {"plain": {}, "inpaint": {"audio": clip, "regenerate": (0.3, 0.6)}, "a2a": {"audio": clip, "strength": 0.5},
             "continue": {"audio": clip, "regenerate": (1.0, 1.28), "duration": 1.28}}
    library = {}
    for rid, extra in asked.items():
        library[rid] = pipe.generate([got[rid]["caption"]], seeds=[got[rid]["seed"]], steps=2, **extra)
        wav = read_wav(out / got[rid]["path"])
        assert wav.shape == library[rid].audio[0].shape, rid
        torch.testing.assert_close(wav, library[rid].audio[0].clamp(-1, 1), rtol=0, atol=PCM + BATCHING)
    # ... whose latent outside the region is the input's VAE round trip, exactly (sigma_min = 0).
    for rid, (start, end) in (("inpaint", (0.3, 0.6)), ("continue", (1.0, 1.28))):
        duration = got[rid]["duration"]
        shape = pipe.latent_shape(duration)
        given = pipe.encode_audio(clip[None], shape).cpu()
        keep = torch.ones(shape[1], dtype=torch.bool)
        keep[pipe.latent_frames(start, end, shape[1])] = False
        assert 0 < keep.sum() < shape[1]
        assert torch.equal(library[rid].latents[:, :, keep], given[:, :, keep]), rid
        assert not torch.allclose(library[rid].latents[:, :, ~keep], given[:, :, ~keep], atol=1e-3), rid

    # The pyfunc, given the same clip's bytes, makes the batch job's audio for the same rows and seeds.
    data = base64.b64encode(clip_file.read_bytes()).decode()
    frame = pd.DataFrame({"caption": ["a dog barks", "rain on a roof", "a bell rings"], "seed": [2, 3, 1],
                          "steps": [2, 2, 2], "audio_b64": [data, data, None], "start": [0.3, None, None],
                          "end": [0.6, None, None], "strength": [None, 0.5, None]})
    served = generate_frame(pipe, frame)
    for (_, row), rid in zip(served.iterrows(), ("inpaint", "a2a", "plain")):
        torch.testing.assert_close(torch.from_numpy(row["audio"]).clamp(-1, 1), read_wav(out / got[rid]["path"]),
                                   rtol=0, atol=PCM + BATCHING)
        assert row["nfe"] == got[rid]["nfe"] and row["duration"] == pytest.approx(got[rid]["duration"])
    assert list(served["audio_sha256"][:2]) == [digest, digest] and served["start"][0] == 0.3

    # Re-run: resumed, nothing regenerated, the same rejects.
    again = run_generation(str(captions), str(out), settings(bundle), root=str(tmp_path))
    assert again["generated_now"] == 0 and again["rows"] == 4 and again["rejected"] == 3
    assert json.loads((out / "plan.json").read_text())["row_count"] == 5  # "missing" is planned, refused when read


def test_the_pyfunc_refuses_clips_it_may_not_or_cannot_read(bundle, clip_file, tmp_path):
    pipe = load_bundle(bundle)
    data = base64.b64encode(clip_file.read_bytes()).decode()
    local = ClipLimits(max_bytes=2**20, allowed_schemes=("file",))

    def refused(frame: pd.DataFrame, words: list[str], limits: ClipLimits | None = None) -> None:
        with pytest.raises((ValueError, MlflowException)) as e:
            check_request(frame, clip_limits=limits)
            generate_frame(pipe, frame, clip_limits=limits)
        for w in words:
            assert w in str(e.value), (words, str(e.value))

    one = {"caption": ["a bell"], "seed": [1], "steps": [2]}
    # A served model reads no path a client names, unless its operator allows a scheme.
    refused(pd.DataFrame({**one, "audio": [str(clip_file)], "strength": [0.5]}), ["audio", "reads none", "audio_b64"])
    refused(pd.DataFrame({**one, "audio": [str(clip_file)], "strength": [0.5]}), ["not allowed"],
            ClipLimits(max_bytes=2**20, allowed_schemes=("s3",)))
    refused(pd.DataFrame({**one, "audio": [str(tmp_path / "nope.wav")], "strength": [0.5]}), ["missing"], local)
    refused(pd.DataFrame({**one, "audio_b64": [data], "audio": [str(clip_file)], "strength": [0.5]}), ["one"], local)
    refused(pd.DataFrame({**one, "audio_b64": [data], "strength": [0.5]}), ["MiB", "audio_b64"],
            ClipLimits(max_bytes=1000))
    refused(pd.DataFrame({**one, "audio_b64": ["not base64!"], "strength": [0.5]}), ["base64"])
    noise = base64.b64encode(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()).decode()
    refused(pd.DataFrame({**one, "audio_b64": [noise], "strength": [0.5]}), ["undecodable"])
    refused(pd.DataFrame({**one, "audio_b64": [data], "start": [0.5], "end": [0.2]}), ["bad_region"])
    refused(pd.DataFrame({**one, "audio_b64": [data], "start": [5.0], "end": [6.0]}), ["bad_region", "past the clip"])
    refused(pd.DataFrame({**one, "strength": [0.5]}), ["no_audio"])
    refused(pd.DataFrame({**one, "candidates": [17]}), ["candidates", "[1, 16]"])
    refused(pd.DataFrame({"caption": ["a"] * 10, "candidates": [16] * 10}), ["160 clips", "at most 128"])
    refused(pd.DataFrame({**one, "candidates": [2]}), ["scorer"])
    # Within the limits, with the file scheme allowed: read like the batch job reads it.
    ok = generate_frame(pipe, pd.DataFrame({**one, "audio": [str(clip_file)], "strength": [0.5]}), clip_limits=local)
    assert ok["audio_sha256"][0] == hashlib.sha256(clip_file.read_bytes()).hexdigest()
