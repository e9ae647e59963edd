"""The one training loop every job shares (inside a Ray Train worker).

A job (built from :class:`JobInputs` by its entry in :data:`pipelines.train.jobs.JOBS`)
supplies its engines and a ``step(batch, step) -> logs`` function (the GAN jobs update
the discriminator then the generator inside it; the LFM one engine plus its EMA). The loop
owns what they all need: resuming from the last checkpoint, checkpoints every N steps and at
the end, rank-0 metrics with samples per second, periodic artifacts, and fault injection.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pipelines.config import PipelineConfig, TrainConfig
from pipelines.core.console import StepClock
from pipelines.core.tracking import RunLogger
from pipelines.train.engines import build_engine


@dataclass
class JobInputs:
    """What a job is built from inside a worker (see :data:`pipelines.train.jobs.JOBS`).

    Attributes:
        cfg: the whole resolved config.
        shard: this worker's Ray Train dataset shard (anything with ``iter_batches``).
        device: this worker's device.
        bf16: train in bf16.
        extra: the launch's job-specific inputs (the LFM's ``null_emb``, ``vae_weights``,
            ``vocoder_weights``).
        engine: ``(model, train, lr, bf16) -> engine`` (:func:`~pipelines.train.engines.build_engine`;
            the benchmark's plain-PyTorch baseline passes ``PlainEngine``).
    """

    cfg: PipelineConfig
    shard: Any
    device: torch.device
    bf16: bool
    extra: Mapping[str, Any] = field(default_factory=dict)
    engine: Callable[..., Any] = build_engine


@dataclass
class Job:
    """What a job hands to :func:`run_loop`.

    Attributes:
        engines: DeepSpeed engines by name; all are checkpointed.
        step: ``step(batch, step) -> {name: float}`` one optimiser update.
        batches: endless iterator of worker-local batches.
        samples_per_batch: examples in one batch (for throughput).
        final_weights: ``() -> state dict`` the job exports when it ends (the EMA's for the LFM).
        extra_state: ``() -> dict`` of more state to checkpoint (e.g. the EMA weights).
        load_extra_state: restores what ``extra_state`` returned.
        artifacts: ``(step, logger) -> None`` logs images/audio (called on rank 0).
    """

    engines: dict[str, Any]
    step: Callable[[dict, int], dict[str, float]]
    batches: Iterator[dict]
    samples_per_batch: int
    final_weights: Callable[[], Mapping[str, Tensor]]
    extra_state: Callable[[], dict] = lambda: {}
    load_extra_state: Callable[[dict], None] = lambda state: None
    artifacts: Callable[[int, RunLogger], None] | None = None


def run_loop(job: Job, train: TrainConfig, *, rank: int, logger: RunLogger, fail_marker_dir: str,
             label: str = "train") -> dict[str, float]:
    """Train until ``train.steps`` micro-batches, resuming from the last checkpoint if there is one.

    Randomness (crops, noise, t, condition dropout) comes from the global RNGs, which the
    checkpoint saves and restores per rank, so a resumed run draws what the uninterrupted
    one would have.

    Returns:
        The last logged metrics (with ``step`` and ``resumed_from``).
    """
    # Imported here: the job table (and the DAG stages that read it) must load without Ray.
    from pipelines.core.checkpointing import load_checkpoint, save_checkpoint
    from pipelines.core.training import maybe_fail, maybe_hold

    state = load_checkpoint(job.engines)
    start = 0
    if state is not None:
        start = int(state["step"])
        job.load_extra_state(state.get("extra", {}))
    resumed_from = start
    if start >= train.steps:
        return {"step": start, "resumed_from": resumed_from}
    clock = StepClock(train.steps - start)  # elapsed and ETA since this (re)start
    window_t, window_n, last = time.perf_counter(), 0, {}
    for step in range(start + 1, train.steps + 1):
        maybe_fail(step, train.fail_at_step, fail_marker_dir)
        logs = job.step(next(job.batches), step)
        clock.tick(step - start)
        window_n += job.samples_per_batch
        if step % train.log_every == 0 or step == train.steps:
            elapsed = time.perf_counter() - window_t
            world = int(os.environ.get("WORLD_SIZE", "1"))
            logs = {**logs, "samples_per_second": window_n * world / max(elapsed, 1e-9)}
            logger.log_metrics(logs, step=step)
            if rank == 0:  # one line per log interval in the driver's output (Ray forwards it)
                print(progress_line(label, step, train.steps, logs, clock.progress(step - start)), flush=True)
            window_t, window_n, last = time.perf_counter(), 0, logs
        if job.artifacts is not None and rank == 0 and (step % train.sample_every == 0 or step == train.steps):
            job.artifacts(step, logger)
        if step % train.checkpoint_every == 0 or step == train.steps:
            save_checkpoint(job.engines, {"step": step, "extra": job.extra_state()},
                            {"step": step, **{k: float(v) for k, v in logs.items()}})
            maybe_hold(label, step)
    return {**last, "step": train.steps, "resumed_from": resumed_from}


def progress_line(label: str, step: int, steps: int, logs: Mapping[str, float], timing: str) -> str:
    """Rank 0's line per log interval, e.g. ``[train_vae] step 100/250 rec/l1 2.168 total 8469
    (15.7 samples/s, 1m12s elapsed, ETA 1m48s)``.

    A line, not a progress bar: Ray forwards a worker's output line by line. Samples per second
    are the last interval's; ``timing`` is :meth:`StepClock.progress`, counted from this run's
    (re)start.
    """
    shown = [k for k in logs if k.startswith(("loss", "rec/l1", "mel/l1", "total"))][:3]
    return (f"[{label}] step {step}/{steps} " + " ".join(f"{k} {logs[k]:.4g}" for k in shown) +
            f" ({logs['samples_per_second']:.1f} samples/s, {timing})")
