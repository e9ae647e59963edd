"""A batch job resumes only under the plan that made its finished parts: the resolved model
(an alias pinned to its version), the planned rows and the settings. Per-row settings reach
the model, and the manifest says which model made each clip."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file

from lafma.bundle import write_bundle
from lafma.config import ConfigError, to_dict
from lafma.models import build_pipeline, build_unet, build_vae, build_vocoder
from pipelines.config import load_pipeline_config
from pipelines.generation import GenerationSettings, run_generation
from tests.pipelines.conftest import BUCKET
from tests.pipelines.test_generate import write_csv

CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"


def stir(unet: torch.nn.Module) -> torch.nn.Module:
    """Noise on every weight: a fresh UNet's output layers are zero-initialised, so its velocity
    is 0 whatever the caption, and guidance could change nothing."""
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def make_bundle(path: Path, seed: int) -> str:
    """configs/test.yaml's generator with random weights (``seed``), as a bundle directory."""
    cfg = load_pipeline_config(CONFIG)
    torch.manual_seed(seed)
    weights = {}
    for name, build in {"unet": lambda c: stir(build_unet(c)), "vae": build_vae, "vocoder": build_vocoder}.items():
        weights[name] = str(path.parent / f"{path.name}-{name}.safetensors")
        save_file({k: v.contiguous() for k, v in build(cfg).state_dict().items()}, weights[name],
                  metadata={"mel_hash": cfg.mel.config_hash(), "component": name})
    write_bundle(str(path), components={n: to_dict(cfg) for n in weights}, weights=weights)
    return str(path)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> tuple[str, str]:
    """Two bundles of the same architecture with different weights."""
    tmp = tmp_path_factory.mktemp("bundles")
    return make_bundle(tmp / "a", 0), make_bundle(tmp / "b", 1)


def settings(model: str, **kw) -> GenerationSettings:
    return GenerationSettings(model=model, **{"steps": 2, "batch_size": 2, "actor_cpus": 0.5, **kw})


CAPTIONS = [{"id": "bell", "caption": "a bell rings"}, {"id": "dog", "caption": "a dog barks"},
            {"id": "rain", "caption": "rain on a roof"}]


def snapshot(out: Path) -> dict[str, int]:
    """Every file under ``out`` and its modification time (ns): what a refused run must not touch."""
    return {str(p): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_a_rerun_resumes_under_the_same_plan_and_refuses_any_other(ray_local, bundles, tmp_path):
    a, b = bundles
    captions = write_csv(tmp_path / "captions.csv", CAPTIONS)
    out = tmp_path / "out"
    first = run_generation(str(captions), str(out), settings(a), root=str(tmp_path))
    plan = json.loads((out / "plan.json").read_text())
    version = plan["model"]["version"]
    assert version.startswith("bundle@sha256:") and plan["model"]["uri"] == a
    assert plan["settings"]["steps"] == 2 and plan["settings"]["batch_size"] == 2 and len(plan["rows"]) == 3
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.column_names[:10] == ["id", "caption", "seed", "steps", "guidance", "solver", "nfe", "duration",
                                          "path", "seconds"]
    assert manifest.column("model_version").to_pylist() == [version] * 3
    assert "model_version" in (out / "manifest.csv").read_text().splitlines()[0]
    assert json.loads((out / "_SUCCESS.json").read_text())["model_version"] == version == first["model_version"]

    # The same plan: resumed exactly, nothing regenerated (the same --model spelt otherwise too).
    before = snapshot(out / "parts")
    again = run_generation(str(captions), str(out), settings(os.path.relpath(a)), root=str(tmp_path))
    assert again["generated_now"] == 0 and again["rows"] == 3 and snapshot(out / "parts") == before

    edited = write_csv(tmp_path / "edited.csv", [{**CAPTIONS[0], "caption": "a bell rings twice"}, *CAPTIONS[1:],
                                                 {"id": "wind", "caption": "wind in trees"}])
    refused = {
        "steps: 2 -> 3": (captions, settings(a, steps=3)),
        "guidance: 3.0 -> 1.5": (captions, settings(a, guidance=1.5)),
        "solver: euler -> heun": (captions, settings(a, solver="heun")),
        "duration: 1.28 -> 1.0": (captions, settings(a, duration=1.0)),
        "seed: 0 -> 5": (captions, settings(a, seed=5)),
        "batch_size: 2 -> 3": (captions, settings(a, batch_size=3)),
        "rows: 1 changed, 1 added": (edited, settings(a)),
        f"model: {version} -> bundle@sha256:": (captions, settings(b)),
    }
    everything = snapshot(out)
    for change, (file, s) in refused.items():
        with pytest.raises(ConfigError) as err:
            run_generation(str(file), str(out), s, root=str(tmp_path))
        message = str(err.value)
        assert change in message and f"delete {out}" in message and "new --out" in message, message
        assert "\n" not in message
    assert "(--model " in message  # the model's change says which --model each plan had
    assert snapshot(out) == everything  # refused before anything was written


def test_parts_without_a_plan_are_refused_and_a_folder_without_parts_is_not(ray_local, bundles, tmp_path):
    a, _ = bundles
    captions = write_csv(tmp_path / "captions.csv", CAPTIONS)
    out = tmp_path / "old"
    run_generation(str(captions), str(out), settings(a), root=str(tmp_path))
    (out / "plan.json").unlink()  # as an older version left it
    with pytest.raises(ConfigError, match=r"holds 2 finished shards but no plan\.json.*delete"):
        run_generation(str(captions), str(out), settings(a), root=str(tmp_path))

    stray = tmp_path / "stray"  # a job killed before its first shard finished: wavs, no parts
    (stray / "wavs").mkdir(parents=True)
    (stray / "wavs" / "bell.wav").write_bytes(b"partial")
    summary = run_generation(str(captions), str(stray), settings(a), root=str(tmp_path))
    assert summary["generated_now"] == 3 and (stray / "plan.json").is_file()


def test_the_cli_names_what_changed_in_one_line_and_exits_2(ray_local, bundles, tmp_path, capsys):
    from pipelines.generate import main

    a, _ = bundles
    captions = write_csv(tmp_path / "captions.csv", CAPTIONS[:2])
    out = tmp_path / "out"
    common = ["--captions", str(captions), "--model", a, "--out", str(out), "--root", str(tmp_path),
              "--actor-cpus", "0.5"]
    assert main([*common, "--steps", "2"]) == 0
    capsys.readouterr()
    assert main([*common, "--steps", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("generate: ") and "steps: 2 -> 4" in err and len(err.splitlines()) == 1, err
    assert main([*common, "--model", str(tmp_path / "nowhere")]) == 2
    assert "no model at" in capsys.readouterr().err


def test_an_alias_is_pinned_to_its_version_and_a_moved_alias_is_refused(ray_local, bundles, tmp_path, monkeypatch):
    from pipelines.core import registry, tracking
    from pipelines.generation import GenerateShard, resolve_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = str(tmp_path / "store")
    versions = []
    for value, bundle in zip((1.0, 2.0), bundles):
        run = tracking.start_run(root=store, experiment="plan-test", run_name=f"v-{value}")
        versions.append(registry.register(bundle, root=store, run_id=run, gate_metric="heldout/fm_loss",
                                          gate_value=value).version)
    assert versions == ["1", "2"]
    registry.promote("1", root=store, reason="test")
    captions = write_csv(tmp_path / "captions.csv", CAPTIONS)
    out = tmp_path / "out"
    run_generation(str(captions), str(out), settings("models:/lafma@champion"), root=store)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["model"] == {"given": "models:/lafma@champion", "uri": "models:/lafma/1", "version": "models:/lafma/1"}
    assert set(pq.read_table(out / "manifest.parquet").column("model_version").to_pylist()) == {"models:/lafma/1"}

    # Killed after two shards; meanwhile the champion moves: the alias no longer names v1.
    parts = sorted((out / "parts").glob("*.parquet"))
    parts[-1].unlink()
    registry.promote("2", root=store, reason="test")
    with pytest.raises(ConfigError, match=r"model: v1 -> v2 \(models:/lafma@champion moved\)"):
        run_generation(str(captions), str(out), settings("models:/lafma@champion"), root=store)
    # The version the plan pinned finishes the job: one shard, every clip from v1.
    summary = run_generation(str(captions), str(out), settings("models:/lafma/1"), root=store)
    assert summary["generated_now"] == 1 and summary["model_version"] == "models:/lafma/1"
    assert pq.read_table(out / "manifest.parquet").column("model_version").to_pylist() == ["models:/lafma/1"] * 3
    with pytest.raises(ConfigError, match="not in the registry"):
        resolve_model("models:/lafma@nobody", root=store)

    # An actor loads the pinned URI, not the alias (now on v2): its clip is v1's.
    pinned = resolve_model("models:/lafma/1", root=store)
    actor = GenerateShard(asdict(pinned), store, str(tmp_path / "actor"))
    row = {"id": "x", "name": "x", "caption": "a bell rings", "seed": 3, "steps": 2, "guidance": 3.0,
           "solver": "euler", "duration": 1.28}
    actor(pa.Table.from_pylist([{"shard": 0, "rows": [row]}]))
    clip, _ = sf.read(tmp_path / "actor" / "wavs" / "x.wav", dtype="float32")
    want = [registry.load_pipeline(b, root=store).generate(["a bell rings"], seeds=[3], steps=2).audio[0]
            for b in bundles]
    assert np.abs(clip - want[0].numpy()).max() < 1e-3 < np.abs(clip - want[1].numpy()).max()


def test_a_job_on_s3_resumes_what_is_missing_and_refuses_another_plan(ray_local, s3_endpoint, bundles, tmp_path):
    import fsspec

    a, _ = bundles
    fs = fsspec.filesystem("s3", skip_instance_cache=True)  # not the instance the job caches listings in
    base = f"s3://{BUCKET}/plan-{tmp_path.name}"
    captions = f"{base}/captions.csv"
    write_csv(tmp_path / "captions.csv", CAPTIONS)
    fs.put(str(tmp_path / "captions.csv"), captions)
    out = f"{base}/gen"
    first = run_generation(captions, out, settings(a), root=str(tmp_path))
    assert first["generated_now"] == 3 and fs.exists(f"{out}/plan.json") and len(fs.glob(f"{out}/wavs/*.wav")) == 3
    assert json.loads(fs.cat(f"{out}/_SUCCESS.json"))["model_version"] == first["model_version"]

    assert run_generation(captions, out, settings(a), root=str(tmp_path))["generated_now"] == 0
    fs.rm(f"{out}/parts/shard-00001.parquet")  # a shard lost to a crash, behind the job's back
    resumed = run_generation(captions, out, settings(a), root=str(tmp_path))
    assert resumed["generated_now"] == 1 and resumed["rows"] == 3
    with fs.open(f"{out}/manifest.parquet", "rb") as f:
        assert sorted(pq.read_table(f).column("id").to_pylist()) == ["bell", "dog", "rain"]
    with pytest.raises(ConfigError, match="steps: 2 -> 3"):
        run_generation(captions, out, settings(a, steps=3), root=str(tmp_path))


def nfe_of(solver: str, steps: int, guidance: float) -> int:
    """Fixed-step solvers evaluate every tableau stage each step (midpoint's and Heun's two
    too: no first-same-as-last); guidance other than 1 runs each evaluation as a doubled batch."""
    from lafma.flow.solvers import TABLEAUX

    return len(TABLEAUX[solver][1]) * steps * (1 if guidance == 1 else 2)


def test_per_row_settings_in_a_caption_file_reach_the_model(ray_local, bundles, tmp_path):
    a, _ = bundles
    rows = [("g1", "euler", 2, 1.0), ("g3", "euler", 2, 3.0), ("mid", "midpoint", 3, 1.0), ("heun", "heun", 2, 3.0),
            ("rk4", "rk4", 1, 1.0), ("dopri", "dopri5", 2, 3.0)]
    captions = write_csv(tmp_path / "captions.csv", [
        {"id": rid, "caption": "a bell rings", "seed": 7, "solver": solver, "steps": steps, "guidance": guidance}
        for rid, solver, steps, guidance in rows])
    out = tmp_path / "out"
    summary = run_generation(str(captions), str(out), settings(a, steps=None, solver=None), root=str(tmp_path))
    assert summary["rows"] == len(rows) and summary["rejected"] == 0
    got = {r["id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    for rid, solver, steps, guidance in rows:
        assert (got[rid]["solver"], got[rid]["steps"], got[rid]["guidance"]) == (solver, steps, guidance)
        if solver != "dopri5":
            assert got[rid]["nfe"] == nfe_of(solver, steps, guidance), rid
    # dopri5: one first evaluation, then six per attempted step (the seventh is the next first).
    dopri = got["dopri"]["nfe"] // 2
    assert got["dopri"]["nfe"] > 0 and got["dopri"]["nfe"] % 2 == 0 and dopri > 1 and (dopri - 1) % 6 == 0

    def audio(rid):
        return sf.read(out / got[rid]["path"], dtype="float32")[0]

    assert np.abs(audio("g1") - audio("g3")).max() > 1e-2  # the same caption and noise, another guidance


def test_guidance_leaves_the_empty_caption_alone():
    """Batch planning rejects an empty caption (tests/pipelines/test_generate.py), so this is the
    pipeline's: with c = ∅, w·u(c) + (1 − w)·u(∅) = u(∅) for every w."""
    from lafma.data.captions import plan_generation

    _, rejects = plan_generation([{"caption": ""}], job_seed=0, steps=2, guidance=3.0, solver="euler", duration=1.28)
    assert [r["reason"] for r in rejects] == ["empty_caption"]
    torch.manual_seed(0)
    pipe = build_pipeline(load_pipeline_config(CONFIG))
    stir(pipe.unet)
    for caption, same in (("", True), ("a bell rings", False)):
        g1 = pipe.generate([caption], seeds=[7], steps=2, guidance=1.0)
        g3 = pipe.generate([caption], seeds=[7], steps=2, guidance=3.0)
        assert (g1.nfe, g3.nfe) == (2, 4)
        assert torch.allclose(g1.audio, g3.audio, atol=1e-4) is same, caption
