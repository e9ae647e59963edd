"""benchmarks/duration.py on the session's trained store: each fraction's clips are generated at
that fraction of the clip length, the real clips are cut to the same samples, both are scored
by the evaluation's embedder, and the whole-clip row is the evaluate stage's own numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import soundfile as sf

from benchmarks.duration import main
from pipelines.stages import evaluate as ev

FRACTIONS = (0.25, 0.5, 1.0)


def table_rows(report: str) -> list[list[str]]:
    """The cells of the report's table rows, below its header and separator."""
    return [ln.split("|")[1:-1] for ln in report.splitlines() if ln.startswith("| ")][2:]


def test_each_fraction_is_generated_and_scored_against_real_clips_cut_alike(trained, tmp_path, monkeypatch):
    root, cfg, reports = trained
    stage = reports["evaluate"]
    ids = json.loads(Path(stage.path, "metrics.json").read_text())["ids"]
    sr, clip = cfg.mel.sample_rate, cfg.audio.clip_seconds
    seen = []  # the length of every clip the embedder was given, one set per call
    embed = ev.embed
    monkeypatch.setattr(ev, "embed", lambda e, waves, rate: seen.append({len(w) for w in waves}) or embed(e, waves, rate))

    out, report = tmp_path / "jobs", tmp_path / "duration.md"
    assert main(["--root", str(root), "--model", f"models:/lafma/{stage.info['model_version']}",
                 "--fractions", ",".join(map(str, FRACTIONS)), "--seed", str(cfg.evaluate.seed),
                 "--actor-cpus", "0.5", "--out", str(out), "--write", str(report)]) == 0

    rows = table_rows(report.read_text())
    assert [float(r[0]) for r in rows] == list(FRACTIONS)
    assert [float(r[1]) for r in rows] == pytest.approx([f * clip for f in FRACTIONS])
    for f in FRACTIONS:
        n = round(f * clip * sr)
        job = out / f"f-{round(f * 100):03d}"
        manifest = {r["id"]: r for r in pq.read_table(job / "manifest.parquet").to_pylist()}
        assert sorted(manifest) == sorted(ids)
        for r in manifest.values():
            assert r["duration"] == pytest.approx(f * clip)
            assert sf.info(job / r["path"]).frames == n, (f, r["id"])
    # After the training clips (whole, for the classifiers), each fraction embeds its generated
    # clips, then the real ones cut to the same samples.
    lengths = [{round(f * clip * sr)} for f in FRACTIONS]
    assert seen[-2 * len(FRACTIONS):] == [n for pair in zip(lengths, lengths) for n in pair]

    # The whole-clip row is the stage's generation scored as the stage scored it.
    metrics = stage.info["metrics"]
    whole = rows[-1]
    assert float(whole[2]) == pytest.approx(metrics["eval/fd"], rel=1e-3)
    assert float(whole[3]) == pytest.approx(metrics["eval/fd_half"], rel=1e-3)
    assert float(whole[4]) == pytest.approx(metrics["ref/real_vs_real/fd"], rel=1e-3)
    real = [v for k, v in metrics.items() if k.startswith("attr/") and k.endswith("/real_accuracy")]
    if real:
        assert float(whole[6]) == pytest.approx(sum(real) / len(real), abs=1e-3)
    # A shorter crop is another real reference: the rows do not all repeat the whole clip's.
    assert float(rows[0][4]) != pytest.approx(float(whole[4]), rel=1e-3)
