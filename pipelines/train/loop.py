"""The one training loop every job shares (inside a Ray Train worker).

A job supplies its engines and a ``step(batch, step) -> logs`` function (the GAN jobs update
the discriminator then the generator inside it; the LFM one engine plus its EMA). The loop
owns what they all need: resuming from the last checkpoint, checkpoints every N steps and at
the end, rank-0 metrics with samples per second, periodic artifacts, and fault injection.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pipelines.config import TrainConfig
from pipelines.core.checkpointing import load_checkpoint, save_checkpoint
from pipelines.core.tracking import RunLogger
from pipelines.core.training import maybe_fail


@dataclass
class Job:
    """What a job hands to :func:`run_loop`.

    Attributes:
        engines: DeepSpeed engines by name; all are checkpointed.
        step: ``step(batch, step) -> {name: float}`` one optimiser update.
        batches: endless iterator of worker-local batches.
        samples_per_batch: examples in one batch (for throughput).
        extra_state: ``() -> dict`` of more state to checkpoint (e.g. the EMA weights).
        load_extra_state: restores what ``extra_state`` returned.
        artifacts: ``(step, logger) -> None`` logs images/audio (called on rank 0).
    """

    engines: dict[str, Any]
    step: Callable[[dict, int], dict[str, float]]
    batches: Iterator[dict]
    samples_per_batch: int
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
    state = load_checkpoint(job.engines)
    start = 0
    if state is not None:
        start = int(state["step"])
        job.load_extra_state(state.get("extra", {}))
    resumed_from = start
    if start >= train.steps:
        return {"step": start, "resumed_from": resumed_from}
    window_t, window_n, last = time.perf_counter(), 0, {}
    for step in range(start + 1, train.steps + 1):
        maybe_fail(step, train.fail_at_step, fail_marker_dir)
        logs = job.step(next(job.batches), step)
        window_n += job.samples_per_batch
        if step % train.log_every == 0 or step == train.steps:
            elapsed = time.perf_counter() - window_t
            world = int(os.environ.get("WORLD_SIZE", "1"))
            logs = {**logs, "samples_per_second": window_n * world / max(elapsed, 1e-9)}
            logger.log_metrics(logs, step=step)
            if rank == 0:  # one line per log interval in the driver's output (Ray forwards it)
                shown = [k for k in logs if k.startswith(("loss", "rec/l1", "mel/l1", "total"))][:3]
                print(f"[{label}] step {step}/{train.steps} " + " ".join(f"{k} {logs[k]:.4g}" for k in shown) +
                      f" ({logs['samples_per_second']:.1f} samples/s)", flush=True)
            window_t, window_n, last = time.perf_counter(), 0, logs
        if job.artifacts is not None and rank == 0 and (step % train.sample_every == 0 or step == train.steps):
            job.artifacts(step, logger)
        if step % train.checkpoint_every == 0 or step == train.steps:
            save_checkpoint(job.engines, {"step": step, "extra": job.extra_state()},
                            {"step": step, **{k: float(v) for k, v in logs.items()}})
    return {**last, "step": train.steps, "resumed_from": resumed_from}
