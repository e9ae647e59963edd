"""The DAG runner's bookkeeping, with stand-in stages (no training needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import load_pipeline_config
from pipelines.core import storage
from pipelines.core.dag import format_summary, run_dag, select, with_needs
from pipelines.core.stage import Stage

CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"


class Trainer(Stage):
    """Like a training stage: ``steps`` is not in its hash, and it is done only at ``steps``."""

    name, needs = "trainer", ()

    def version(self, marker):
        return marker["steps"]

    def key(self, ctx):
        return {"lr": ctx.cfg.train_vae.lr}

    def done(self, marker, ctx):
        return marker["steps"] >= ctx.cfg.train_vae.steps

    def run(self, ctx, out):
        storage.write_bytes(storage.join(out, "weights"), str(ctx.cfg.train_vae.steps).encode())
        return {"steps": ctx.cfg.train_vae.steps}


class User(Stage):
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


class Vetoer(Stage):
    """Finishes, then finds its own output wrong for what follows (like the text width check)."""

    name, needs = "vetoer", ()

    def key(self, ctx):
        return {}

    def run(self, ctx, out):
        return {"width": 7}

    def check(self, ctx, marker):
        if marker["width"] != 8:
            raise ValueError(f"width {marker['width']}")

    def summary(self, info):
        return [f"width {info['width']}"]


def test_a_stage_check_stops_the_dag_before_the_next_stage_even_when_skipped(ray_local, tmp_path):
    cfg = load_pipeline_config(CONFIG, [f"storage.root={tmp_path}", "train_vae.steps=5"])
    for _ in range(2):  # the first time it runs, the second it is skipped: both stop
        with pytest.raises(ValueError, match="width 7"):
            run_dag(cfg, [Vetoer(), Trainer()])
        assert not list(tmp_path.glob("data/*/trainer-*/_SUCCESS.json"))
    with pytest.raises(ValueError, match="width 7"):  # also when only a later stage is selected
        run_dag(cfg, [Vetoer(), Trainer()], only=["trainer"])


def test_the_summary_shows_each_stage_its_own_lines(ray_local, tmp_path):
    class Fine(Vetoer):
        def check(self, ctx, marker):
            pass

    reports = run_dag(load_pipeline_config(CONFIG, [f"storage.root={tmp_path}"]), [Fine()])
    assert reports[0].notes == ["width 7"]
    assert "\n" + " " * 14 + "width 7" in format_summary(reports)


def test_a_config_found_wrong_by_a_check_exits_2_naming_the_key(ray_local, tmp_path, capsys):
    from lafma.config import ConfigError
    from pipelines.core.cli import run_dag_or_exit

    class Narrow(Vetoer):
        def check(self, ctx, marker):
            raise ConfigError("unet.context_dim", f"produced {marker['width']}-d embeddings")

    with pytest.raises(SystemExit) as e:
        run_dag_or_exit(load_pipeline_config(CONFIG, [f"storage.root={tmp_path}"]), [Narrow()])
    assert e.value.code == 2
    assert "config error: unet.context_dim: produced 7-d embeddings" in capsys.readouterr().err


def test_training_stages_version_by_the_steps_they_reached():
    """What makes a resumed-to-more-steps training stage invalidate its dependants (above)."""
    from pipelines.stages import STAGES

    by_name = {s.name: s for s in STAGES}
    for name in ("train_vae", "train_vocoder", "train_lfm"):
        assert by_name[name].version({"steps": 7}) == 7
    assert all(by_name[n].version({"steps": 7}) is None for n in ("ingest", "audio", "text", "latents", "package"))
