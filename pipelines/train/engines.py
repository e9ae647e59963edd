"""One DeepSpeed engine per trained network, built the same way for every job."""

from __future__ import annotations

import torch

from lafma.train import warmup_decay
from pipelines.config import TrainConfig


def use_bf16(train: TrainConfig, device: torch.device) -> bool:
    """``precision: auto`` is bf16 on a GPU and fp32 on the CPU."""
    return train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda")


def build_engine(model: torch.nn.Module, train: TrainConfig, lr: float, bf16: bool):
    """``model`` with (W-)Adam and the warm-up/decay schedule, wrapped in a DeepSpeed engine.

    Args:
        model: the network (its parameters become the optimiser's).
        train: the job's optimisation settings (betas, decay, ZeRO stage, clipping, …).
        lr: the base learning rate (a GAN's discriminator may have its own).
        bf16: train in bf16 (see :func:`use_bf16`).

    Returns:
        A ``deepspeed.DeepSpeedEngine``.
    """
    from pipelines.core.training import deepspeed_config, init_engine  # Ray: only inside a worker

    opt_cls = torch.optim.AdamW if train.weight_decay > 0 else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=lr, betas=train.betas, weight_decay=train.weight_decay)
    # DeepSpeed steps the scheduler once per optimiser step, i.e. every grad_accum micro-batches.
    schedule = warmup_decay(train.warmup_steps, max(1, train.steps // train.grad_accum), train.decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    ds = deepspeed_config(micro_batch_per_gpu=train.batch_size, grad_accum=train.grad_accum,
                          zero_stage=train.zero_stage, grad_clip=train.grad_clip, bf16=bf16)
    return init_engine(model, opt, sched, ds)
