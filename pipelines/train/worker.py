"""What runs in every Ray Train worker: build the job from its entry in :data:`JOBS`, run the
shared loop, and export the final weights (rank 0) as safetensors beside their config."""

from __future__ import annotations

import os

import torch

from lafma.config import from_dict
from pipelines.config import PipelineConfig
from pipelines.core import console, storage
from pipelines.core.tracking import RunLogger, system_metrics
from pipelines.train.data import ParquetRows, RankRows
from pipelines.train.engines import use_bf16
from pipelines.train.jobs import JOBS
from pipelines.train.loop import JobInputs, run_loop
from pipelines.train.weights import export_weights


def train_fn(config: dict) -> None:
    """The Ray Train worker function.

    Args:
        config: from :func:`pipelines.train.launch.train_job`: the resolved ``cfg``, the ``job``
            name, the MLflow ``run_id`` and ``tracking_uri``, ``out_dir``, ``fail_marker_dir``,
            and the job's own ``inputs``.
    """
    import ray.train

    cfg = from_dict(PipelineConfig, config["cfg"])
    spec = JOBS[config["job"]]
    t = spec.train_config(cfg)
    rank = ray.train.get_context().get_world_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    console.quiet_train_worker()
    if device.type == "cpu":
        on_cpu()
    # Per-rank streams for init, crops, noise, t and dropout; checkpoints restore them per rank.
    torch.manual_seed(t.seed + rank)
    logger = RunLogger(config["run_id"], rank, tracking=config["tracking_uri"])
    whole = config.get("whole_dataset")
    if whole:  # small data: read whole from storage, this rank's rows kept (pipelines/train/data.py)
        shard = RankRows(ParquetRows(whole["data_dir"], whole["columns"]), rank,
                         ray.train.get_context().get_world_size(), spec.order)
    else:
        shard = ray.train.get_dataset_shard("train")
    job = spec.build(JobInputs(cfg, shard, device, use_bf16(t, device), extra=config["inputs"]))
    with system_metrics(config["run_id"], rank=rank, tracking=config["tracking_uri"]):
        result = run_loop(job, t, rank=rank, logger=logger, fail_marker_dir=config["fail_marker_dir"],
                          label=spec.stage)
    if rank == 0:
        export_weights(job.final_weights(), cfg, config["out_dir"], spec.component)
        storage.write_json(storage.join(config["out_dir"], "result.json"), result)


def on_cpu() -> None:
    """What a job that trains on the CPU tells its libraries, so that they need not guess (and
    warn that they guessed)."""
    # DeepSpeed picks its accelerator by probing, and warns when it falls back to the CPU.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # torch's extension builder (DeepSpeed's JIT ops) warns when it finds a CUDA toolkit on PATH
    # without a CUDA runtime; a CPU job builds no CUDA code.
    console.drop_messages("torch.utils.cpp_extension", "No CUDA runtime is found")
