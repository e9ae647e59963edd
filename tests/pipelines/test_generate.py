"""Batch generation on Ray Data: resumable, sanitised output names, bad rows reported."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.generation import GenerationSettings, run_generation
from tests.pipelines.conftest import wait_for

ROOT = Path(__file__).parents[2]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    return path


def files_under(path: Path) -> set[str]:
    return {os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs}


def test_hostile_ids_write_nothing_outside_out_and_bad_rows_are_reported(trained, tmp_path):
    root, _, reports = trained
    ids = ["../../x", "/tmp/evil", "a/../../b", "..", "ok", "sub/dir", "~", "../x"]
    rows = [{"id": i, "caption": f"a bell number {n}"} for n, i in enumerate(ids)]
    rows += [{"id": "empty", "caption": "  "}, {"id": "huge", "caption": "a drone", "duration": "1e9"},
             {"id": "ok", "caption": "same id again"}]
    (tmp_path / "in").mkdir()
    captions = write_csv(tmp_path / "in" / "captions.csv", rows)
    out = tmp_path / "deep" / "out"
    before = files_under(tmp_path)
    summary = run_generation(str(captions), str(out), GenerationSettings(model=reports["package"].info["bundle"],
                             steps=2, batch_size=3, actor_cpus=0.5), root=str(root))
    new = files_under(tmp_path) - before
    assert new and all(f.startswith(str(out) + os.sep) for f in new), sorted(new)
    assert not os.path.exists("/tmp/evil.wav") and not (tmp_path / "x.wav").exists()
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(r["id"] for r in manifest) == sorted(ids)
    assert len({r["path"] for r in manifest}) == len(ids) and all((out / r["path"]).is_file() for r in manifest)
    rejects = pq.read_table(out / "rejects" / "plan.parquet").to_pylist()
    assert {r["id"]: r["reason"] for r in rejects} == {"empty": "empty_caption", "huge": "bad_duration",
                                                       "ok": "duplicate_id"}
    assert summary["rows"] == len(ids) and summary["rejected"] == 3 and summary["rtf"] > 0


def test_a_killed_batch_job_rerun_yields_every_row_once(trained, tmp_path):
    root, _, reports = trained
    n = 12
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(f"a tone number {i}\n" for i in range(n)))
    out = tmp_path / "out"
    # One clip per shard; killed once exactly 3 shards are written (LAFMA_TEST_HOLD,
    # pipelines/core/stage.py: the actor holds after the third).
    cmd = [sys.executable, str(ROOT / "pipelines" / "generate.py"), "--captions", str(captions), "--out", str(out),
           "--model", "models:/lafma@champion", "--root", str(root), "--batch-size", "1", "--steps", "2",
           "--actor-cpus", "0.5"]
    env = {**os.environ, "LAFMA_PROGRESS": "0"}
    held = tmp_path / "held"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**env, "LAFMA_TEST_HOLD": f"generate:3:{held}"})
    wait_for(held.exists, "generation holding after 3 shards", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list((out / "parts").glob("*.parquet"))) == 3
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "(3 done before)" in rerun.stdout
    assert f"[generate] {n - 3} clips" in rerun.stdout  # only the missing ones were generated
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(r["id"] for r in manifest) == [f"line-{i:06d}" for i in range(1, n + 1)]
    assert len(list((out / "wavs").glob("*.wav"))) == n
    assert "real time" in rerun.stdout and "RTF" in rerun.stdout


@pytest.fixture(scope="module")
def random_pipeline():
    """The test config's generator with random weights: enough to check how rows are planned."""
    import torch

    from lafma.models import build_pipeline
    from pipelines.config import load_pipeline_config

    torch.manual_seed(0)
    return build_pipeline(load_pipeline_config(ROOT / "configs" / "test.yaml"))


def test_the_pyfunc_plans_rows_as_batch_generation_does(random_pipeline):
    import numpy as np
    import pandas as pd

    from pipelines.core.registry import generate_frame

    nan = float("nan")
    frame = pd.DataFrame({"caption": ["  a bell   rings ", "a dog", "a dog"], "seed": [nan, 5.0, 5.0],
                          "steps": [2, 2, 2], "solver": [None, "heun", "heun"]})
    out = generate_frame(random_pipeline, frame)
    assert list(out.columns) == ["caption", "seed", "steps", "guidance", "solver", "duration", "nfe", "sample_rate",
                                 "audio"]
    assert out["caption"][0] == "a bell rings"  # whitespace normalised, as in batch generation
    assert list(out["seed"]) == [0, 5, 5] and list(out["solver"]) == ["euler", "heun", "heun"]  # a row's position seeds it
    assert list(out["nfe"]) == [4, 8, 8] and np.array_equal(out["audio"][1], out["audio"][2])

    bad = pd.DataFrame({"caption": ["a bell", "   ", "a dog", "rain"], "steps": [2, 2, 0, 2],
                        "solver": ["euler", "euler", "euler", "magic"]})
    with pytest.raises(ValueError, match=r"3 of 4 rows cannot be generated") as err:
        generate_frame(random_pipeline, bad)
    for text in ("row-000002: empty_caption", "row-000003: bad_steps (0 is outside [1, 1000])",
                 "row-000004: bad_solver ('magic'"):
        assert text in str(err.value)
    with pytest.raises(ValueError, match="'caption' column"):
        generate_frame(random_pipeline, pd.DataFrame({"text": ["a bell"]}))


def test_a_registry_uri_gives_its_sampler_defaults_from_the_manifest_alone(trained, monkeypatch):
    from pipelines.core import registry
    from pipelines.generation import model_defaults

    root, cfg, reports = trained

    def refuse(*args, **kwargs):
        raise AssertionError("model_defaults built the model")

    monkeypatch.setattr(registry, "load_pipeline", refuse)
    monkeypatch.setattr("lafma.bundle.load_bundle", refuse)
    want = {"steps": cfg.sampler.steps, "guidance": cfg.sampler.guidance, "solver": cfg.sampler.solver,
            "duration": cfg.sampler.duration, "max_duration": None}  # not conditioned on duration
    for model in ("models:/lafma/1", "models:/lafma@champion", reports["package"].info["bundle"]):
        assert model_defaults(model, str(root)) == want, model
