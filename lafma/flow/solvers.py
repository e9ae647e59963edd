"""ODE solvers for dx/dt = u(x, t) from t0 (noise) to t1 (data), with exact NFE accounting.

The fixed-step methods are explicit Runge–Kutta schemes given by their Butcher tableaux, so
adding one is a table row, not a new loop. ``dopri5`` is the adaptive Dormand–Prince 5(4)
pair with a standard PI-free step-size controller.

Any callable ``velocity(x, t, **cond)`` works; ``t`` is passed as a (B,) tensor. A velocity
with ``evals_per_call = k`` (classifier-free guidance has k = 2: it runs a doubled batch)
is counted k times per call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# name -> (a: stage coefficients, b: weights, c: nodes). Stage i evaluates at t + c[i]·h on
# x + h·Σ_j a[i][j]·k_j.
TABLEAUX: dict[str, tuple[list[list[float]], list[float], list[float]]] = {
    "euler": ([[]], [1.0], [0.0]),
    "midpoint": ([[], [0.5]], [0.0, 1.0], [0.0, 0.5]),
    "heun": ([[], [1.0]], [0.5, 0.5], [0.0, 1.0]),
    "rk4": ([[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]], [1 / 6, 1 / 3, 1 / 3, 1 / 6], [0.0, 0.5, 0.5, 1.0]),
}

# Dormand–Prince 5(4): 7 stages, first-same-as-last.
_DP_A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
]
_DP_C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
_DP_B5 = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0]
_DP_B4 = [5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]

METHODS = (*TABLEAUX, "dopri5")
# Time grids of the fixed-step solvers. "released": the released LAFMA sampler evaluates Euler
# at t_i = ε + i/N·(1 − ε) (it never queries the model at t = 0, where its training times,
# drawn from [ε, 1], never were) but steps by 1/N, so it ends ε/N past t = 1.
GRIDS = ("uniform", "released")
RELEASED_T_EPS = 1e-3


@dataclass
class Solution:
    """Result of a solve: the final state, function evaluations used, and steps taken."""

    x: Tensor
    nfe: int
    steps: int


class _Counted:
    """Wrap a velocity so every call is counted (times its ``evals_per_call``)."""

    def __init__(self, velocity: Callable[..., Tensor], cond: dict):
        self.velocity = velocity
        self.cond = cond
        self.per_call = int(getattr(velocity, "evals_per_call", 1))
        self.nfe = 0

    def __call__(self, x: Tensor, t: float) -> Tensor:
        self.nfe += self.per_call
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        return self.velocity(x, tt, **self.cond)


def _rk_step(f: _Counted, x: Tensor, t: float, h: float, a, b, c) -> Tensor:
    ks: list[Tensor] = []
    for i in range(len(b)):
        xi = x
        for j, aij in enumerate(a[i]):
            if aij != 0.0:
                xi = xi + h * aij * ks[j]
        ks.append(f(xi, t + c[i] * h))
    out = x
    for bi, k in zip(b, ks):
        if bi != 0.0:
            out = out + h * bi * k
    return out


def _dopri5(f: _Counted, x: Tensor, t0: float, t1: float, h: float, rtol: float, atol: float,
            max_steps: int) -> tuple[Tensor, int]:
    t, steps = t0, 0
    direction = 1.0 if t1 >= t0 else -1.0
    k1 = f(x, t)
    while direction * (t1 - t) > 1e-12:
        if steps >= max_steps:
            raise RuntimeError(f"dopri5 did not reach t={t1} within {max_steps} steps")
        h = direction * min(abs(h), abs(t1 - t))
        ks = [k1]
        for i in range(1, 7):
            xi = x + h * sum(aij * ks[j] for j, aij in enumerate(_DP_A[i]) if aij != 0.0)
            ks.append(f(xi, t + _DP_C[i] * h))
        x5 = x + h * sum(bi * k for bi, k in zip(_DP_B5, ks) if bi != 0.0)
        x4 = x + h * sum(bi * k for bi, k in zip(_DP_B4, ks) if bi != 0.0)
        scale = atol + rtol * torch.maximum(x.abs(), x5.abs())
        err = torch.sqrt(torch.mean(((x5 - x4) / scale) ** 2)).item()
        if err <= 1.0:  # accept; FSAL: the 7th stage is the next step's first
            t, x, k1 = t + h, x5, ks[6]
            steps += 1
        # Standard controller: h ← h·0.9·err^(−1/5), limited to [0.2, 5]×.
        factor = 5.0 if err == 0.0 else min(5.0, max(0.2, 0.9 * err ** -0.2))
        h = h * factor
    return x, steps


@torch.no_grad()
def solve(velocity: Callable[..., Tensor], x0: Tensor, *, method: str = "euler", steps: int = 10,
          t0: float = 0.0, t1: float = 1.0, rtol: float = 1e-4, atol: float = 1e-4,
          max_steps: int = 10_000, grid: str = "uniform", project: Callable[[Tensor, float], Tensor] | None = None,
          **cond: Tensor) -> Solution:
    """Integrate dx/dt = velocity(x, t, **cond) from ``t0`` to ``t1``.

    Args:
        velocity: the vector field; t arrives as a (B,) tensor.
        x0: initial state (B, …), noise for generation.
        method: one of ``euler``, ``midpoint``, ``heun``, ``rk4``, ``dopri5``.
        steps: number of uniform steps for fixed-step methods; sets the first step of dopri5.
        rtol, atol, max_steps: adaptive-solver controls. The error norm is taken over the
            whole batch, so with ``dopri5`` the step sizes (not the seeds) depend on the batch.
        grid: ``uniform``, or ``released`` (Euler only: see :data:`GRIDS`).
        project: ``project(x, t)`` after every step, with the time the step reached: what
            inpainting uses to put the known part of the state back on its path. Fixed-step
            methods only.
        **cond: passed to every velocity call.

    Returns:
        :class:`Solution` with the state at ``t1`` and the exact number of function evaluations.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    f = _Counted(velocity, cond)
    if method == "dopri5" and project is not None:
        raise ValueError("dopri5 chooses its own steps: regenerating part of a clip needs a fixed-step solver "
                         f"({', '.join(m for m in METHODS if m != 'dopri5')})")
    if method == "dopri5":
        x, n = _dopri5(f, x0, t0, t1, (t1 - t0) / steps, rtol, atol, max_steps)
        return Solution(x, f.nfe, n)
    if method not in TABLEAUX:
        raise ValueError(f"unknown solver {method!r}; choose from {', '.join(METHODS)}")
    if grid not in GRIDS:
        raise ValueError(f"unknown time grid {grid!r}; choose from {', '.join(GRIDS)}")
    if grid == "released" and method != "euler":
        raise ValueError(f"the released time grid is an Euler grid, not {method!r}")
    a, b, c = TABLEAUX[method]
    h = (t1 - t0) / steps
    x = x0
    for i in range(steps):
        t = t0 + i * h
        if grid == "released":
            t = t0 + RELEASED_T_EPS + i / steps * (t1 - t0 - RELEASED_T_EPS)
        x = _rk_step(f, x, t, h, a, b, c)
        if project is not None:
            x = project(x, t + h)
    return Solution(x, f.nfe, steps)
