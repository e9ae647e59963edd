"""How a job gets its Ray cluster: the one it was submitted to, or a local one."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit

import ray

from pipelines.config import ComputeConfig
from pipelines.core import console

# Environment the workers need: the S3 endpoint and region, offline hub settings, where tracking
# and DeepSpeed's op cache live. Never credentials: Ray keeps a runtime env in its job table and
# returns it in clear from the Jobs API, so workers get S3 and MLflow credentials from their own
# node (instance profile, IRSA, the pod's env from a Secret; locally, the environment Ray was
# started in). See SECURITY.md.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME",
                 "MLFLOW_TRACKING_URI", "TORCH_EXTENSIONS_DIR")


def forwarded_env(names: Iterable[str] = FORWARDED_ENV) -> dict[str, str]:
    """The variables of ``names`` set here, for a runtime env: a URI that carries a password
    (``postgresql://user:secret@db/mlflow``) is left out, with a line saying so, for the same
    reason no credential is forwarded."""
    env = {}
    for name in names:
        value = os.environ.get(name)
        if value is None:
            continue
        if "://" in value and urlsplit(value).password:
            print(f"[ray] not forwarding {name} to the workers: it carries a password, which Ray would keep in "
                  "its job table; set it in the nodes' own environment", flush=True)
            continue
        env[name] = value
    return env


# The address init_ray put in this process's environment for the local cluster it started: a
# later init_ray in the same process (after ray.shutdown) starts a new one instead of looking
# for that one.
_OWN_ADDRESS: str | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _env_set(name: str, value: str | None) -> Iterator[None]:
    """``os.environ[name] = value`` for the block (nothing when ``value`` is None)."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def init_ray(compute: ComputeConfig) -> None:
    """Connect once: to ``compute.ray_address``, to RAY_ADDRESS (set under ``ray job submit``),
    or to a new local cluster that addresses itself.

    A local cluster is started explicitly (``address="local"``), never joined from whatever
    ``/tmp/ray/ray_current_cluster`` names, and its own GCS address is set as RAY_ADDRESS in the
    driver and, through the runtime env, in every worker and actor it starts. Ray's state API
    resolves an address it is not given from RAY_ADDRESS, else from the GCS processes it finds
    on the machine (``ray._private.services.canonicalize_bootstrap_address_or_die``): with a
    second cluster on the host, Ray Train V2's placement-group cleaner then fails ("Found
    multiple active Ray instances") or asks the other cluster, finds no controller and removes
    the running job's placement group; Ray Data's hanging-task detector asks it too.
    """
    global _OWN_ADDRESS
    if ray.is_initialized():
        return
    if _OWN_ADDRESS is not None and os.environ.get("RAY_ADDRESS") == _OWN_ADDRESS:
        del os.environ["RAY_ADDRESS"]  # the cluster this process started earlier, now shut down
    _OWN_ADDRESS = None
    # Under `ray job submit`, variables the job's runtime env already sets reach every worker;
    # passing them again makes Ray refuse to merge the driver's runtime env with the job's.
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    job_env = (job.get("runtime_env") or {}).get("env_vars") or {}
    env = {k: v for k, v in forwarded_env().items() if k not in job_env}
    env |= {k: v for k, v in console.worker_env().items() if k not in job_env}
    # Ray Train patches print() in its workers to log through its logger *and*, because Ray has
    # wrapped sys.stdout, print as well: every line reached the driver twice. Plain print.
    if "RAY_TRAIN_ENABLE_PRINT_PATCH" not in job_env:
        env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    address = compute.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address == "local":  # Ray's word for a new local cluster: this one, addressed as below
        address = None
    # A local cluster gets its dashboard (on 127.0.0.1 only): Ray Train's placement-group
    # cleaner queries the state API it serves, and warns every few seconds without it.
    local = {"include_dashboard": True, "dashboard_host": "127.0.0.1"} if address is None else {}
    own = None
    if address is None:
        # The GCS port is chosen here (the head reads RAY_GCS_SERVER_PORT as it starts), so the
        # address is known before the first worker starts and goes in the runtime env.
        # The host is the node's IP, as Ray builds the GCS address (it maps 127.0.0.1 to it too).
        own = f"{ray.util.get_node_ip_address()}:{_free_port()}"
        env["RAY_ADDRESS"] = own
    console.quiet_driver()
    with _env_set("RAY_GCS_SERVER_PORT", own.rsplit(":", 1)[1] if own else None):
        info = ray.init(address=address or "local", runtime_env={"env_vars": env} if env else None,
                        logging_level=logging.WARNING, log_to_driver=True, **local)
    if own is not None:
        started = info.address_info.get("gcs_address")
        if started != own:  # the env var was not honoured: the workers would name another address
            ray.shutdown()
            raise RuntimeError(f"the local Ray cluster started at {started}, not at {own} as asked "
                               "(RAY_GCS_SERVER_PORT); its workers could not address it")
        os.environ["RAY_ADDRESS"] = _OWN_ADDRESS = own  # the driver's own state-API lookups
    if address is None and getattr(info, "dashboard_url", None):
        logs = os.path.join(info.address_info.get("session_dir") or "/tmp/ray/session_latest", "logs")
        print(f"[ray] local cluster at {own}; dashboard at http://{info.dashboard_url}; Ray's logs in {logs}", flush=True)
    ctx = ray.data.DataContext.get_current()
    # Bars on a terminal; without one the stages' own lines report progress (see console).
    ctx.enable_progress_bars = console.progress_bars()
    # Not the "Starting execution ... / Execution plan ..." pair Ray Data logs per dataset, in
    # the driver's output and each Train ingest actor's alike (the dashboard shows the plan).
    ctx.print_on_execution_start = False
