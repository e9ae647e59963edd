"""Session fixtures every test folder shares: a real S3 API (moto) on 127.0.0.1, one local Ray,
and the one full DAG run on configs/test.yaml (``trained``) that pipeline and benchmark tests
read."""

from __future__ import annotations

import os

import pytest

BUCKET = "lafma-test"


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test on the session's Ray (``ray_local``, and ``trained`` through it) is slow: the
    cluster alone takes seconds to start, and these run real Ray Data, Ray Train and DeepSpeed
    jobs. So ``-m "not slow"`` runs no Ray at all (see the Makefile's ``test``)."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; its endpoint and fake credentials go in the environment
    before Ray starts, so Ray workers see them too."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # the OS picks, no race
    server.start()
    _, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def trained(ray_local, tmp_path_factory):
    """The whole DAG once on configs/test.yaml (see dag_run.py): (root, cfg, {stage: report}).

    Shared by every test that uses it, in any order: read it, or change a copy
    (:func:`tests.pipelines.conftest.copy_store`), never the store itself."""
    from pipelines.config import load_pipeline_config
    from pipelines.core.dag import run_dag
    from pipelines.stages import STAGES
    from tests.pipelines.dag_run import CONFIG, overrides

    root = tmp_path_factory.mktemp("train")
    cfg = load_pipeline_config(CONFIG, overrides(root))
    reports = {r.name: r for r in run_dag(cfg, STAGES)}
    return root, cfg, reports


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """The session's local Ray, started as the pipeline starts one (:func:`init_ray`): addressed
    by its own RAY_ADDRESS, so its Train jobs' placement-group cleaner never asks another cluster
    on the machine (a pipeline a test runs as a subprocess, the two-node test's nodes, a second
    test session) and never finds several ("Found multiple active Ray instances")."""
    import ray

    from pipelines.config import ComputeConfig
    from pipelines.core.cluster import init_ray

    os.environ.setdefault("LAFMA_PROGRESS", "0")
    init_ray(ComputeConfig())
    # Its workers and actors have the address through the runtime env. Not this process's
    # environment: the pipelines tests start as subprocesses inherit it, and must start their
    # own local clusters, as on a laptop, not join this one.
    os.environ.pop("RAY_ADDRESS", None)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
