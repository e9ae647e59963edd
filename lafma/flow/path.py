"""The conditional optimal-transport path of flow matching (Lipman et al., 2023).

Conventions follow the literature: ``x0`` is noise, ``x1`` is data, ``t = 1`` is data.
"""

from __future__ import annotations

from torch import Tensor


def _expand(t: Tensor, like: Tensor) -> Tensor:
    """(B,) → (B, 1, …, 1) so t broadcasts over a sample's dims."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class OTPath:
    """x_t = (1 − (1 − σ_min) t) x0 + t x1, whose velocity is v = x1 − (1 − σ_min) x0.

    With ``sigma_min = 0`` (the released LAFMA code) this is the straight line from noise to
    data; a small positive ``sigma_min`` leaves N(x1, σ_min²) at t = 1 instead of a point.

    Args:
        sigma_min: standard deviation left around the data at t = 1.
    """

    def __init__(self, sigma_min: float = 0.0):
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
        self.sigma_min = sigma_min

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Point on the path and its target velocity.

        Args:
            x0: noise, (B, …).
            x1: data, (B, …).
            t: times in [0, 1], (B,).

        Returns:
            ``(x_t, v)``, both (B, …).
        """
        tt = _expand(t, x1)
        a = 1.0 - (1.0 - self.sigma_min) * tt
        x_t = a * x0 + tt * x1
        target = x1 - (1.0 - self.sigma_min) * x0
        return x_t, target
