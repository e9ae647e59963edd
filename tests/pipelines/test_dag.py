"""The DAG runner's bookkeeping, with stand-in stages (no training needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import load_pipeline_config
from pipelines.core import storage
from pipelines.core.dag import run_dag, select, with_needs

CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"


class Trainer:
    """Like a training stage: ``steps`` is not in its hash, and it is done only at ``steps``."""

    name, needs = "trainer", ()

    def key(self, ctx):
        return {"lr": ctx.cfg.train_vae.lr}

    def done(self, marker, ctx):
        return marker["steps"] >= ctx.cfg.train_vae.steps

    def run(self, ctx, out):
        storage.write_bytes(storage.join(out, "weights"), str(ctx.cfg.train_vae.steps).encode())
        return {"steps": ctx.cfg.train_vae.steps}


class User:
    name, needs = "user", ("trainer",)

    def key(self, ctx):
        return {"trainer": ctx.hashes["trainer"]}

    def run(self, ctx, out):
        return {"saw": storage.read_bytes(storage.join(ctx.outputs["trainer"], "weights")).decode()}


def test_more_steps_resume_in_place_and_invalidate_what_depends_on_the_weights(ray_local, tmp_path):
    stages = [Trainer(), User()]
    first = {r.name: r for r in run_dag(load_pipeline_config(CONFIG, [f"storage.root={tmp_path}", "train_vae.steps=5"]), stages)}
    again = {r.name: r for r in run_dag(load_pipeline_config(CONFIG, [f"storage.root={tmp_path}", "train_vae.steps=5"]), stages)}
    assert [again[n].status for n in ("trainer", "user")] == ["skipped", "skipped"]
    more = {r.name: r for r in run_dag(load_pipeline_config(CONFIG, [f"storage.root={tmp_path}", "train_vae.steps=9"]), stages)}
    assert more["trainer"].status == "ran" and more["trainer"].path == first["trainer"].path  # resumed in place
    assert more["user"].status == "ran" and more["user"].path != first["user"].path  # not stale
    assert more["user"].info["saw"] == "9"
    fewer = {r.name: r for r in run_dag(load_pipeline_config(CONFIG, [f"storage.root={tmp_path}", "train_vae.steps=3"]), stages)}
    assert fewer["trainer"].status == "skipped"  # already past 3 steps


def test_selection():
    names = ["ingest", "audio", "text", "train_vae"]
    assert select(names, until="audio") == ["ingest", "audio"]
    assert select(names, start="text") == ["text", "train_vae"]
    assert select(names, only=["audio"]) == ["audio"]
    with pytest.raises(SystemExit, match="unknown stage"):
        select(names, only=["audoi"])
    from pipelines.stages import STAGES

    assert with_needs(STAGES, "train_vocoder") == ["ingest", "audio", "train_vocoder"]
    assert with_needs(STAGES, "train_lfm") == [s.name for s in STAGES][: [s.name for s in STAGES].index("train_lfm") + 1]
    assert with_needs(STAGES, "promote") == [s.name for s in STAGES if s.name != "generate"]
    assert with_needs(STAGES, "generate") == [s.name for s in STAGES if s.name not in ("evaluate", "promote")]
