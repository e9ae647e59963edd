import math

import pytest
import torch
from torch import nn

from lafma.flow import OTPath
from lafma.train import EMA, lfm_loss, warmup_decay


def test_ema_tracks_the_model_with_warmup_and_copies_buffers():
    model = nn.BatchNorm1d(3)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(5.0)
    ema.update(model)  # first update: d = min(0.9, 2/11) -> mostly the new weights
    assert torch.allclose(ema.model.weight, torch.full((3,), 1 + 9 / 11))
    assert torch.equal(ema.model.running_mean, model.running_mean)
    for _ in range(200):
        ema.update(model)
    assert torch.allclose(ema.model.weight, torch.full((3,), 2.0), atol=1e-6)
    assert not any(p.requires_grad for p in ema.model.parameters())
    state = ema.state_dict()
    assert int(state["num_updates"]) == 201 and "model.weight" in state


def test_warmup_then_cosine_and_linear_decay():
    f = warmup_decay(10, 110, "cosine", min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    g = warmup_decay(0, 100, "linear")
    assert g(0) == 1.0 and g(50) == pytest.approx(0.5)
    assert warmup_decay(5, 100, "constant")(80) == 1.0
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay(4, 8))
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and lrs[-1] < lrs[4]
    assert math.isclose(lrs[4], 1.0)



def test_warmup_then_exponential_decay_is_exponentiallr_every_n_steps():
    """Warm-up first; then lr * gamma**k after k * every steps, held in between (ExponentialLR
    stepped once per `every` steps), and no floor at total_steps."""
    lr, warmup, gamma, every = 1e-4, 4, 0.5, 3
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay(warmup, 10, "exponential", gamma=gamma, every=every))
    lrs = []
    for _ in range(warmup + 5 * every):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:warmup] == pytest.approx([lr / 4, lr / 2, 3 * lr / 4, lr])
    for k in range(5):
        block = lrs[warmup + k * every: warmup + (k + 1) * every]
        assert block == pytest.approx([lr * gamma ** k] * every), k
    # torch's own ExponentialLR, stepped at the same steps, gives the same rates.
    ref = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    exp = torch.optim.lr_scheduler.ExponentialLR(ref, gamma=gamma)
    for step in range(warmup, warmup + 5 * every):
        assert lrs[step] == pytest.approx(ref.param_groups[0]["lr"])
        ref.step()
        if (step - warmup + 1) % every == 0:
            exp.step()
    f = warmup_decay(0, 10, "exponential", gamma=0.999)
    assert f(0) == 1.0 and f(1000) == pytest.approx(0.999 ** 1000)


@pytest.mark.parametrize("kwargs", [dict(decay="exponential"), dict(decay="exponential", gamma=1.0),
                                    dict(decay="exponential", gamma=0.0), dict(decay="exponential", gamma=0.9, every=0),
                                    dict(decay="step")])
def test_a_schedule_that_cannot_decay_as_asked_is_refused(kwargs):
    with pytest.raises(ValueError):
        warmup_decay(10, 100, **kwargs)


def test_lfm_loss_drops_to_the_empty_caption():
    seen = []

    def velocity(x, t, context, context_mask):
        seen.append(context.clone())
        return torch.zeros_like(x)

    x1, ctx, mask = torch.randn(64, 2, 4, 4), torch.ones(64, 3, 5), torch.ones(64, 3, dtype=torch.bool)
    null, null_mask = torch.full((1, 2, 5), -1.0), torch.ones(1, 2, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    loss, logs = lfm_loss(velocity, x1, ctx, mask, path=OTPath(), null_context=null, null_mask=null_mask,
                          cond_dropout=1.0, generator=g)
    assert logs["cond_dropped"] == 1.0 and (seen[-1][:, :2] == -1).all() and loss > 0
    _, logs = lfm_loss(velocity, x1, ctx, mask, path=OTPath(), null_context=null, null_mask=null_mask,
                       cond_dropout=0.0, generator=g)
    assert logs["cond_dropped"] == 0.0 and (seen[-1] == 1).all()
