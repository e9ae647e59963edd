"""Stages 7-9 on the shared full DAG run: registry, promotion gate, loading, demo generation.

In any order with the other tests on it: none changes the shared store (test_training.py resumes
a copy of it to more steps; the gate test registers into a store of its own).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from mlflow import MlflowClient
from PIL import Image

from pipelines.core import registry, tracking
from pipelines.stages import STAGES
from pipelines.stages.evaluate import EDIT_ROWS, SHEET_ROWS, sheet_rows

ROOT = Path(__file__).parents[2]


def client(root) -> MlflowClient:
    return MlflowClient(tracking.tracking_uri(str(root)))


def test_the_whole_dag_ran_under_one_parent_run(trained):
    root, cfg, reports = trained
    assert [reports[s.name].status for s in STAGES] == ["ran"] * len(STAGES)
    c = client(root)
    parent = c.get_run(reports["ingest"].info["run_id"]).data.tags["mlflow.parentRunId"]
    for s in STAGES:
        run = c.get_run(reports[s.name].info["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED", s.name
        assert run.data.tags["lafma.stage"] == s.name
    assert c.get_run(parent).info.status == "FINISHED"
    summary = c.download_artifacts(parent, "summary.txt")
    assert "models:/lafma/1" in Path(summary).read_text()


def test_the_package_is_registered_as_candidate_with_its_lineage_and_promoted_first(trained):
    root, cfg, reports = trained
    pkg, promo = reports["package"].info, reports["promote"].info
    assert pkg["model_version"] == "1" and pkg["gate_metric"] == "heldout/fm_loss"
    assert np.isfinite(pkg["gate_value"]) and pkg["gate_value"] > 0
    assert promo["promoted"] and "no champion yet" in promo["reason"]
    v = client(root).get_model_version(registry.MODEL_NAME, "1")
    assert set(v.aliases) == {registry.CANDIDATE, registry.CHAMPION}
    for stage in ("train_lfm", "train_vae", "train_vocoder", "text", "audio"):
        assert v.tags[f"lafma.{stage}_path"] == reports[stage].path and v.tags[f"lafma.{stage}_hash"]
    assert v.tags["lafma.train_lfm_run"] == reports["train_lfm"].info["run_id"]
    assert v.tags["lafma.mel_hash"] == cfg.mel.config_hash() and v.tags["lafma.promoted_by"] == "gate"
    manifest = json.loads((Path(pkg["bundle"]) / "lafma.json").read_text())
    assert manifest["mel_hash"] == cfg.mel.config_hash()


def test_evaluate_scores_the_candidate_and_hands_its_metric_to_the_gate(trained):
    root, cfg, reports = trained
    ev = reports["evaluate"].info
    m = ev["metrics"]
    for key in ("eval/fd", "eval/fd_half", "eval/kl", "eval/is", "eval/text_audio", "ref/real_vs_real/fd",
                "ref/vocoder/fd", "ref/vae_vocoder/fd", "ref/real/text_audio", "eval/seconds_per_clip"):
        assert np.isfinite(m[key]), key
    assert m["eval/fd"] > 0 and m["eval/is"] >= 1 and m["eval/kl"] >= 0
    # The demo corpus carries attributes: one classifier per attribute, with its chance level.
    assert {"attr/kind/accuracy", "attr/kind/chance", "attr/register/real_accuracy"} <= set(m)
    assert ev["embedder"]["embedder"] == "aisfx-0.1.2" and len(ev["embedder"]["embedder_sha256"]) == 64
    v = client(root).get_model_version(registry.MODEL_NAME, ev["model_version"])
    assert v.tags[registry.GATE_METRIC_TAG] == "fd/aisfx-0.1.2" and float(v.tags[registry.GATE_VALUE_TAG]) == m["eval/fd"]
    assert reports["promote"].info["reason"].startswith("no champion yet; fd/aisfx-0.1.2")
    assert sorted(int(k) for k in ev["sweep"]) == [1, 2]
    run = ev["run_id"]
    assert [x.step for x in client(root).get_metric_history(run, "sweep/fd")] == [1, 2]
    arts = {a.path for a in client(root).list_artifacts(run, "eval")}
    assert {"eval/clips.json", "eval/steps_sweep.png", "eval/generated"} <= arts
    table = json.loads(Path(client(root).download_artifacts(run, "eval/clips.json")).read_text())
    audio = {a.path for a in client(root).list_artifacts(run, "eval/generated")}
    paths = [row[table["columns"].index("audio")] for row in table["data"]]
    assert len(paths) == ev["rows"] and set(paths) == audio  # every row's audio, logged beside it
    # The spectrogram sheet: in the stage's output, named in the summary, logged to the run; a
    # row of three 4 x 2.5-inch panels per drawn caption (tracking.mel_grid's layout at 100 dpi).
    sheet = Path(ev["spectrograms"])
    assert sheet == Path(reports["evaluate"].path) / "spectrograms.png" and "eval/spectrograms.png" in arts
    assert f"spectrogram sheet: {sheet}" in reports["evaluate"].notes
    assert np.asarray(Image.open(sheet).convert("RGB")).shape == (50 + 250 * min(SHEET_ROWS, ev["rows"]), 1300, 3)
    assert Path(client(root).download_artifacts(run, "eval/spectrograms.png")).read_bytes() == sheet.read_bytes()
    # The edits sheet beside it: EDIT_ROWS of the sheet's real clips, each a row of input,
    # inpainting and continuation (what they are: test_edit_sheet.py).
    edits = Path(ev["edits"])
    assert edits == Path(reports["evaluate"].path) / "edits.png" and "eval/edits.png" in arts
    assert f"inpainting and continuation sheet: {edits}" in reports["evaluate"].notes
    assert edits.read_bytes().startswith(b"\x89PNG")
    assert np.asarray(Image.open(edits).convert("RGB")).shape == (50 + 250 * min(EDIT_ROWS, ev["rows"]), 1300, 3)
    assert Path(client(root).download_artifacts(run, "eval/edits.png")).read_bytes() == edits.read_bytes()


def test_the_spectrogram_sheet_draws_each_caption_once_before_any_twice():
    held = [{"caption": c} for c in "aabcbdefghij"]
    assert sheet_rows(held, 4) == [0, 2, 3, 5]  # first of a, b, c, d: id order, no repeat
    assert sheet_rows(held[:4], 4) == [0, 2, 3, 1]  # three captions for four rows: a repeat last
    assert SHEET_ROWS == 8 and sheet_rows(held) == [0, 2, 3, 5, 6, 7, 8, 9]  # capped, still distinct


def test_demo_generation_left_audio_a_manifest_and_spectrograms_in_mlflow(trained):
    root, cfg, reports = trained
    import pyarrow.parquet as pq

    gen = reports["generate"]
    rows = pq.read_table(os.path.join(gen.path, "manifest.parquet")).to_pylist()
    assert 0 < len(rows) == gen.info["rows"] <= cfg.generate.max_captions
    assert len({r["id"] for r in rows}) == len({r["caption"] for r in rows}) == len(rows)
    assert any(not r["id"].startswith("train-") for r in rows) and any(r["id"].startswith("train-") for r in rows)
    for r in rows:
        wav, sr = sf.read(os.path.join(gen.path, r["path"]))
        assert sr == cfg.mel.sample_rate and len(wav) == round(cfg.sampler.duration * sr)
        assert np.isfinite(wav).all() and np.abs(wav).max() > 0.1  # peak-normalised, not silent
        assert r["nfe"] == cfg.sampler.steps * 2  # Euler with guidance: two evaluations a step
    arts = [a.path for a in client(root).list_artifacts(gen.info["run_id"], "generated")]
    assert "generated/spectrograms.png" in arts and any(a.endswith(".wav") for a in arts)


def test_a_second_run_skips_every_stage_and_reports_the_model_and_audio(trained, capsys):
    from pipelines import run_all
    from tests.pipelines.dag_run import CONFIG, overrides

    root, _, reports = trained
    assert run_all.main(["--config", str(CONFIG), *overrides(root)]) == 0
    out = capsys.readouterr().out
    table = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.split() and
             line.split()[0] in {s.name for s in STAGES}}
    assert table == {s.name: "skipped" for s in STAGES}
    assert "models:/lafma/1" in out and reports["generate"].info["audio_dir"] in out


def _register(root: Path, bundle: str, value: float, metric: str = "heldout/fm_loss") -> str:
    run = tracking.start_run(root=str(root), experiment="gate-test", run_name=f"v-{value}")
    return registry.register(bundle, root=str(root), run_id=run, gate_metric=metric, gate_value=value).version


def test_the_gate_moves_champion_only_for_a_better_candidate(trained, tmp_path):
    _, _, reports = trained
    store = tmp_path / "store"
    bundle = reports["package"].info["bundle"]
    v1 = _register(store, bundle, 1.0)
    assert registry.gate(root=str(store)).promoted  # no champion yet
    v2 = _register(store, bundle, 2.0)  # worse: the champion stays
    d = registry.gate(root=str(store))
    champion = lambda: str(client(store).get_model_version_by_alias(registry.MODEL_NAME, registry.CHAMPION).version)  # noqa: E731
    assert not d.promoted and d.candidate == v2 and champion() == v1 and "does not beat" in d.reason
    v3 = _register(store, bundle, 0.5)  # better: it moves
    assert registry.gate(root=str(store)).promoted and champion() == v3
    tags = client(store).get_model_version(registry.MODEL_NAME, v3).tags
    assert tags["lafma.previous_champion"] == v1 and tags["lafma.promoted_by"] == "gate"
    v4 = _register(store, bundle, 0.1, metric="fad")  # another metric: not comparable, not promoted
    assert not registry.gate(root=str(store)).promoted and champion() == v3
    assert v4 == "4"

    # By hand, with who and why recorded; then a rollback to what it replaced.
    promote = [sys.executable, str(ROOT / "pipelines" / "promote.py"), "--root", str(store)]
    out = subprocess.run([*promote, "--version", v2, "--reason", "listening test", "--by", "alice"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert champion() == v2
    tags = client(store).get_model_version(registry.MODEL_NAME, v2).tags
    assert (tags["lafma.promoted_by"], tags["lafma.promoted_reason"]) == ("alice", "listening test")
    out = subprocess.run([*promote, "--rollback", "--reason", "clicks", "--by", "bob"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and champion() == v3, out.stderr
    missing = subprocess.run([*promote, "--version", "99", "--reason", "x"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "99" in missing.stderr


def test_the_champion_loads_by_alias_in_a_fresh_process_and_generates(trained, tmp_path):
    root, cfg, _ = trained
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    wav = tmp_path / "out" / "bell.wav"
    out = subprocess.run([sys.executable, "-m", "pipelines.lafma_cli", "generate", "a high bell rings", "-o", str(wav),
                          "--root", str(root), "--seed", "5", "--steps", "3"], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    audio, sr = sf.read(wav)
    assert sr == cfg.mel.sample_rate and len(audio) == round(cfg.sampler.duration * sr) and np.isfinite(audio).all()
    assert "seed 5" in out.stdout and "6 NFE" in out.stdout

    code = ("import mlflow, pandas as pd, numpy as np\n"
            "m = mlflow.pyfunc.load_model('models:/lafma@champion')\n"
            "df = m.predict(pd.DataFrame({'caption': ['a dog barks', 'a dog barks', 'rain'], 'seed': [1, 1, 2],"
            " 'steps': [2, 2, 2]}))\n"
            "a = np.stack(df['audio'].to_list())\n"
            "print(len(df), a.shape[1], bool(np.allclose(a[0], a[1], atol=1e-4)), bool(not np.allclose(a[0], a[2], atol=1e-2)),"
            " int(df['nfe'][0]))\n")
    env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri(str(root))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    n, samples, same, differs, nfe = out.stdout.split()[-5:]
    assert (n, same, differs, nfe) == ("3", "True", "True", "4")
    assert int(samples) == round(cfg.sampler.duration * cfg.mel.sample_rate)


def test_loading_refuses_a_bundle_with_a_swapped_vocoder(trained, tmp_path):
    from lafma.bundle import BundleError

    _, _, reports = trained
    bundle = tmp_path / "bundle"
    shutil.copytree(reports["package"].info["bundle"], bundle)
    manifest = json.loads((bundle / "lafma.json").read_text())
    manifest["components"]["vocoder"]["mel_hash"] = "0" * 12
    (bundle / "lafma.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="vocoder"):
        registry.load_pipeline(str(bundle), root=str(tmp_path))
