"""The released LAFMA sampler as named options: its Euler grid, its unconditional input and
its output peak, each checked against the released algorithm written out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lafma.flow import solve
from lafma.flow.solvers import RELEASED_T_EPS
from lafma.models import build_pipeline, build_unet
from pipelines.config import load_pipeline_config
from tests.published import perturbed

CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"
RELEASED = ["sampler.grid=released", "sampler.null_caption=released", "sampler.peak=0.8"]


def test_released_grid_evaluates_at_eps_offset_nodes_and_steps_by_one_over_n():
    seen = []

    def velocity(x, t):
        seen.append(t[0].item())
        return torch.ones_like(x)

    x0 = torch.zeros(2, 3)
    sol = solve(velocity, x0, method="euler", steps=4, grid="released")
    n, eps = 4, RELEASED_T_EPS
    assert seen == pytest.approx([eps + i / n * (1 - eps) for i in range(n)], abs=1e-7)
    assert sol.nfe == 4 and sol.steps == 4
    torch.testing.assert_close(sol.x, x0 + 1.0)  # N steps of 1/N: the whole unit interval
    seen.clear()
    solve(velocity, x0, method="euler", steps=4)
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75])
    with pytest.raises(ValueError, match="Euler grid"):
        solve(velocity, x0, method="heun", steps=4, grid="released")


def test_a_config_asking_for_the_released_grid_with_another_solver_names_the_key():
    with pytest.raises(ValueError, match="sampler.grid"):
        load_pipeline_config(CONFIG, ["sampler.grid=released", "sampler.solver=rk4"])


@pytest.fixture(scope="module")
def released_pipe():
    cfg = load_pipeline_config(CONFIG, RELEASED)
    torch.manual_seed(0)
    # Nudged off its zero-initialised output layers, so text and noise both shape the latents.
    return build_pipeline(cfg, unet=perturbed(build_unet(cfg)))


def by_hand(pipe, caption: str, seed: int, steps: int, w: float, duration: float) -> torch.Tensor:
    """The released ``euler_sample`` for one caption: unpadded caption, "" padded to its length
    and encoded without a mask, both attended unmasked; u = u(∅) + w (u(c) − u(∅))."""
    tok = pipe.text_encoder.tokenizer([caption], return_tensors="pt")
    cond = pipe.text_encoder.model(input_ids=tok["input_ids"]).last_hidden_state
    empty = pipe.text_encoder.tokenizer([""], padding="max_length", max_length=tok["input_ids"].shape[1],
                                        return_tensors="pt")
    uncond = pipe.text_encoder.model(input_ids=empty["input_ids"]).last_hidden_state
    x = pipe.noise([seed], pipe.latent_shape(duration))
    ctx = torch.cat([uncond, cond])
    for i in range(steps):
        t = torch.full((2,), RELEASED_T_EPS + i / steps * (1 - RELEASED_T_EPS))
        out = pipe.unet(torch.cat([x, x]), t, ctx)  # no mask: every token attended
        u_uncond, u_cond = out.chunk(2)
        x = x + (u_uncond + w * (u_cond - u_uncond)) / steps
    return x


@torch.no_grad()
def test_released_options_reproduce_the_released_sampler_in_a_batch(released_pipe):
    pipe = released_pipe
    captions = ["a dog barks twice", "rain"]  # different token lengths: per-item null inputs
    out = pipe.generate(captions, seeds=[3, 4], steps=3, guidance=3.0, duration=0.64)
    assert out.nfe == 6
    for i, caption in enumerate(captions):
        want = by_hand(pipe, caption, [3, 4][i], 3, 3.0, 0.64)[0]
        torch.testing.assert_close(out.latents[i], want, rtol=1e-4, atol=1e-4)
    assert out.audio.abs().amax(dim=-1).tolist() == pytest.approx([0.8, 0.8], abs=1e-6)


@torch.no_grad()
def test_the_released_null_input_is_not_the_masked_one(released_pipe):
    """So the option is doing something: the masked empty caption gives other latents."""
    pipe = released_pipe
    released = pipe.generate(["a dog barks twice"], seeds=[3], steps=3, duration=0.64).latents
    pipe.null_caption = "masked"
    try:
        masked = pipe.generate(["a dog barks twice"], seeds=[3], steps=3, duration=0.64).latents
    finally:
        pipe.null_caption = "released"
    assert (released - masked).abs().max() > 1e-3
