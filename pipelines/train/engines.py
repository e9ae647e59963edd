"""One DeepSpeed engine per trained network, built the same way for every job."""

from __future__ import annotations

import torch

from lafma.train import warmup_decay
from pipelines.config import TrainConfig


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16).

    Without it oneDNN emulates bf16, several times slower than fp32.
    """
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def use_bf16(train: TrainConfig, device: torch.device) -> bool:
    """Whether a job's forward runs under bf16 autocast (its weights stay fp32).

    ``auto``: bf16 on a GPU, fp32 on a CPU. Whether bf16 pays on a CPU depends on the job, not
    only on the CPU: on an AVX512-BF16 machine it gave the demo's conv VAE 1.56x and its small
    UNet 1.15x, and an AMX machine ran that UNet slower (``benchmarks/train.py --precision``,
    results in ``benchmarks/results/``), so a config asks for it per job with ``precision: bf16``. That
    request is honoured on a CPU only where bf16 is native; elsewhere the job trains in fp32.
    ``bf16_forced`` is honoured everywhere: autocast runs bf16 on any CPU, emulated where it is
    not native — slow, but the same dtypes a GPU run will meet, on a machine without one.
    """
    if device.type == "cuda":
        return train.precision != "fp32"
    return train.precision == "bf16_forced" or (train.precision == "bf16" and cpu_has_native_bf16())


def _optimizer_and_schedule(model: torch.nn.Module, train: TrainConfig, lr: float):
    opt_cls = torch.optim.AdamW if train.weight_decay > 0 else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=lr, betas=train.betas, weight_decay=train.weight_decay)
    # Stepped once per optimiser step, i.e. every grad_accum micro-batches.
    schedule = warmup_decay(train.warmup_steps, max(1, train.steps // train.grad_accum), train.decay,
                            gamma=train.decay_gamma, every=train.decay_every)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


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

    opt, sched = _optimizer_and_schedule(model, train, lr)
    ds = deepspeed_config(micro_batch_per_gpu=train.batch_size, grad_accum=train.grad_accum,
                          zero_stage=train.zero_stage, grad_clip=train.grad_clip, bf16=bf16)
    return init_engine(model, opt, sched, ds)


class PlainEngine:
    """The part of a DeepSpeed engine's interface the jobs use, in plain single-process PyTorch.

    The baseline of ``benchmarks/train.py``: a job built with it runs the same model, batches
    and step with nothing between them and ``torch.optim`` (no ZeRO, no process group), so
    harness ÷ plain throughput is what the harness costs.
    """

    def __init__(self, model: torch.nn.Module, train: TrainConfig, lr: float, bf16: bool):
        self.module = model
        self.optimizer, self.scheduler = _optimizer_and_schedule(model, train, lr)
        self.train, self.bf16 = train, bf16
        self.global_steps, self._micro, self._norm = 0, 0, None

    def __call__(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.train.grad_accum).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.train.grad_accum:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.train.grad_clip > 0:
            self._norm = float(torch.nn.utils.clip_grad_norm_(params, self.train.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        return self._norm
