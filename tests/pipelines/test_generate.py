"""Batch generation on Ray Data: resumable, sanitised output names, bad rows reported."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.generation import GenerationSettings, run_generation

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
    # Many steps per clip and one clip per shard: a window in which to kill the job.
    cmd = [sys.executable, str(ROOT / "pipelines" / "generate.py"), "--captions", str(captions), "--out", str(out),
           "--model", "models:/lafma@champion", "--root", str(root), "--batch-size", "1", "--steps", "150",
           "--actor-cpus", "0.5"]
    env = {**os.environ, "LAFMA_PROGRESS": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "parts").glob("*.parquet"))) < 3 and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # A Ray worker may finish the shard it was writing just after the driver dies.
    done_before = int(re.search(r"\((\d+) done before\)", rerun.stdout).group(1))
    assert 3 <= done_before < n, done_before
    assert f"{n - done_before} clips" in rerun.stdout  # only the missing ones were generated
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(r["id"] for r in manifest) == [f"line-{i:06d}" for i in range(1, n + 1)]
    assert len(list((out / "wavs").glob("*.wav"))) == n
    assert "real time" in rerun.stdout and "RTF" in rerun.stdout
