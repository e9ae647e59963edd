"""pipelines.train.engines: a job's optimiser follows the schedule its TrainConfig names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.config import TrainConfig
from pipelines.train.engines import PlainEngine


def test_an_exponential_decay_config_reaches_the_optimiser_in_optimiser_steps():
    # grad_accum 2: warm-up and decay count optimiser steps, i.e. every second micro-batch.
    train = TrainConfig(steps=40, lr=1e-3, warmup_steps=2, decay="exponential", decay_gamma=0.5,
                        decay_every=3, grad_accum=2, grad_clip=0.0)
    engine = PlainEngine(nn.Linear(2, 1), train, lr=train.lr, bf16=False)
    lrs = [engine.get_lr()[0]]  # the rate of optimiser step 0
    for _ in range(2 * 10):
        engine.backward(engine(torch.ones(1, 2)).sum())
        engine.step()
        if engine._micro % 2 == 0:
            lrs.append(engine.get_lr()[0])
    # Steps 0-1 warm up (1/2, 2/2 of the peak); the peak holds for 3 more steps (2-4), then the
    # rate halves every 3 optimiser steps (6 micro-batches).
    assert lrs == pytest.approx([5e-4] + [1e-3] * 4 + [5e-4] * 3 + [2.5e-4] * 3)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_forced_trains_in_bf16_on_any_cpu_and_bf16_only_where_native(native, monkeypatch):
    from pipelines.train import engines

    monkeypatch.setattr(engines, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert engines.use_bf16(TrainConfig(precision="bf16_forced"), cpu)
    assert engines.use_bf16(TrainConfig(precision="bf16"), cpu) == native
    assert not engines.use_bf16(TrainConfig(precision="auto"), cpu)
    assert not engines.use_bf16(TrainConfig(precision="fp32"), cpu)
    # The forced path really computes in bf16 under the engine's autocast, with fp32 weights.
    model = nn.Linear(4, 4)
    engine = PlainEngine(model, TrainConfig(precision="bf16_forced", lr=1e-3), lr=1e-3, bf16=True)
    out = engine(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and model.weight.dtype == torch.float32
