"""Best-of-N in the batch job, the CLI and the evaluation: every candidate's seed and score is
recorded, the best-scored clip is kept, one candidate is plain generation bit for bit, and a
model finds the scorer its evaluation saved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from lafma.bundle import load_bundle, read_bundle_manifest
from lafma.config import ConfigError
from lafma.metrics.scoring import candidate_seeds
from lafma.metrics.text_audio import TextAudioProjection
from pipelines.generation import run_generation
from pipelines.scoring import SCORER_TAG, load_scorer, pcm16, save_projection_scorer
from tests.pipelines.test_generate import write_csv
from tests.pipelines.test_generation_plan import make_bundle, settings

ROOT = Path(__file__).parents[2]
CAPTIONS = [{"id": "bell", "caption": "a bell rings", "seed": 10}, {"id": "rain", "caption": "rain on a roof"},
            {"id": "dog", "caption": "a dog barks twice", "seed": 2**31 - 2}]


def make_scorer(folder: Path, bundle: str, seed: int = 0, text_config: dict | None = None) -> str:
    """A projection scorer with random projections over aisfx and the bundle's text encoder
    (or the one ``text_config`` names): the real files and the real embedder, a ranking no one
    trained."""
    from lafma.metrics.embedders.aisfx import AisfxEmbedder, ensure_aisfx_weights

    weights = ensure_aisfx_weights(folder.parent / "weights")
    embedder = AisfxEmbedder(weights)
    text_dim = load_bundle(bundle).text_encoder([""])[0].shape[-1]
    torch.manual_seed(seed)
    projection = TextAudioProjection(embedder.dim, text_dim, dim=16)
    with torch.no_grad():
        for p in projection.parameters():
            p.normal_()
    text = text_config or read_bundle_manifest(bundle)["config"]["text"]
    return save_projection_scorer(str(folder), projection=projection, embedder=embedder, embedder_kind="aisfx",
                                  embedder_weights=str(weights), text_config=text,
                                  fitted_on={"test": "random projections"})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    return make_bundle(tmp_path_factory.mktemp("best") / "bundle", 0)


@pytest.fixture(scope="module")
def scorer(bundle, tmp_path_factory) -> str:
    return make_scorer(tmp_path_factory.mktemp("scorer") / "scorer", bundle)


def test_best_of_n_without_a_scorer_stops_before_any_work(bundle, tmp_path):
    captions = write_csv(tmp_path / "captions.csv", CAPTIONS)
    with pytest.raises(ConfigError, match=r"has none recorded.*--scorer"):
        run_generation(str(captions), str(tmp_path / "out"), settings(bundle, candidates=2), root=str(tmp_path))
    with pytest.raises(ConfigError, match="candidates"):
        run_generation(str(captions), str(tmp_path / "out"), settings(bundle, candidates=17), root=str(tmp_path))
    assert not (tmp_path / "out").exists()
    # Fitted on another text encoder's captions: its text projection would read noise.
    text = {**read_bundle_manifest(bundle)["config"]["text"], "tiny_seed": 7}
    foreign = make_scorer(tmp_path / "foreign", bundle, text_config=text)
    with pytest.raises(ConfigError, match=r"another text encoder.*tiny_seed"):
        run_generation(str(captions), str(tmp_path / "out"), settings(bundle, candidates=2, scorer=foreign),
                       root=str(tmp_path))


def test_the_batch_job_keeps_the_best_scored_candidate_and_records_them_all(ray_local, bundle, scorer, tmp_path):
    captions = write_csv(tmp_path / "captions.csv", CAPTIONS)
    plain = tmp_path / "plain"
    run_generation(str(captions), str(plain), settings(bundle), root=str(tmp_path))

    # One candidate is plain generation, bit for bit, scored when a scorer is given.
    one = tmp_path / "one"
    run_generation(str(captions), str(one), settings(bundle, candidates=1, scorer=scorer), root=str(tmp_path))
    first = {r["id"]: r for r in pq.read_table(one / "manifest.parquet").to_pylist()}
    base = {r["id"]: r for r in pq.read_table(plain / "manifest.parquet").to_pylist()}
    for rid, r in first.items():
        assert (one / r["path"]).read_bytes() == (plain / base[rid]["path"]).read_bytes(), rid
        assert r["seed"] == base[rid]["seed"] and r["kept"] == 0
        assert json.loads(r["candidates"]) == [{"seed": r["seed"], "score": r["score"]}]

    best = tmp_path / "best"
    summary = run_generation(str(captions), str(best), settings(bundle, candidates=3, scorer=scorer),
                             root=str(tmp_path))
    assert summary["rows"] == 3 and summary["scorer"] == scorer
    assert len(json.loads((best / "plan.json").read_text())["settings"]["scorer"]) == 16
    pipe = load_bundle(bundle)
    ranker = load_scorer(scorer, text_encoder=pipe.text_encoder, text_config=None, weights_dir=str(tmp_path / "w"))
    kept_other = 0
    for r in pq.read_table(best / "manifest.parquet").to_pylist():
        listed = json.loads(r["candidates"])
        seeds = [c["seed"] for c in listed]
        assert seeds == candidate_seeds(base[r["id"]]["seed"], 3), r["id"]  # the row's seed, then the next ones
        clips = pipe.generate([r["caption"]] * 3, seeds=seeds, steps=2).audio
        # Each candidate scored as the 16-bit wav it would be written as.
        want = ranker.score(pcm16(clips, pipe.sample_rate), pipe.sample_rate, [r["caption"]] * 3).tolist()
        assert [c["score"] for c in listed] == pytest.approx(want, abs=1e-4)
        k = max(range(3), key=want.__getitem__)
        assert r["kept"] == k and r["seed"] == seeds[k] and r["score"] == listed[k]["score"]
        wav = torch.from_numpy(sf.read(best / r["path"], dtype="float32")[0])
        torch.testing.assert_close(wav, clips[k].clamp(-1, 1), rtol=0, atol=1 / 2**15 + 1e-5)
        # The manifest's score is the one the kept file gets, as the evaluation scores its files.
        assert float(ranker.score(wav[None], pipe.sample_rate, [r["caption"]])) == pytest.approx(r["score"], abs=1e-4)
        kept_other += k != 0
    assert kept_other  # a ranking that always kept the first candidate would test nothing


@pytest.mark.slow
def test_lafma_generate_keeps_its_best_candidate_and_names_them(bundle, scorer, tmp_path):
    out = tmp_path / "best.wav"
    run = subprocess.run([sys.executable, "-m", "pipelines.lafma_cli", "generate", "a bell rings", "-o", str(out),
                          "--model", bundle, "--steps", "2", "--seed", "10", "--candidates", "3", "--scorer", scorer,
                          "--root", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("candidate ")]
    assert [ln.split(",")[0] for ln in lines] == ["candidate 0: seed 10", "candidate 1: seed 11", "candidate 2: seed 12"]
    kept = next(ln for ln in lines if "<- kept" in ln)
    assert f"seed {kept.split('seed ')[1].split(',')[0]}," in run.stdout.splitlines()[-1]
    none = subprocess.run([sys.executable, "-m", "pipelines.lafma_cli", "generate", "a bell", "-o", str(out),
                           "--model", bundle, "--candidates", "2", "--root", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert none.returncode == 2 and "--scorer" in none.stderr, none.stderr[-2000:]


def test_the_evaluation_saves_its_scorer_and_the_registered_model_finds_it(trained, tmp_path):
    """The scorer is the evaluation's own: it scores the stage's generated clips as the stage
    did, a registry URI finds it, and fitting it again from the stage's inputs gives the same."""
    import io

    import numpy as np

    from pipelines.core import storage
    from pipelines.scoring import fit_from_evaluation, read_meta, registered_scorer

    root, cfg, reports = trained
    info = reports["evaluate"].info
    folder = info["scorer"]
    assert registered_scorer("models:/lafma/1", root=str(root)) == folder
    assert registered_scorer("models:/lafma@candidate", root=str(root)) == folder
    meta, _ = read_meta(folder)
    assert meta["embedder"]["sha256"] == info["embedder"]["embedder_sha256"]
    assert meta["text"]["encoder"] == read_bundle_manifest(reports["package"].info["bundle"])["config"]["text"]

    pipe = load_bundle(reports["package"].info["bundle"])
    ranker = load_scorer(folder, text_encoder=pipe.text_encoder, text_config=meta["text"]["encoder"],
                         weights_dir=os.path.join(root, "weights"))
    out = reports["evaluate"].path
    assert folder == os.path.join(out, "scorer")
    ids = json.loads(Path(out, "metrics.json").read_text())["ids"]
    rows = {r["id"]: r for r in pq.read_table(Path(out, "generated", "manifest.parquet")).to_pylist()}
    waves = torch.from_numpy(np.stack([sf.read(io.BytesIO(storage.read_bytes(os.path.join(out, "generated",
                                                                                        rows[i]["path"]))),
                                               dtype="float32")[0] for i in ids]))
    scores = ranker.score(waves, pipe.sample_rate, [rows[i]["caption"] for i in ids])
    # The model's own encoder, mean-pooled, is what the text stage stored: the stage's number again.
    assert float(scores.mean()) == pytest.approx(info["metrics"]["eval/text_audio"], abs=1e-4)

    again = fit_from_evaluation(out, str(tmp_path / "refit"), root=str(root), seed=cfg.evaluate.seed)
    assert read_meta(str(tmp_path / "refit"))[0]["projection"]["sha256"] == meta["projection"]["sha256"]
    assert again["text_audio"] == pytest.approx(info["metrics"]["eval/text_audio"], abs=1e-5)
    assert SCORER_TAG == "lafma.scorer_uri"
