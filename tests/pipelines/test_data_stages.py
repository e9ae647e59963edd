"""Stages 0-2 on a real local Ray: hostile input, skip, kill-and-resume, S3, text embeddings."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import load_pipeline_config
from pipelines.core import storage
from pipelines.core.dag import run_dag
from pipelines.stages import STAGES
from tests.pipelines.conftest import BUCKET, make_hostile, wait_for

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "configs" / "test.yaml"


def config(manifest, root, *extra):
    return load_pipeline_config(CONFIG, [f"data.manifest={manifest}", f"storage.root={root}", "data.shard_size=4", *extra])


def outputs(reports) -> dict:
    return {r.name: r for r in reports}


def read_rows(out_dir: str) -> list[dict]:
    return sorted(storage.read_parquet_dir(out_dir).to_pylist(), key=lambda r: r["id"])


def all_rejects(reports) -> dict[str, str]:
    out = {}
    for name in ("ingest", "audio"):
        for r in storage.read_parquet_dir(storage.join(outputs(reports)[name].path, "rejects")).to_pylist():
            assert r["id"] not in out or r["reason"] == "duplicate_id", r
            out[r["id"]] = r["reason"]
    return out


def test_hostile_manifest_yields_every_good_row_and_one_reject_per_bad_input(ray_local, hostile, tmp_path):
    reports = run_dag(config(hostile.manifest, tmp_path / "store"), STAGES, until="text")
    audio = outputs(reports)["audio"]
    rows = read_rows(audio.path)
    assert {r["source_id"] for r in rows} == hostile.good_sources
    assert len(rows) == hostile.expected_rows == audio.info["rows"]
    assert all_rejects(reports) == hostile.expected_rejects
    assert audio.info["reasons"]["undecodable"] == 3
    # Every clip is 1.28 s at 16 kHz with a 64 x 128 mel; the long file was segmented.
    for r in rows:
        assert len(r["waveform"]) == 20480 and len(r["mel"]) == 64 * 128
        assert np.isfinite(r["mel"]).all()
    assert sorted(r["segment"] for r in rows if r["source_id"] == "long") == list(range(8))
    long_caption = next(r for r in rows if r["source_id"] == "long_caption")
    assert long_caption["split"] == "validation" and 0 < len(long_caption["caption"]) <= 512
    assert next(r for r in rows if r["source_id"] == "dup")["caption"] == "first of two"
    marker = storage.read_json(storage.join(audio.path, "_SUCCESS.json"))
    assert marker["stage"] == "audio" and marker["rows"] == len(rows) and marker["rejected"] == 9


def test_text_stage_embeds_each_unique_caption_once_plus_the_empty_caption(ray_local, hostile, tmp_path):
    cfg = config(hostile.manifest, tmp_path / "store")
    reports = run_dag(cfg, STAGES, until="text")
    text = storage.read_parquet_dir(outputs(reports)["text"].path).to_pylist()
    captions = [r["caption"] for r in text]
    # Every caption of the manifest (the text stage needs only ingest), so every clip the
    # audio stage kept has its embedding, and none is encoded twice.
    manifest = storage.read_parquet_dir(outputs(reports)["ingest"].path).to_pylist()
    manifest_captions = {c for r in manifest for c in r["captions"]}
    audio_captions = {r["caption"] for r in read_rows(outputs(reports)["audio"].path)}
    assert sorted(captions) == sorted(manifest_captions | {""}) and len(set(captions)) == len(captions)
    assert audio_captions <= set(captions) and len(manifest_captions) > len(audio_captions)  # rejects' too
    from lafma.text import build_text_encoder

    encoder = build_text_encoder(cfg.text)
    row = next(r for r in text if r["caption"].startswith("a clear tone called u8"))
    emb, mask = encoder([row["caption"]])
    assert row["length"] == int(mask.sum()) and row["dim"] == cfg.context_dim
    np.testing.assert_allclose(np.array(row["emb"]).reshape(row["length"], row["dim"]),
                               emb[0, : row["length"]].numpy(), atol=1e-5)


def test_a_second_run_skips_both_stages(ray_local, hostile, tmp_path):
    cfg = config(hostile.manifest, tmp_path / "store")
    first = outputs(run_dag(cfg, STAGES, until="text"))
    marker = Path(first["audio"].path) / "_SUCCESS.json"
    stamp = marker.stat().st_mtime_ns
    second = outputs(run_dag(cfg, STAGES, until="text"))
    assert [second[n].status for n in ("ingest", "audio", "text")] == ["skipped"] * 3
    assert marker.stat().st_mtime_ns == stamp
    # A changed setting is a different stage output, not a stale skip.
    changed = outputs(run_dag(config(hostile.manifest, tmp_path / "store", "data.long_clips=crop"), STAGES,
                              until="audio"))
    assert changed["ingest"].status == "skipped" and changed["audio"].status == "ran"
    assert changed["audio"].path != first["audio"].path and changed["audio"].info["rows"] == 9


def test_killed_stage_resumes_to_exactly_the_uninterrupted_rows(ray_local, tmp_path, capsys):
    src = make_hostile(tmp_path / "in")
    store = tmp_path / "killed"
    # One file per shard; killed once exactly 3 shards are written (LAFMA_TEST_HOLD,
    # pipelines/core/stage.py: the tasks then hold, the ones still running and the ones to come).
    held = tmp_path / "held"
    args = [sys.executable, str(ROOT / "pipelines" / "run_all.py"), "--config", str(CONFIG), "--until", "audio",
            f"data.manifest={src.manifest}", f"storage.root={store}", "data.shard_size=1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "LAFMA_PROGRESS": "0", "LAFMA_TEST_HOLD": f"audio:3:{held}"})
    wait_for(held.exists, "the audio stage holding after 3 shards", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    pattern = str(store / "data" / "*" / "audio-*" / "shard-*.parquet")
    assert len(glob.glob(pattern)) == 3
    assert not glob.glob(str(store / "data" / "*" / "audio-*" / "_SUCCESS.json"))

    total_shards = len(src.good_sources) + 9  # one per row ingest keeps: the good ones, the 9 bad audio files
    cfg = config(src.manifest, store, "data.shard_size=1")
    capsys.readouterr()
    resumed = outputs(run_dag(cfg, STAGES, until="audio"))["audio"]
    assert f"[audio] {total_shards} shards, 3 already done, {total_shards - 3} to run" in capsys.readouterr().out
    clean = outputs(run_dag(config(src.manifest, tmp_path / "clean", "data.shard_size=1"), STAGES,
                            until="audio"))["audio"]
    a, b = read_rows(resumed.path), read_rows(clean.path)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert len({r["id"] for r in a}) == len(a)  # no duplicates
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["mel"], y["mel"])
    assert resumed.info["rejected"] == clean.info["rejected"] == 9


@pytest.mark.slow
def test_s3_paths_give_the_same_output_as_local(ray_local, hostile, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3")
    prefix = f"{BUCKET}/{tmp_path.name}"
    fs.put(str(hostile.manifest.parent) + "/", f"{prefix}/in", recursive=True)
    s3_reports = outputs(run_dag(config(f"s3://{prefix}/in/manifest.csv", f"s3://{prefix}/store"), STAGES,
                                 until="text"))
    local_reports = outputs(run_dag(config(hostile.manifest, tmp_path / "store"), STAGES, until="text"))
    assert s3_reports["audio"].path.startswith("s3://")
    s3_rows, local_rows = read_rows(s3_reports["audio"].path), read_rows(local_reports["audio"].path)
    assert [r["id"] for r in s3_rows] == [r["id"] for r in local_rows]
    for x, y in zip(s3_rows, local_rows):
        np.testing.assert_array_equal(x["mel"], y["mel"])
        assert x["audio_uri"].startswith("s3://")
    assert all_rejects(s3_reports.values()) == all_rejects(local_reports.values()) == hostile.expected_rejects
    assert s3_reports["text"].info["rows"] == local_reports["text"].info["rows"]
    assert storage.exists(storage.join(s3_reports["text"].path, "_SUCCESS.json"))


def test_a_mel_change_reruns_the_audio_stage_but_encodes_no_caption_again(ray_local, hostile, tmp_path):
    first = outputs(run_dag(config(hostile.manifest, tmp_path / "store"), STAGES, until="text"))
    other = outputs(run_dag(config(hostile.manifest, tmp_path / "store", "mel.f_max=7000"), STAGES, until="text"))
    assert other["audio"].status == "ran" and other["audio"].path != first["audio"].path
    assert other["text"].status == "skipped" and other["text"].path == first["text"].path
    assert first["text"].info["dim"] == 32  # the width the encoder produced, recorded for the check


def test_a_text_width_the_unet_was_not_built_for_stops_before_any_training(ray_local, hostile, tmp_path):
    from lafma.config import ConfigError
    from pipelines.core.stage import StageContext
    from pipelines.stages.text import TextStage

    cfg = config(hostile.manifest, tmp_path / "store", "unet.context_dim=48")  # tiny_t5 is 32 wide
    # Known from the config (tiny_t5, a local directory, the packaged MiniLM): the preflight stops
    # the run before any stage.
    with pytest.raises(ConfigError, match="32-d text embeddings.*set unet.context_dim=32") as e:
        run_dag(cfg, STAGES, until="train_vae")
    assert e.value.key == "unet.context_dim"
    assert not list((tmp_path / "store").glob("data/*/*"))  # not even ingest ran
    # Only guessed (a hub name): the width the text stage recorded stops it before any training.
    with pytest.raises(ConfigError, match="produced 32-d embeddings.*set unet.context_dim=32") as e:
        TextStage().check(StageContext(cfg=cfg, root=str(tmp_path), dataset="d"), {"dim": 32})
    assert e.value.key == "unet.context_dim"
