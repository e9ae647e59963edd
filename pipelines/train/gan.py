"""The one GAN loop the VAE and HiFi-GAN jobs share; each job is a small :class:`GANTask`.

descript-audio-codec's loop: update the discriminator on the detached fake, then the
generator with the discriminator frozen. Freezing is not optional with ZeRO-2: its
gradient hooks would see the discriminator's parameters reduced twice and assert. Each
update backpropagates :func:`~lafma.train.weighted_sum` of the task's named, unweighted
terms and its lambdas; the terms and the total are logged as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lafma.train import weighted_sum
from pipelines.config import TrainConfig
from pipelines.core.tracking import RunLogger
from pipelines.train.data import epochs
from pipelines.train.loop import Job, JobInputs
from pipelines.train.weights import load_weights

# Named unweighted terms and their lambdas (keys the terms lack are skipped).
Losses = tuple[dict[str, Tensor], Mapping[str, float | Tensor]]


class GANTask:
    """What one GAN job supplies to :func:`gan_job`: its networks, batches, losses and samples.

    ``gen`` and ``disc`` below are DeepSpeed engines; ``generator`` their raw module
    (``engine.module``) and ``discriminator`` the discriminator's raw module as a callable (under
    the engine's autocast). In the generator step the discriminator is called as its raw module:
    the engine would book that backward as its own.
    """

    train: TrainConfig
    # Items of the first batch kept for the periodic samples.
    sample_items: int = 1

    def models(self) -> tuple[nn.Module, nn.Module]:
        """The untrained (generator, discriminator)."""
        raise NotImplementedError

    def batch(self, rows: dict[str, np.ndarray]) -> dict[str, Tensor]:
        """A batch of Parquet rows → CPU tensors (random crops included)."""
        raise NotImplementedError

    def forward(self, gen, batch: dict[str, Tensor]) -> dict[str, Any]:
        """The generator on a batch: ``"fake"`` (with its graph) and whatever else its losses need."""
        raise NotImplementedError

    def adversarial(self, generator: nn.Module, step: int) -> bool:
        """Whether the discriminator trains and judges at ``step`` (the VAE warm-starts without)."""
        return True

    def discriminator_losses(self, generator: nn.Module, disc, batch: dict[str, Tensor], fake: Tensor,
                             step: int) -> Losses:
        """The discriminator step's terms and lambdas; ``fake`` is detached."""
        raise NotImplementedError

    def generator_losses(self, generator: nn.Module, discriminator: Callable[..., Any], batch: dict[str, Tensor],
                         out: dict[str, Any], step: int) -> Losses:
        """The generator step's terms and lambdas, on ``out`` from :meth:`forward`."""
        raise NotImplementedError

    def samples(self, generator: nn.Module, batch: dict[str, Tensor], step: int, logger: RunLogger) -> None:
        """Log images and audio of the generator on the kept items (rank 0)."""
        raise NotImplementedError

    def exported(self, generator: nn.Module) -> nn.Module:
        """The part of the generator's module that the job exports."""
        return generator


def _logged(losses: Mapping[str, Tensor]) -> dict[str, float]:
    return {k: float(torch.as_tensor(v).detach()) for k, v in losses.items()}


def gan_update(gen, disc, fake: Tensor, *, disc_losses: Callable[[Tensor], Losses] | None,
               gen_losses: Callable[[Tensor], Losses]) -> dict[str, float]:
    """One discriminator update (when ``disc_losses`` is given), then one generator update.

    Args:
        gen, disc: DeepSpeed engines.
        fake: the generator's output for this batch (with its graph).
        disc_losses: ``fake.detach() -> (terms, lambdas)``; None while the GAN is off.
        gen_losses: ``fake -> (terms, lambdas)`` computed with the discriminator frozen.

    Returns:
        The discriminator's terms and total (prefixed ``disc/``), the generator's, ``lr``
        and ``grad_norm``.
    """
    logs: dict[str, float] = {}
    if disc_losses is not None:
        terms, weights = disc_losses(fake.detach())
        total = weighted_sum(terms, weights)
        disc.backward(total)
        disc.step()
        logs.update({f"disc/{k}": v for k, v in _logged({**terms, "total": total}).items()})
    disc.module.requires_grad_(False)
    try:
        terms, weights = gen_losses(fake)
        total = weighted_sum(terms, weights)
        gen.backward(total)
        gen.step()
    finally:
        disc.module.requires_grad_(True)
    logs.update(_logged({**terms, "total": total}))
    logs["lr"] = float(gen.get_lr()[0])
    norm = gen.get_global_grad_norm()
    if norm is not None:
        logs["grad_norm"] = float(norm)
    return logs


def gan_job(task: GANTask, inputs: JobInputs) -> Job:
    """The task's generator and discriminator as two engines, its batch stream, step and samples."""
    t, device = task.train, inputs.device
    generator, discriminator = task.models()
    if inputs.extra.get("init_weights"):  # fine-tuning: the exported part starts from them
        task.exported(generator).load_state_dict(load_weights(inputs.extra["init_weights"]))
    gen = inputs.engine(generator, t, t.lr, inputs.bf16)
    disc = inputs.engine(discriminator, t, t.disc_lr or t.lr, inputs.bf16)
    kept: dict[str, Tensor] = {}

    def batches() -> Iterator[dict[str, Tensor]]:
        for rows in epochs(inputs.shard, t.batch_size, t.seed):
            batch = task.batch(rows)
            if not kept:  # the first batch's first items: the same clips in every sample
                kept.update({k: v[: task.sample_items].clone() for k, v in batch.items()})
            yield {k: v.to(device) for k, v in batch.items()}

    def judge(*args: Tensor) -> Any:
        # The generator step calls the discriminator as its raw module (see GANTask), outside
        # the autocast its engine applies; in bf16 it gets the same autocast here.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=inputs.bf16):
            return disc.module(*args)

    def step(batch: dict[str, Tensor], i: int) -> dict[str, float]:
        out = task.forward(gen, batch)
        on = task.adversarial(gen.module, i)
        # Losses see the generator's output in fp32 (it is bf16 under autocast): an STFT or a
        # mel L1 in bf16 would lose the detail they measure.
        fake = out["fake"].float()

        def d_losses(fake: Tensor) -> Losses:
            return task.discriminator_losses(gen.module, disc, batch, fake, i)

        def g_losses(fake: Tensor) -> Losses:
            return task.generator_losses(gen.module, judge, batch, {**out, "fake": fake}, i)

        return gan_update(gen, disc, fake, disc_losses=d_losses if on else None, gen_losses=g_losses)

    def artifacts(i: int, logger: RunLogger) -> None:
        task.samples(gen.module, kept, i, logger)

    return Job({"generator": gen, "discriminator": disc}, step, batches(), t.batch_size,
               final_weights=lambda: task.exported(gen.module).state_dict(), artifacts=artifacts)
