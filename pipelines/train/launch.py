"""Driver side of a training job: its MLflow run, its datasets, and the Ray Train launch.

The driver creates (or, on a re-run, finds by its stage hash) the MLflow run and hands its
id to the workers, so a restarted worker group keeps logging into the same run.
"""

from __future__ import annotations

from lafma.config import to_dict
from pipelines.config import PipelineConfig
from pipelines.core import storage, tracking
from pipelines.core.training import launch
from pipelines.train.data import fits_every_worker, parquet_dataset
from pipelines.train.jobs import JOBS
from pipelines.train.worker import train_fn


def train_job(cfg: PipelineConfig, job: str, *, root: str, data_dir: str, out_dir: str, stage_hash: str,
              extra: dict | None = None, parent_run_id: str | None = None) -> dict:
    """Train ``job`` (a key of :data:`JOBS`) to its section's ``steps`` and export it to ``out_dir``.

    Re-running with the same config resumes: the Ray Train run name and the MLflow run are
    both keyed by ``stage_hash``.

    Args:
        cfg: the whole resolved config.
        job: ``vae``, ``vocoder`` or ``lfm``.
        root: the storage root (MLflow store, Ray results).
        data_dir: the input stage's output, read as :attr:`JobSpec.columns`.
        out_dir: where ``<component>.safetensors``, ``config.json`` and ``result.json`` go.
        stage_hash: the stage's hash (names the Ray run and finds the MLflow run).
        extra: job-specific worker inputs (the LFM's ``null_emb``, ``vae_weights``, ``vocoder_weights``).
        parent_run_id: the pipeline's MLflow run, this run's parent.

    Returns:
        The stage's marker: ``run_id``, ``weights``, ``steps``, ``resumed_from``, ``final_metrics``.
    """
    spec = JOBS[job]
    t = spec.train_config(cfg)
    name = f"{spec.stage}-{stage_hash}"
    tags = {"lafma.stage": spec.stage, "lafma.stage_hash": stage_hash, "lafma.mel_hash": cfg.mel.config_hash()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = tracking.find_run(root=root, experiment=cfg.name, tags={"lafma.stage_hash": stage_hash}) or \
        tracking.start_run(root=root, experiment=cfg.name, run_name=name, params=to_dict(cfg), tags=tags)
    # Small data: every worker reads it whole, straight from storage, and keeps its rows by
    # rank, so the training order is the seed's, not the streaming split's; larger data streams
    # through Ray Data, split across the workers (pipelines/train/data.py).
    whole = fits_every_worker(data_dir)
    columns = (*spec.columns, *spec.order)
    config = {"cfg": to_dict(cfg), "job": job, "run_id": run_id, "tracking_uri": tracking.tracking_uri(root),
              "out_dir": out_dir, "fail_marker_dir": storage.join(root, "ray_results", name, "fault_injection"),
              "inputs": dict(extra or {}), "whole_dataset": {"data_dir": data_dir, "columns": columns} if whole else None}
    result = launch(train_fn, name=name, storage_path=storage.join(root, "ray_results"),
                    num_workers=t.num_workers, cpus_per_worker=t.cpus_per_worker, gpus_per_worker=t.gpus_per_worker,
                    max_failures=t.max_failures, config=config, placement_strategy=t.placement_strategy,
                    datasets=None if whole else {"train": parquet_dataset(data_dir, columns)})
    tracking.end_run(run_id, tracking=tracking.tracking_uri(root))
    summary = storage.read_json(storage.join(out_dir, "result.json"))
    metrics = dict(result.metrics or {})
    return {"run_id": run_id, "weights": storage.join(out_dir, spec.weights_file),
            "steps": summary.get("step"), "resumed_from": summary.get("resumed_from"),
            "final_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
