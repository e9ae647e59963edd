"""pipelines.core.registry's gate, promote and rollback against a real sqlite MLflow store.

Versions are made with the registry API (``create_model_version``) and tagged as
:func:`registry.register` tags them, without logging a bundle; no Ray.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipelines import promote as promote_cli
from pipelines.core import registry, tracking


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A migrated, empty MLflow sqlite file: each test copies it, as migrating takes seconds."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_registered_models()
    return db


@pytest.fixture
def root(tmp_path, empty_store, monkeypatch) -> str:
    """This test's own storage root, its store holding the registered model ``lafma``."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(empty_store, store / "mlflow.db")
    _client(str(store)).create_registered_model(registry.MODEL_NAME)
    (tmp_path / "model").mkdir()
    return str(store)


def _client(root: str) -> MlflowClient:
    return MlflowClient(tracking.tracking_uri(root))


def _version(root: str, value: float, metric: str = "fd", lower_is_better: bool = True) -> str:
    """A new version of ``lafma`` gated on ``metric`` = ``value``, now the ``candidate``."""
    source = str(Path(root).parent / "model")
    version = str(_client(root).create_model_version(registry.MODEL_NAME, source=source).version)
    registry.mark_candidate(version, root=root, gate_metric=metric, gate_value=value,
                            lower_is_better=lower_is_better)
    return version


def _champion(root: str) -> str | None:
    aliases = _client(root).get_registered_model(registry.MODEL_NAME).aliases
    return str(aliases[registry.CHAMPION]) if registry.CHAMPION in aliases else None


def _tags(root: str, version: str) -> dict[str, str]:
    return _client(root).get_model_version(registry.MODEL_NAME, version).tags


def _history(root: str) -> list[dict]:
    tags = _client(root).get_registered_model(registry.MODEL_NAME).tags
    return json.loads(tags[registry.HISTORY_TAG])


def _three_by_hand(root: str) -> tuple[str, str, str]:
    versions = tuple(_version(root, 1.0) for _ in range(3))
    for v in versions:
        registry.promote(v, root=root, reason=f"listen {v}", by="alice")
    return versions


# ---- rollback -------------------------------------------------------------------------------

def test_rollback_walks_down_the_champion_stack_and_stops_at_its_bottom(root):
    v1, v2, v3 = _three_by_hand(root)
    assert registry.rollback(root=root, reason="v3 clicks", by="bob") == v2 and _champion(root) == v2
    assert registry.rollback(root=root, reason="v2 hums", by="bob") == v1 and _champion(root) == v1
    with pytest.raises(ValueError, match="nothing to roll back to"):
        registry.rollback(root=root, reason="again", by="bob")
    assert _champion(root) == v1


def test_rollback_keeps_the_promotion_record_of_the_version_it_returns_to(root):
    v1, v2, v3 = _three_by_hand(root)
    registry.rollback(root=root, reason="v3 clicks", by="bob")
    tags = _tags(root, v2)
    assert (tags["lafma.promoted_by"], tags["lafma.promoted_reason"], tags["lafma.previous_champion"]) == (
        "alice", f"listen {v2}", v1)
    assert (tags["lafma.rolled_back_from"], tags["lafma.rolled_back_by"], tags["lafma.rolled_back_reason"]) == (
        v3, "bob", "v3 clicks")
    assert tags["lafma.rolled_back_at"]
    log = _history(root)
    assert [(e["action"], e["version"]) for e in log] == [("promote", v1), ("promote", v2), ("promote", v3),
                                                          ("rollback", v2)]
    assert (log[-1]["from"], log[-1]["by"], log[-1]["reason"]) == (v3, "bob", "v3 clicks") and log[-1]["at"]


def test_a_declared_name_is_recorded_beside_the_identity_the_process_can_verify(root, monkeypatch):
    import getpass
    import socket

    v1, v2 = _version(root, 1.0), _version(root, 1.0)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "carol")  # not a server URI: no MLflow user is verified
    registry.promote(v1, root=root, reason="first", by="alice")
    registry.promote(v2, root=root, reason="second", by="mallory")  # anyone can type a name
    registry.rollback(root=root, reason="v2 clicks", by="mallory")
    me = f"{getpass.getuser()}@{socket.gethostname()}"
    tags = _tags(root, v2)
    assert (tags["lafma.promoted_by"], tags["lafma.promoted_by_os"]) == ("mallory", me)
    assert "lafma.promoted_by_mlflow" not in tags
    assert (_tags(root, v1)["lafma.rolled_back_by"], _tags(root, v1)["lafma.rolled_back_by_os"]) == ("mallory", me)
    assert [e["verified"] for e in _history(root)] == [{"os": me}] * 3


def test_a_promotion_after_a_rollback_is_pushed_and_rolled_back_like_any_other(root):
    v1, v2, v3 = _three_by_hand(root)
    registry.rollback(root=root, reason="v3 clicks", by="bob")
    v4 = _version(root, 0.5)
    assert registry.promote(v4, root=root, reason="fixed", by="alice") == v2
    assert registry.champion_stack(root=root) == [v1, v2, v4]
    assert [registry.rollback(root=root, reason="r", by="bob") for _ in range(2)] == [v2, v1]


def test_gate_promotions_are_rolled_back_too(root):
    v1 = _version(root, 3.0)
    assert registry.gate(root=root).outcome == "promoted"
    v2 = _version(root, 2.0)
    assert registry.gate(root=root).outcome == "promoted"
    assert registry.rollback(root=root, reason="r", by="bob") == v1
    with pytest.raises(ValueError, match=f"v{v1} replaced no earlier version; nothing to roll back to"):
        registry.rollback(root=root, reason="r", by="bob")
    assert _tags(root, v2)["lafma.promoted_by"] == "gate"


def test_an_alias_moved_back_by_hand_cuts_the_stack_there(root):
    v1, v2, v3 = _three_by_hand(root)
    _client(root).set_registered_model_alias(registry.MODEL_NAME, registry.CHAMPION, v2)  # the MLflow UI
    assert registry.champion_stack(root=root) == [v1, v2]
    assert registry.rollback(root=root, reason="r", by="bob") == v1  # below the alias, not v2 or v3
    with pytest.raises(ValueError, match="nothing to roll back to"):
        registry.rollback(root=root, reason="r", by="bob")


def test_an_alias_moved_to_a_version_off_the_stack_refuses_rollback_and_says_why(root):
    _three_by_hand(root)
    v4 = _version(root, 1.0)
    _client(root).set_registered_model_alias(registry.MODEL_NAME, registry.CHAMPION, v4)  # the MLflow UI
    with pytest.raises(ValueError, match=rf"v{v4} is not on the champion stack .*moved outside"):
        registry.rollback(root=root, reason="r", by="bob")
    assert _champion(root) == v4
    # A promotion from there replaced v4, whatever the stack said before.
    v5 = _version(root, 1.0)
    assert registry.promote(v5, root=root, reason="r", by="alice") == v4
    assert registry.champion_stack(root=root) == [v4, v5]
    assert registry.rollback(root=root, reason="r", by="bob") == v4


def test_promote_refuses_the_champion_and_a_missing_version(root):
    v1 = _version(root, 1.0)
    registry.promote(v1, root=root, reason="r", by="alice")
    with pytest.raises(ValueError, match="already the champion"):
        registry.promote(v1, root=root, reason="r", by="alice")
    with pytest.raises(mlflow.exceptions.MlflowException, match="99"):
        registry.promote("99", root=root, reason="r", by="alice")
    assert registry.champion_stack(root=root) == [v1] and len(_history(root)) == 1


def test_rollback_without_a_champion_refuses(root):
    _version(root, 1.0)
    with pytest.raises(ValueError, match="no champion to roll back"):
        registry.rollback(root=root, reason="r", by="bob")


def test_the_champion_log_fits_a_sql_tag_and_keeps_the_newest(root):
    # MLflow's SQL stores keep registered-model tags in VARCHAR(5000); sqlite would not complain.
    pair = _version(root, 1.0), _version(root, 1.0)
    for i in range(12):
        registry.promote(pair[i % 2], root=root, reason=f"{i} " + "x" * 1000, by="alice")
    model = _client(root).get_registered_model(registry.MODEL_NAME)
    assert all(len(model.tags[k]) <= 5000 for k in (registry.HISTORY_TAG, registry.STACK_TAG))
    log = _history(root)
    assert log[-1]["reason"].startswith("11 ") and len(log) < 12
    assert _tags(root, pair[1])["lafma.promoted_reason"] == "11 " + "x" * 1000  # in full on the version


# ---- the gate -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, champion, candidate, outcome", [
    ("min", 1.0, 0.5, "promoted"), ("min", 1.0, 2.0, "kept"), ("min", 1.0, 1.0, "kept"),
    ("max", 1.0, 2.0, "promoted"), ("max", 1.0, 0.5, "kept"), ("max", 1.0, 1.0, "kept"),
])
def test_the_gate_follows_the_metric_direction_and_a_tie_keeps_the_champion(root, mode, champion, candidate,
                                                                          outcome):
    v1 = _version(root, champion, lower_is_better=mode == "min")
    registry.promote(v1, root=root, reason="r", by="alice")
    v2 = _version(root, candidate, lower_is_better=mode == "min")
    d = registry.gate(root=root)
    assert (d.outcome, d.promoted, d.candidate, d.champion) == (outcome, outcome == "promoted", v2, v1)
    assert _champion(root) == (v2 if d.promoted else v1)
    assert ("lower is better" if mode == "min" else "higher is better") in d.reason
    assert ("ties" in d.reason) == (champion == candidate)


def test_the_first_measured_version_becomes_champion(root):
    v1 = _version(root, 4.0)
    d = registry.gate(root=root)
    assert (d.outcome, d.champion, _champion(root)) == ("promoted", None, v1) and "no champion yet" in d.reason
    assert registry.gate(root=root).outcome == "already_champion"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("with_champion", [False, True])
def test_a_candidate_without_a_finite_value_never_becomes_champion(root, value, with_champion):
    before = None
    if with_champion:
        before = _version(root, 1.0)
        registry.promote(before, root=root, reason="r", by="alice")
    cand = _version(root, value)
    d = registry.gate(root=root)
    assert (d.outcome, d.promoted, _champion(root)) == ("nan", False, before)
    assert f"version {cand} has no fd value" in d.reason


def test_a_champion_without_a_value_does_not_stay_against_a_measured_candidate(root):
    v1 = _version(root, float("nan"))
    registry.promote(v1, root=root, reason="imported", by="alice")
    v2 = _version(root, 9.0)
    d = registry.gate(root=root)
    assert (d.outcome, _champion(root)) == ("promoted", v2)
    assert f"champion v{v1} has no gate value" in d.reason


@pytest.mark.parametrize("metric, lower_is_better", [("fd", False), ("clap", True)])
def test_another_metric_or_direction_is_not_comparable(root, metric, lower_is_better):
    v1 = _version(root, 1.0, metric="fd", lower_is_better=True)
    registry.promote(v1, root=root, reason="r", by="alice")
    _version(root, 5.0 if not lower_is_better else 0.1, metric=metric, lower_is_better=lower_is_better)
    d = registry.gate(root=root)  # would beat the champion if compared
    assert (d.outcome, _champion(root)) == ("not_comparable", v1) and "not comparable" in d.reason


def test_a_candidate_with_an_unknown_direction_is_not_comparable(root):
    v1 = _version(root, 1.0)
    _client(root).set_model_version_tag(registry.MODEL_NAME, v1, registry.GATE_MODE_TAG, "lowest")
    d = registry.gate(root=root)
    assert (d.outcome, _champion(root)) == ("not_comparable", None) and "'lowest'" in d.reason


# ---- pipelines/promote.py -------------------------------------------------------------------

def test_the_cli_rolls_back_twice_then_refuses(root, capsys):
    v1, v2, v3 = _three_by_hand(root)
    for expected in (v2, v1):
        assert promote_cli.main(["--root", root, "--rollback", "--reason", "clicks", "--by", "bob"]) == 0
        assert f"champion -> v{expected}" in capsys.readouterr().out and _champion(root) == expected
    assert promote_cli.main(["--root", root, "--rollback", "--reason", "clicks"]) == 1
    assert "nothing to roll back to" in capsys.readouterr().err and _champion(root) == v1


def test_the_cli_gate_prints_the_outcome(root, capsys):
    v1 = _version(root, 1.0)
    assert promote_cli.main(["--root", root, "--gate"]) == 0
    assert capsys.readouterr().out.startswith(f"v{v1} promoted: no champion yet")
    v2 = _version(root, 2.0)
    assert promote_cli.main(["--root", root, "--gate"]) == 0
    assert capsys.readouterr().out.startswith(f"v{v2} kept: fd: candidate 2 does not beat champion v{v1} 1")


def test_the_cli_shows_the_stack(root, capsys):
    assert promote_cli.main(["--root", root, "--show"]) == 0
    assert "champion stack: empty" in capsys.readouterr().out
    v1, v2, v3 = _three_by_hand(root)
    assert promote_cli.main(["--root", root, "--show"]) == 0
    assert f"champion stack (oldest first): v{v1} > v{v2} > v{v3} (rollback returns to v{v2})" in (
        capsys.readouterr().out)
