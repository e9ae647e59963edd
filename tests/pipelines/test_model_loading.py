"""Loading a model never runs code from the artifact store, and loads a bundle only as it was
written: every file's SHA-256 is checked against the bundle's manifest (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lafma.bundle import MANIFEST, BundleError, file_hashes, load_bundle
from pipelines.core import registry, tracking
from tests.pipelines.test_generation_plan import make_bundle


def artifact_file(root: Path, name: str) -> Path:
    """The one file called ``name`` in the local artifact store under ``root``."""
    found = [p for p in (root / "mlartifacts").rglob(name) if p.is_file()]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture()
def registered(tmp_path) -> tuple[Path, str, str]:
    """A random-weight bundle registered as version 1 of ``lafma`` in a store under ``tmp_path``."""
    root = tmp_path / "store"
    bundle = make_bundle(tmp_path / "bundle", 0)
    run = tracking.start_run(root=str(root), experiment="loading", run_name="package")
    version = registry.register(bundle, root=str(root), run_id=run, gate_metric="heldout/fm_loss", gate_value=1.0)
    return root, bundle, version.uri


def test_a_registered_model_loads_without_running_the_artifacts_code(registered, tmp_path):
    root, bundle, uri = registered
    marker = tmp_path / "ran"
    # Whoever can write the artifact store replaces the pyfunc's code.
    artifact_file(root, "lafma_pyfunc.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n")
    pipe = registry.load_pipeline(uri, root=str(root), device="cpu")
    assert not marker.exists()
    want = load_bundle(bundle).generate(["a bell rings"], seeds=[1], steps=2).audio
    assert torch.equal(pipe.generate(["a bell rings"], seeds=[1], steps=2).audio, want)


@pytest.mark.parametrize("change", ["weights", "extra"])
def test_a_registered_bundle_changed_in_the_artifact_store_is_refused_naming_the_file(registered, change):
    root, _, uri = registered
    vae = artifact_file(root, "vae.safetensors")
    if change == "weights":
        data = bytearray(vae.read_bytes())
        data[-1] ^= 1  # one bit of one weight
        vae.write_bytes(bytes(data))
        match = r"vae\.safetensors has SHA-256 .* the manifest records"
    else:  # a file transformers or torch would pick up, slipped in beside the weights
        (vae.parent / "pytorch_model.bin").write_bytes(b"pickled")
        match = r"pytorch_model\.bin is not in the manifest"
    with pytest.raises(BundleError, match=match):
        registry.load_pipeline(uri, root=str(root), device="cpu")
    with pytest.raises(BundleError, match=match):  # the bundle beside it, loaded directly, alike
        load_bundle(str(vae.parent))


def test_a_bundle_rewritten_whole_in_the_artifact_store_is_refused_by_the_registry_record(registered):
    # Weights and the manifest's hashes changed together: the bundle is consistent in itself,
    # but its manifest is not the one the registry recorded when the version was registered.
    root, _, uri = registered
    vae = artifact_file(root, "vae.safetensors")
    data = bytearray(vae.read_bytes())
    data[-1] ^= 1
    vae.write_bytes(bytes(data))
    manifest_file = vae.parent / MANIFEST
    manifest = json.loads(manifest_file.read_text())
    manifest["files"] = file_hashes(str(vae.parent))
    manifest["components"]["vae"]["sha256"] = manifest["files"]["vae.safetensors"]
    manifest_file.write_text(json.dumps(manifest))
    load_bundle(str(vae.parent))  # self-consistent
    with pytest.raises(BundleError, match=r"models:/lafma/1 \(v1\): its bundle's lafma.json has SHA-256 .* the "
                                          r"registry recorded"):
        registry.load_pipeline(uri, root=str(root), device="cpu")
    with pytest.raises(BundleError, match="the registry recorded"):  # by its alias alike
        registry.load_pipeline("models:/lafma@candidate", root=str(root), device="cpu")


def test_the_served_model_refuses_a_request_over_its_limits_before_any_work(registered):
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from pipelines.core.limits import MAX_REQUEST_ROWS

    root, _, uri = registered
    tracking.configure(str(root))
    model = mlflow.pyfunc.load_model(uri)  # what `mlflow models serve` runs
    for request, match in [(pd.DataFrame({"caption": ["a bell"], "steps": [100_000]}), "steps"),
                           (pd.DataFrame({"caption": ["a bell"] * (MAX_REQUEST_ROWS + 1)}), "rows")]:
        with pytest.raises(MlflowException, match=match) as err:
            model.predict(request)
        assert err.value.get_http_status_code() == 400
    out = model.predict(pd.DataFrame({"caption": ["a bell"], "seed": [1], "steps": [2]}))
    assert len(out) == 1 and len(out["audio"][0]) > 0
