"""A user's own data, first try: real recordings (tests/real_audio.py) as a two-column CSV with
no split column, and the same files as a Hugging Face audiofolder, through the whole DAG on the
test config — held out automatically, trained, packaged, evaluated without attributes, registered
and promoted, and generated from."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from pipelines.config import load_pipeline_config
from pipelines.core import registry, storage, tracking
from pipelines.core.dag import format_summary, run_dag
from pipelines.stages import STAGES
from tests.pipelines.dag_run import CONFIG
from tests.real_audio import real_sounds, write_audiofolder, write_csv


@pytest.fixture(scope="module")
def sounds() -> list[Path]:
    return real_sounds()


def _run(root: Path, manifest: Path) -> dict:
    cfg = load_pipeline_config(CONFIG, [f"storage.root={root}", f"data.manifest={manifest}"])
    reports = run_dag(cfg, STAGES)
    print(format_summary(reports))
    return {r.name: r for r in reports}


def _assert_trained_evaluated_registered(root: Path, reports: dict, cfg_clip_samples: int) -> None:
    assert all(r.status == "ran" for r in reports.values()), {n: r.status for n, r in reports.items()}
    audio = storage.read_parquet_dir(reports["audio"].path, columns=["valid_samples", "split"])
    valid = np.asarray(audio.column("valid_samples").to_pylist())
    # Real clips shorter than the clip length: padded, and the padding is recorded for the losses.
    assert (valid < cfg_clip_samples).sum() >= 20 and (valid == cfg_clip_samples).sum() >= 20
    ev = reports["evaluate"].info
    m = ev["metrics"]
    for k in ("eval/fd", "eval/fd_half", "eval/kl", "eval/is", "eval/text_audio", "ref/real_vs_real/fd",
              "ref/vae_vocoder/fd", "ref/vocoder/fd"):
        assert math.isfinite(m[k]), k
    assert not any(k.startswith("attr/") for k in m)  # no attribute columns: no attribute accuracy ...
    assert any("attribute accuracy needs" in line or "no attribute accuracy" in line
               for line in reports["evaluate"].notes)  # ... and the summary says why
    assert storage.exists(ev["spectrograms"])
    client = MlflowClient(tracking.tracking_uri(str(root)))
    champion = client.get_model_version_by_alias(registry.MODEL_NAME, registry.CHAMPION)
    assert str(champion.version) == str(ev["model_version"]) and reports["promote"].info["promoted"]
    assert reports["generate"].info["rows"] >= 1


def test_a_two_column_csv_of_real_recordings_runs_end_to_end(sounds, tmp_path, ray_local):
    manifest = write_csv(sounds, tmp_path / "in" / "sounds.csv")
    assert manifest.read_text().splitlines()[0] == "audio,caption"
    reports = _run(tmp_path / "root", manifest)
    ingest = reports["ingest"].info
    # No split column: 8 clips each for validation and test, by a hash of the clip; the rest train.
    assert ingest["clips_per_split"] == {"train": len(sounds) - 16, "validation": 8, "test": 8}
    assert "hash of each clip" in ingest["split_reason"] and ingest["held_out_problem"] is None
    assert any("clips per split" in line for line in reports["ingest"].notes)
    # Six sample rates, mono and stereo, WAV and Ogg: all decoded (a near-silent file may be a reject).
    assert reports["audio"].info["rejected"] <= 2 and reports["audio"].info["rows"] >= len(sounds)
    _assert_trained_evaluated_registered(tmp_path / "root", reports, int(1.28 * 16000))
    # The package stage scored its gate on held-out clips, not on training ones.
    assert reports["package"].info["gate_split"] == "validation"


def test_the_same_recordings_as_an_audiofolder_run_end_to_end(sounds, tmp_path, ray_local):
    folder = write_audiofolder(sounds, tmp_path / "in" / "sounds")
    reports = _run(tmp_path / "root", folder)
    ingest = reports["ingest"].info
    test_clips = len(sounds[::6])
    assert ingest["layout"] == "audiofolder"
    # The split sub-folders decide: test/ is held out as it is, nothing is drawn.
    assert ingest["clips_per_split"] == {"train": len(sounds) - test_clips, "validation": 0, "test": test_clips}
    _assert_trained_evaluated_registered(tmp_path / "root", reports, int(1.28 * 16000))


def test_only_columns_that_read_as_class_labels_are_scored_as_attributes():
    from pipelines.stages.evaluate import attribute_names

    train = [{"attributes": {"category": ["dog", "cat", "rain"][i % 3], "source_url": f"https://x/{i}",
                             "duration": 1.5 + i, "license": "cc-by", "take": i % 4}} for i in range(12)]
    # An id-like column (one value per clip), a float and a constant measure nothing.
    assert attribute_names(train) == ["category", "take"]
