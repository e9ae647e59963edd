"""How a Ray Train job with DeepSpeed is set up: config, engines, launch, fault injection.

The VAE+discriminator, HiFi-GAN and LFM jobs all follow the same shape::

    def train_fn(config):                        # runs on every Ray Train worker
        engine = init_engine(model, optimizer, scheduler, deepspeed_config(...))
        state = load_checkpoint({"model": engine}) or {"step": 0}
        for step in range(state["step"] + 1, config["steps"] + 1):
            loss = ...; engine.backward(loss); engine.step()
            if step % config["checkpoint_every"] == 0:
                save_checkpoint({"model": engine}, {"step": step, ...}, {"loss": ...})

    result = launch(train_fn, name="lfm-<hash>", storage_path=root + "/ray_results", ...)

Resume is Ray Train V2's: launching again with the same ``name`` and ``storage_path`` makes
the controller read ``<storage_path>/<name>/checkpoint_manager_snapshot.json`` and hand its
latest checkpoint to every worker through ``ray.train.get_checkpoint()``; a worker failure
restarts the whole worker group with that checkpoint, up to ``max_failures`` times.

GANs (two engines). Under ZeRO-2 a gradient hook on every trainable parameter reduces its
gradient into the owner rank's partition, at most once per optimizer step of its engine
("Gradient computed twice for this partition" otherwise). The generator's adversarial loss
back-propagates *through* the discriminator: unfrozen, G's backward also reduces D's
gradients, and D's next backward asserts (on the second iteration; see the GAN test). So::

    d_loss = ...D(real), D(G(z).detach())...; d.backward(d_loss); d.step()
    d.module.requires_grad_(False)               # no D gradients, so no D hooks fire
    g_loss = ...D(G(z))...; g.backward(g_loss); g.step()
    d.module.requires_grad_(True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ray.train
import torch
from ray.train import (
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    LoggingConfig,
    Result,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchConfig, TorchTrainer

from pipelines.core import storage
from pipelines.core.checkpointing import load_checkpoint, save_checkpoint
from pipelines.core.cluster import FORWARDED_ENV, forwarded_env
from pipelines.core.stage import HOLD_ENV, hold_forever, hold_spec

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

__all__ = ["deepspeed_config", "ingest_config", "init_engine", "launch", "load_checkpoint", "maybe_fail",
           "maybe_hold", "save_checkpoint"]


def deepspeed_config(*, micro_batch_per_gpu: int, grad_accum: int, zero_stage: int,
                     grad_clip: float, bf16: bool, bucket_elements: int = 50_000_000) -> dict:
    """A DeepSpeed config for a client-side torch optimizer and LR scheduler.

    Args:
        micro_batch_per_gpu: Samples per forward/backward on one worker ("gpu" is
            DeepSpeed's word; a CPU worker counts the same).
        grad_accum: Micro-batches per optimizer step.
        zero_stage: 0 (plain data parallel), 1 (optimizer state sharded), 2 (+ gradients
            sharded) or 3 (+ parameters sharded).
        grad_clip: Global gradient-norm clip; 0 disables clipping.
        bf16: bf16 autocast in the forward, fp32 weights (the caller decides:
            :func:`pipelines.train.engines.use_bf16`).
        bucket_elements: Elements per gradient-reduction / all-gather bucket.

    Returns:
        A dict for :func:`init_engine`.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    if micro_batch_per_gpu < 1 or grad_accum < 1:
        raise ValueError("micro_batch_per_gpu and grad_accum must be >= 1")
    if grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0, got {grad_clip}")
    return {
        # train_batch_size is left out: DeepSpeed derives it as micro x accum x world size,
        # and the world size is known only inside the worker group.
        "train_micro_batch_size_per_gpu": micro_batch_per_gpu,
        "gradient_accumulation_steps": grad_accum,
        # DeepSpeed 0.19 clips at 1.0 unless told otherwise; HiFi-GAN and the LFM recipes
        # each choose their own value, so it is always explicit here.
        "gradient_clipping": float(grad_clip),
        # No "optimizer" and no "scheduler" blocks: the job passes torch.optim objects, so
        # DeepSpeed builds none of its fused/CPU optimizers (cpu_adam and friends are C++
        # ops that JIT-compile) and the same code runs on CPU and GPU. Adam/AdamW are on
        # ZeRO's tested-optimizer list, so no "zero_allow_untested_optimizer" is needed.
        # bf16 through torch autocast, not DeepSpeed's "bf16" mode: that mode casts the
        # parameters to bf16 and leaves casting every input (and keeping an fp32 EMA) to
        # each job; autocast keeps fp32 weights and runs the forward's matmuls and convs in
        # bf16, so the same batches and EMA code serve CPU (fp32) and GPU (bf16).
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "torch_autocast": {"enabled": bool(bf16), "dtype": "bfloat16"},
        "zero_optimization": {
            "stage": zero_stage,
            # DeepSpeed's default buckets hold 5e8 elements (2 GB of fp32 each, allocated per
            # engine and rank); our models are far smaller, and two engines per GAN job
            # double it.
            "reduce_bucket_size": bucket_elements,
            "allgather_bucket_size": bucket_elements,
            "contiguous_gradients": True,
        },
        # A checkpoint tag that differs between ranks would mix shards of different steps.
        "checkpoint": {"tag_validation": "FAIL"},
        # No per-step timer synchronisation: metrics go to MLflow, not DeepSpeed's logs.
        "wall_clock_breakdown": False,
    }


def init_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                ds_config: dict) -> DeepSpeedEngine:
    """Wrap a model, its torch optimizer and LR scheduler in a DeepSpeed engine.

    Call inside a Ray Train worker: ``TorchTrainer``'s ``TorchConfig`` has already run
    ``torch.distributed.init_process_group`` (gloo on CPU, nccl on GPU) and set ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. DeepSpeed must reuse
    that group: ``dist_init_required=False`` makes ``deepspeed.comm.init_distributed`` wrap the
    existing ``torch.distributed`` group in its ``TorchBackend`` (and fail loudly if there is
    none) instead of creating one with the accelerator's backend name.

    The engine steps ``scheduler`` once per optimizer step (after ``grad_accum``
    micro-batches) and saves/restores it with its checkpoints.

    Args:
        model: The module; DeepSpeed moves it to the worker's device (and to bf16 if enabled)
            and broadcasts rank 0's weights so every rank starts identical.
        optimizer: Built on ``model.parameters()``; ZeRO wraps it.
        scheduler: Optional LR scheduler on ``optimizer``.
        ds_config: From :func:`deepspeed_config`.

    Returns:
        The engine: call it like the model, then ``engine.backward(loss)``; ``engine.step()``.
    """
    import deepspeed  # imported here: the driver launches jobs without paying for deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized():
        raise RuntimeError("init_engine must run inside a Ray Train worker (no process group)")
    # DeepSpeed's CPU accelerator names "ccl" when oneccl_bindings_for_pytorch is installed
    # and would then build its own CCL backend beside Ray's gloo group; only gloo is tested.
    ds_backend, pg_backend = get_accelerator().communication_backend_name(), dist.get_backend()
    if ds_backend != pg_backend:
        raise RuntimeError(f"DeepSpeed's accelerator wants {ds_backend!r} but Ray Train's process "
                           f"group is {pg_backend!r}; uninstall oneccl_bindings_for_pytorch on CPU")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    return engine


def launch(train_fn: Callable[[dict], Any], *, name: str, storage_path: str, num_workers: int,
           cpus_per_worker: float, gpus_per_worker: float, max_failures: int, config: dict,
           datasets: dict | None = None, split_datasets: bool = True,
           placement_strategy: str = "PACK") -> Result:
    """Run ``train_fn(config)`` on ``num_workers`` Ray Train workers and wait for it.

    Resume semantics (Ray 2.60, Train V2): a run is identified by ``storage_path/name``.
    Launching again with the same pair continues from the run's latest registered checkpoint
    (``ray.train.get_checkpoint()`` in the workers), whether the previous launch finished,
    failed or was killed; a fresh ``name`` starts over. Within one launch a worker error
    restarts the worker group from the latest checkpoint up to ``max_failures`` times.
    The two newest checkpoints are kept. Keep ``num_workers`` when re-launching: DeepSpeed
    refuses to load ZeRO (stage >= 1) optimizer shards saved by a different world size.

    Args:
        train_fn: Runs on every worker; use :func:`init_engine`, :func:`load_checkpoint` and
            :func:`save_checkpoint` in it. Its rank-0 return value is ``Result.return_value``.
        name: Run name, stable across re-launches (e.g. the stage name plus config hash).
        storage_path: Local directory or ``s3://`` URI for checkpoints and run state.
        num_workers: Data-parallel workers.
        cpus_per_worker: CPUs reserved per worker; fractional values let a 2-core machine run
            two workers (a request for more CPUs than the cluster has waits forever).
        gpus_per_worker: GPUs per worker; > 0 selects nccl, else gloo.
        max_failures: Worker-group restarts allowed (-1: unlimited).
        config: Passed to ``train_fn``.
        datasets: Ray Datasets, split across workers (``ray.train.get_dataset_shard``).
        split_datasets: False: every worker reads each dataset whole (and keeps its own rows:
            :class:`pipelines.train.data.RankRows`).
        placement_strategy: The workers' placement group strategy (``PACK``, ``SPREAD``,
            ``STRICT_PACK``, ``STRICT_SPREAD``).

    Returns:
        The run's Result (last metrics, latest checkpoint, rank 0's return value).

    Raises:
        ray.train.TrainingFailedError: When workers still fail after ``max_failures`` restarts.
    """
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    # Workers inherit the raylet's environment, not the driver's: forward what they need
    # (the S3 endpoint, TORCH_EXTENSIONS_DIR for DeepSpeed's JIT-built ops), never credentials.
    env = forwarded_env((*FORWARDED_ENV, HOLD_ENV))
    run_config = RunConfig(
        name=name,
        # Ray Train requires an absolute local path or a URI.
        storage_path=storage.absolute(storage_path),
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        worker_runtime_env={"env_vars": env} if env else None,
        # Ray Train's INFO lines (resources requested, worker group started, every checkpoint
        # and every report with its whole metrics dict, from each rank) go to its log files
        # only; its warnings and errors still reach the console. Rank 0 prints our progress.
        logging_config=LoggingConfig(log_level="WARNING"),
    )
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources, placement_strategy=placement_strategy),
        run_config=run_config,
        datasets=datasets,
        dataset_config=ingest_config(split=split_datasets),
    )
    return trainer.fit()


def ingest_config(split: bool = True) -> DataConfig:
    """How Ray Train feeds the datasets to the workers: split across them (or each whole to
    every worker), with Ray Train's default ingest options set explicitly.

    Its defaults (``DataConfig.default_ingest_options``) copy the driver's
    ``exclude_resources``, an option Ray 2.60 deprecates, so its dataset actor warned on every
    launch. These are the same options without it: we never set it (Train reserves the
    workers' resources itself), and ``label_selector``, its successor, is for clusters whose
    nodes are labelled.
    """
    from ray.data import DataContext, ExecutionOptions

    opts = DataContext.get_current().execution_options
    return DataConfig(datasets_to_split="all" if split else [], execution_options=ExecutionOptions(
        resource_limits=opts.resource_limits, preserve_order=opts.preserve_order,
        verbose_progress=opts.verbose_progress))


def maybe_fail(step: int, fail_at_step: int, attempt_marker_dir: str) -> None:
    """Raise at ``fail_at_step`` on the first attempt only (fault injection for tests).

    Each rank leaves a marker under ``attempt_marker_dir`` (local or ``s3://``) before it
    raises, so the worker group Ray restarts passes the same step without failing again.

    Args:
        step: The step about to run.
        fail_at_step: The step to fail at; < 0 never fails.
        attempt_marker_dir: Storage directory for the markers (outside Ray's run directory).

    Raises:
        RuntimeError: At ``fail_at_step`` when this rank has not failed there before.
    """
    if fail_at_step < 0 or step != fail_at_step:
        return
    rank = ray.train.get_context().get_world_rank()
    marker = storage.join(attempt_marker_dir, f"failed_at_step_{fail_at_step}.rank{rank}")
    if storage.exists(marker):
        return
    storage.write_bytes(marker, b"")
    # Every rank fails at the same step. Meet first, so every rank's previous report is in its
    # result queue: Ray Train registers a checkpoint only once all ranks' reports have reached
    # the controller, and a rank that failed while another was still uploading would lose it
    # (Ray would then resume from the checkpoint before; correct, but not what a test pins).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    raise RuntimeError(f"injected failure at step {step} on rank {rank} (first attempt)")


def maybe_hold(label: str, step: int) -> None:
    """Block once the checkpoint of ``step`` is reported, forever or until the release file
    exists, when ``LAFMA_TEST_HOLD`` names ``label`` and ``step`` (test-only fault injection;
    :func:`pipelines.core.stage.hold_spec`).

    Called by every rank after :func:`save_checkpoint`. ``ray.train.report`` is a barrier, so
    every rank has reported when it returns; the workers' threads then sleep while the
    controller, still polling them, registers the checkpoint (and writes
    ``checkpoint_manager_snapshot.json``). Rank 0 creates the marker file.
    """
    hold = hold_spec(label)
    if hold is None or step != hold[0]:
        return
    hold_forever(hold[1] if ray.train.get_context().get_world_rank() == 0 else None, release=hold[2])
