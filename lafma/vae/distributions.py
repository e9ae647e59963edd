"""The VAE posterior: a diagonal Gaussian over latents, as in LDM's ``DiagonalGaussianDistribution``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# LDM's clamp: keeps exp(logvar) finite in fp16/bf16 early in training, when the encoder's
# log-variance head can output anything.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) per sample.

    Args:
        mean: (B, C, H, W) — any shape with a leading batch dim works.
        logvar: same shape as ``mean``; clamped to [-30, 20].
    """

    def __init__(self, mean: Tensor, logvar: Tensor):
        if mean.shape != logvar.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} differ")
        self.mean = mean
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        """Split (B, 2C, H, W) moments into mean and log-variance along dim 1."""
        mean, logvar = torch.chunk(moments, 2, dim=1)  # 2 x (B, C, H, W)
        return cls(mean, logvar)

    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    def _sum(self, x: Tensor) -> Tensor:
        """Sum over every non-batch dim: (B, ...) → (B,)."""
        return x.flatten(1).sum(dim=1)  # (B, prod(...)) → (B,)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised draw mean + std * eps, differentiable in mean and logvar.

        Args:
            generator: optional RNG on the tensors' device, for reproducible draws.

        Returns:
            (B, C, H, W).
        """
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The most likely latent, i.e. the mean: (B, C, H, W)."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) = 0.5 * sum(mean² + var − 1 − logvar), per sample: (B,)."""
        return 0.5 * self._sum(self.mean.pow(2) + self.var - 1.0 - self.logvar)

    def nll(self, x: Tensor) -> Tensor:
        """Negative log-likelihood of ``x`` (same shape as mean), summed per sample: (B,)."""
        return 0.5 * self._sum(math.log(2.0 * math.pi) + self.logvar + (x - self.mean).pow(2) / self.var)
