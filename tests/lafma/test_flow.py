import math

import pytest
import torch

from lafma.flow import (
    ClassifierFreeGuidance,
    OTPath,
    drop_condition,
    flow_matching_loss,
    heldout_fm_loss,
    solve,
)


@pytest.mark.parametrize("sigma_min", [0.0, 1e-4, 0.1])
def test_path_endpoints_and_target_match_closed_form(sigma_min):
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    path = OTPath(sigma_min)
    xt, v = path.sample(x0, x1, torch.zeros(4))
    torch.testing.assert_close(xt, x0)
    xt, _ = path.sample(x0, x1, torch.ones(4))
    torch.testing.assert_close(xt, x1 + sigma_min * x0)
    torch.testing.assert_close(v, x1 - (1 - sigma_min) * x0)
    # The target is the time derivative of the path: check by finite differences.
    t = torch.rand(4, generator=g)
    eps = 1e-3
    forward, _ = path.sample(x0, x1, t + eps)
    backward, _ = path.sample(x0, x1, t - eps)
    torch.testing.assert_close((forward - backward) / (2 * eps), v, atol=1e-3, rtol=1e-3)


def test_loss_is_zero_for_the_exact_field_and_positive_otherwise():
    g = torch.Generator().manual_seed(1)
    x1, x0, t = torch.randn(8, 2, 4, generator=g), torch.randn(8, 2, 4, generator=g), torch.rand(8, generator=g)
    path = OTPath(0.0)

    def exact(x, tt):  # for sigma_min = 0 and one data point, v = (x1 - x_t) / (1 - t)
        return (x1 - x) / (1 - tt)[:, None, None]

    assert flow_matching_loss(exact, x1, path, t=t, x0=x0).item() < 1e-10
    assert flow_matching_loss(lambda x, tt: torch.zeros_like(x), x1, path, t=t, x0=x0).item() > 0.5


def _batches(x1: torch.Tensor, size: int) -> list[tuple[torch.Tensor, dict]]:
    """Held-out batches whose condition is the data itself, so a velocity can be exact."""
    return [(x1[i : i + size], {"data": x1[i : i + size]}) for i in range(0, len(x1), size)]


@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
def test_heldout_loss_of_the_exact_field_is_zero(sigma_min):
    x1 = torch.randn(20, 2, 3, generator=torch.Generator().manual_seed(4))
    a = 1 - sigma_min

    def exact(x, t, data):  # x0 = (x_t - t x1) / (1 - a t), so v = x1 - a x0
        tt = t[:, None, None]
        return data - a * (x - tt * data) / (1 - a * tt)

    assert heldout_fm_loss(exact, _batches(x1, 8), OTPath(sigma_min), times=4) < 1e-10


@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
def test_heldout_loss_of_a_zero_field_is_the_mean_squared_target(sigma_min):
    # v = x1 - (1 - σ) x0 with x1 = 2 everywhere and x0 ~ N(0, I): E v² = 4 + (1 - σ)².
    x1 = torch.full((64, 3, 50), 2.0)
    value = heldout_fm_loss(lambda x, t, data: torch.zeros_like(x), _batches(x1, 16), OTPath(sigma_min), times=4)
    assert value == pytest.approx(4 + (1 - sigma_min) ** 2, abs=0.1)  # ~38 400 draws: std ≈ 0.02


def test_heldout_loss_poses_the_same_problems_at_the_bin_midpoints_every_time():
    x1 = torch.randn(10, 4, generator=torch.Generator().manual_seed(5))
    seen = []

    def model(scale):
        def velocity(x, t, data):
            seen.append((x.clone(), t.clone()))
            return scale * x
        return velocity

    first = heldout_fm_loss(model(1.0), _batches(x1, 4), OTPath(), times=3)
    problems, seen[:] = list(seen), []
    other = heldout_fm_loss(model(0.5), _batches(x1, 4), OTPath(), times=3)
    assert len(seen) == len(problems) == 3 * 3  # three batches (4, 4, 2) at three times
    assert all(torch.equal(x, y) and torch.equal(t, u) for (x, t), (y, u) in zip(seen, problems))
    assert sorted({round(float(t[0]), 6) for _, t in seen}) == [round(1 / 6, 6), 0.5, round(5 / 6, 6)]
    assert other != first  # the same problems, other weights: only the weights differ
    assert heldout_fm_loss(model(1.0), _batches(x1, 4), OTPath(), times=3) == first
    with pytest.raises(ValueError, match="times"):
        heldout_fm_loss(model(1.0), _batches(x1, 4), OTPath(), times=0)


def test_heldout_loss_with_frame_masks_scores_the_real_frames_only():
    # Latents (B, C, T, F): the field is exact on the first 3 of 6 frames and zero on the rest.
    x1 = torch.randn(8, 2, 6, 4, generator=torch.Generator().manual_seed(6))

    def half_exact(x, t, data):
        tt = t[:, None, None, None]
        v = data - (x - tt * data) / (1 - tt)
        return torch.cat([v[:, :, :3], torch.zeros_like(v[:, :, 3:])], dim=2)

    batches = _batches(x1, 4)
    real = torch.arange(6) < 3
    masks = [real.expand(4, 6)] * 2
    assert heldout_fm_loss(half_exact, batches, OTPath(), times=2, frame_masks=masks) < 1e-10
    assert heldout_fm_loss(half_exact, batches, OTPath(), times=2) > 0.5  # the padding counted
    full = [torch.ones(4, 6, dtype=torch.bool)] * 2  # nothing padded: exactly the unmasked score
    assert heldout_fm_loss(half_exact, batches, OTPath(), times=2, frame_masks=full) == \
        heldout_fm_loss(half_exact, batches, OTPath(), times=2)


ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


@pytest.mark.parametrize("method", list(ORDERS))
def test_fixed_step_solver_converges_at_its_order(method):
    # dx/dt = x cos(t), x(0) = 1  =>  x(1) = exp(sin 1).
    def f(x, t):
        return x * torch.cos(t)[:, None]

    x0 = torch.ones(1, 1, dtype=torch.float64)
    exact = math.exp(math.sin(1.0))
    errors = [abs(solve(f, x0, method=method, steps=n).x.item() - exact) for n in (10, 20, 40)]
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    for rate in rates:
        assert abs(rate - ORDERS[method]) < 0.3, (method, rates)


def test_adaptive_solver_meets_tolerance_and_counts_every_evaluation():
    calls = []

    def f(x, t):
        calls.append(1)
        return x * torch.cos(t)[:, None]

    x0 = torch.ones(1, 1, dtype=torch.float64)
    sol = solve(f, x0, method="dopri5", steps=1, rtol=1e-8, atol=1e-8)
    assert abs(sol.x.item() - math.exp(math.sin(1.0))) < 1e-6
    assert sol.nfe == len(calls)
    assert sol.nfe >= 1 + 6 * sol.steps  # first-same-as-last: 6 new stages per attempted step
    loose = solve(f, x0, method="dopri5", steps=1, rtol=1e-3, atol=1e-3)
    assert loose.nfe < sol.nfe  # a looser tolerance takes fewer evaluations


@pytest.mark.parametrize("method, per_step", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_nfe_is_exact_and_guidance_counts_its_doubled_batch(method, per_step):
    calls = []

    def f(x, t, context, context_mask):
        calls.append(x.shape[0])
        return -x

    x = torch.randn(3, 2)
    ctx, mask = torch.randn(3, 4, 5), torch.ones(3, 4, dtype=torch.bool)
    plain = solve(f, x, method=method, steps=7, context=ctx, context_mask=mask)
    assert plain.nfe == 7 * per_step == len(calls)
    calls.clear()
    cfg = ClassifierFreeGuidance(f, 3.0, torch.randn(2, 5), torch.ones(2, dtype=torch.bool))
    guided = solve(cfg, x, method=method, steps=7, context=ctx, context_mask=mask)
    assert guided.nfe == 2 * 7 * per_step
    assert calls == [6] * (7 * per_step)  # one doubled batch per call


def _toy_velocity(x, t, context, context_mask):
    # Depends on the masked mean of the context, so cond and uncond differ.
    pooled = (context * context_mask[..., None]).sum(1) / context_mask.sum(1, keepdim=True)
    return x * t[:, None] + pooled[:, : x.shape[1]]


def test_guidance_weight_one_is_conditional_and_zero_is_unconditional():
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(4, 3, generator=g), torch.rand(4, generator=g)
    ctx, mask = torch.randn(4, 6, 3, generator=g), torch.ones(4, 6, dtype=torch.bool)
    null, null_mask = torch.randn(1, 2, 3, generator=g), torch.ones(1, 2, dtype=torch.bool)
    cond = _toy_velocity(x, t, ctx, mask)
    uncond = _toy_velocity(x, t, null.expand(4, -1, -1), null_mask.expand(4, -1))
    torch.testing.assert_close(ClassifierFreeGuidance(_toy_velocity, 1.0, null, null_mask)(
        x, t, context=ctx, context_mask=mask), cond)
    torch.testing.assert_close(ClassifierFreeGuidance(_toy_velocity, 0.0, null, null_mask)(
        x, t, context=ctx, context_mask=mask), uncond)
    w3 = ClassifierFreeGuidance(_toy_velocity, 3.0, null, null_mask)(x, t, context=ctx, context_mask=mask)
    torch.testing.assert_close(w3, 3 * cond - 2 * uncond)


def test_condition_dropout_replaces_with_the_empty_caption():
    g = torch.Generator().manual_seed(3)
    ctx, mask = torch.randn(1000, 4, 2, generator=g), torch.ones(1000, 4, dtype=torch.bool)
    null, null_mask = torch.full((1, 6, 2), 7.0), torch.tensor([[True, True, False, False, False, False]])
    out, out_mask, dropped = drop_condition(ctx, mask, null, null_mask, 0.1, generator=g)
    assert out.shape == (1000, 6, 2) and out_mask.shape == (1000, 6)
    assert 60 < int(dropped.sum()) < 140  # ~10 %
    assert (out[dropped] == 7.0).all() and (out_mask[dropped] == null_mask).all()
    torch.testing.assert_close(out[~dropped][:, :4], ctx[~dropped])
    assert not out_mask[~dropped][:, 4:].any()
    assert not drop_condition(ctx, mask, null, null_mask, 0.0)[2].any()
    assert drop_condition(ctx, mask, null, null_mask, 1.0)[2].all()


def test_logit_normal_times_gather_in_the_middle_of_the_path():
    from lafma.flow import sample_times

    g = torch.Generator().manual_seed(0)
    uniform = sample_times(20000, "uniform", generator=g)
    logit = sample_times(20000, "logit_normal", generator=g)
    shifted = sample_times(20000, "logit_normal", mean=1.0, generator=g)
    assert 0 < float(logit.min()) and float(logit.max()) < 1
    middle = [float(((x > 0.25) & (x < 0.75)).float().mean()) for x in (uniform, logit)]
    assert abs(middle[0] - 0.5) < 0.02 and middle[1] > 0.6  # sigmoid(N(0, 1)): ~0.73 of the mass
    assert abs(float(logit.mean()) - 0.5) < 0.01 and float(shifted.mean()) > 0.65
    with pytest.raises(ValueError, match="unknown time sampling"):
        sample_times(4, "cosine")
