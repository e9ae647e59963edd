"""The package stage's bundle is whole: a bundled text encoder (a sub-folder) travels with it,
and generation from that bundle needs nothing but the bundle."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipelines.core import storage
from pipelines.core.storage import copy_tree
from pipelines.stages.release import packaged_model_uri
from tests.lafma.test_bundle import small_t5_dir
from tests.pipelines.conftest import BUCKET
from tests.pipelines.dag_run import CONFIG


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root``, by its path relative to it."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_copy_tree_copies_sub_folders_to_s3_byte_for_byte(s3_endpoint, tmp_path):
    src = tmp_path / "bundle"
    (src / "text_encoder" / "deeper").mkdir(parents=True)
    files = {"lafma.json": b"{}", "unet.safetensors": os.urandom(3000), "text_encoder/config.json": b'{"d_model": 32}',
             "text_encoder/deeper/spiece.model": os.urandom(100)}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    dest = f"s3://{BUCKET}/copy-tree/bundle"
    copy_tree(str(src), dest)
    fs, path = storage.fs_and_path(dest)
    got = {p.removeprefix(path + "/"): storage.read_bytes(f"s3://{p}") for p in fs.find(path)}
    assert got == files


@pytest.mark.slow
def test_a_bundled_text_encoder_is_in_the_package_bundle_whole_and_generates(ray_local, tmp_path):
    from pipelines.config import load_pipeline_config
    from pipelines.core.dag import run_dag
    from pipelines.generation import GenerationSettings, run_generation
    from pipelines.stages import STAGES

    encoder = small_t5_dir(tmp_path / "t5")
    want = tree(encoder)
    root = tmp_path / "store"
    overrides = [f"storage.root={root}", "text.kind=t5", f"text.name_or_path={encoder}"]
    for job in ("train_vae", "train_vocoder", "train_lfm"):  # the weights do not matter here
        overrides += [f"{job}.steps=2", f"{job}.checkpoint_every=2", f"{job}.sample_every=2"]
    cfg = load_pipeline_config(CONFIG, overrides)
    reports = {r.name: r for r in run_dag(cfg, STAGES, until="package")}
    pkg = reports["package"].info
    bundle = Path(pkg["bundle"])
    manifest = json.loads((bundle / "lafma.json").read_text())
    assert manifest["text_encoder"]["bundled"] and manifest["text_encoder"]["name_or_path"] == "text_encoder"
    assert tree(bundle / "text_encoder") == want  # every file, the same bytes
    assert {"lafma.json", "unet.safetensors", "vae.safetensors", "vocoder.safetensors"} <= set(tree(bundle))

    # The source directory is gone: generation can only be reading the bundle's own copy.
    shutil.move(encoder, tmp_path / "moved")
    model = packaged_model_uri(pkg)
    assert model == str(bundle)  # a local root loads the stage's bundle, not the registry's
    captions = tmp_path / "captions.txt"
    captions.write_text("a bell rings\na dog barks\n")
    out = tmp_path / "gen"
    summary = run_generation(str(captions), str(out), GenerationSettings(model=model, steps=2, actor_cpus=0.5),
                             root=str(root))
    assert summary["rows"] == 2 and summary["rejected"] == 0
    for r in pq.read_table(out / "manifest.parquet").to_pylist():
        wav, sr = sf.read(out / r["path"])
        assert sr == cfg.mel.sample_rate and len(wav) == round(cfg.sampler.duration * sr) and np.isfinite(wav).all()
