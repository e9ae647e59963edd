"""A bundle holds a whole generator and refuses components trained on other mels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lafma.bundle import BundleError, check_bundle, load_bundle, write_bundle
from lafma.config import to_dict
from lafma.models import build_pipeline, build_unet, build_vae, build_vocoder
from pipelines.config import load_pipeline_config

CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"
BUILD = {"unet": build_unet, "vae": build_vae, "vocoder": build_vocoder}


def export(tmp: Path, overrides=()) -> tuple[dict, dict, dict]:
    """Random-weight components exported as the training jobs export them."""
    cfg = load_pipeline_config(CONFIG, list(overrides))
    torch.manual_seed(0)
    modules, weights = {}, {}
    for name, build in BUILD.items():
        modules[name] = build(cfg).eval()
        weights[name] = str(tmp / f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in modules[name].state_dict().items()}, weights[name],
                  metadata={"mel_hash": cfg.mel.config_hash(), "component": name})
    return {n: to_dict(cfg) for n in BUILD}, weights, modules


def test_a_bundle_generates_what_its_components_generate(tmp_path):
    components, weights, modules = export(tmp_path)
    manifest = write_bundle(str(tmp_path / "bundle"), components=components, weights=weights, lineage={"run": "x"})
    assert manifest["lineage"] == {"run": "x"} and manifest["text_encoder"]["bundled"] is False  # tiny_t5: rebuilt
    pipe = load_bundle(str(tmp_path / "bundle"))
    cfg = load_pipeline_config(CONFIG)
    direct = build_pipeline(cfg, **modules)
    a = pipe.generate(["a bell rings"], seeds=[3], steps=2).audio
    b = direct.generate(["a bell rings"], seeds=[3], steps=2).audio
    assert torch.allclose(a, b, atol=1e-5)


def test_components_trained_on_other_mels_are_refused_when_written(tmp_path):
    components, weights, _ = export(tmp_path)
    (tmp_path / "b").mkdir()
    other, other_weights, _ = export(tmp_path / "b", ["mel.f_max=7000"])
    with pytest.raises(BundleError, match="vocoder"):
        write_bundle(str(tmp_path / "bundle"), components={**components, "vocoder": other["vocoder"]},
                     weights={**weights, "vocoder": other_weights["vocoder"]})


def test_a_tampered_bundle_is_refused_when_loaded(tmp_path):
    components, weights, _ = export(tmp_path)
    (tmp_path / "c").mkdir()
    _, other_weights, _ = export(tmp_path / "c", ["mel.f_max=7000"])
    bundle = tmp_path / "bundle"
    write_bundle(str(bundle), components=components, weights=weights)
    check_bundle(str(bundle))
    (bundle / "vocoder.safetensors").write_bytes(Path(other_weights["vocoder"]).read_bytes())  # swapped by hand
    with pytest.raises(BundleError, match="vocoder was trained on other mels"):
        load_bundle(str(bundle))
    manifest = json.loads((bundle / "lafma.json").read_text())
    del manifest["components"]["unet"]
    (bundle / "lafma.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no unet"):
        check_bundle(str(bundle))


def test_a_directory_that_is_not_a_bundle_says_so(tmp_path):
    with pytest.raises(BundleError, match="not a LAFMA bundle"):
        load_bundle(str(tmp_path))
