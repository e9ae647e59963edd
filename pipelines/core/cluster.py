"""How a job gets its Ray cluster: the one it was submitted to, or a local one."""

from __future__ import annotations

import json
import logging
import os

import ray

from pipelines.config import ComputeConfig
from pipelines.core import console

# Environment the workers need: S3 credentials and endpoint, and offline hub settings.
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME",
                 "MLFLOW_TRACKING_URI", "TORCH_EXTENSIONS_DIR")


def init_ray(compute: ComputeConfig) -> None:
    """Connect once. Under ``ray job submit`` RAY_ADDRESS points at the cluster; else start locally."""
    if ray.is_initialized():
        return
    # Under `ray job submit`, variables the job's runtime env already sets reach every worker;
    # passing them again makes Ray refuse to merge the driver's runtime env with the job's.
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    job_env = (job.get("runtime_env") or {}).get("env_vars") or {}
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ and k not in job_env}
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
