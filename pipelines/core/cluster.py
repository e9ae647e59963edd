"""How a job gets its Ray cluster: the one it was submitted to, or a local one."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
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


def init_ray(compute: ComputeConfig) -> None:
    """Connect once. Under ``ray job submit`` RAY_ADDRESS points at the cluster; else start locally."""
    if ray.is_initialized():
        return
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
    # A local cluster gets its dashboard (on 127.0.0.1 only): Ray Train's placement-group
    # cleaner queries the state API it serves, and warns every few seconds without it.
    local = {"include_dashboard": True, "dashboard_host": "127.0.0.1"} if address is None else {}
    console.quiet_driver()
    info = ray.init(address=address, runtime_env={"env_vars": env} if env else None,
                    logging_level=logging.WARNING, log_to_driver=True, **local)
    if address is None and getattr(info, "dashboard_url", None):
        logs = os.path.join(info.address_info.get("session_dir") or "/tmp/ray/session_latest", "logs")
        print(f"[ray] local cluster; dashboard at http://{info.dashboard_url}; Ray's logs in {logs}", flush=True)
    ctx = ray.data.DataContext.get_current()
    # Bars on a terminal; without one the stages' own lines report progress (see console).
    ctx.enable_progress_bars = console.progress_bars()
    # Not the "Starting execution ... / Execution plan ..." pair Ray Data logs per dataset, in
    # the driver's output and each Train ingest actor's alike (the dashboard shows the plan).
    ctx.print_on_execution_start = False
