"""What the driver forwards to Ray workers through runtime envs: never a credential (issue 15)."""

from __future__ import annotations

from pipelines.core.cluster import FORWARDED_ENV, forwarded_env


def test_credentials_and_uris_with_a_password_are_not_forwarded(monkeypatch, capsys):
    env = {"AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": "s3cret", "AWS_SESSION_TOKEN": "tok",
           "MLFLOW_TRACKING_PASSWORD": "pw", "MLFLOW_TRACKING_TOKEN": "tk",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "MLFLOW_TRACKING_URI": "postgresql://mlflow:hunter2@db/mlflow"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = forwarded_env()
    assert out["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert "hunter2" not in repr(out) and "MLFLOW_TRACKING_URI" not in out
    assert "not forwarding MLFLOW_TRACKING_URI" in capsys.readouterr().out
    for secret in ("AKIAFAKE", "s3cret", "tok", "pw", "tk"):
        assert secret not in out.values()
    assert not {n for n in FORWARDED_ENV if "KEY" in n or "TOKEN" in n or "PASSWORD" in n or "SECRET" in n}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert forwarded_env()["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
