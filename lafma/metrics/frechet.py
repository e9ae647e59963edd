"""Fréchet distance between Gaussians fitted to two embedding sets (FID / FAD / PANNs FD).

    FD = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½)

The trace of the matrix square root is computed from the symmetric form
``(S1^½ S2 S1^½)^½``, which has the same eigenvalues as ``S1 S2`` but is symmetric positive
semi-definite by construction: its eigenvalues come from ``eigh``, are real, and are
clipped at zero. So no complex parts have to be discarded and no epsilon has to be added for
singular covariances (fewer samples than dimensions), the two fixes the usual
``scipy.linalg.sqrtm(S1 @ S2)`` route needs. Everything runs in float64 numpy; scipy is not
needed.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def embedding_stats(emb) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of an embedding set.

    Args:
        emb: (N, D) array or tensor, N >= 2.

    Returns:
        ``(mu, sigma)``: (D,) and (D, D) float64; the covariance is unbiased (N - 1), as
        ``np.cov`` and every FID/FAD implementation compute it.
    """
    x = _as_f64(emb)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"embedding_stats needs (N >= 2, D) embeddings, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or Inf")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues → 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^½) via the symmetric ``S1^½ S2 S1^½``."""
    r1 = _psd_sqrt(sigma1)
    m = r1 @ sigma2 @ r1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1, mu2: (D,) means.
        sigma1, sigma2: (D, D) covariances (symmetric PSD; singular is fine).

    Returns:
        The squared-distance form used by FID/FAD (not its square root), >= 0 up to rounding.
    """
    mu1, mu2 = _as_f64(mu1).reshape(-1), _as_f64(mu2).reshape(-1)
    s1, s2 = np.atleast_2d(_as_f64(sigma1)), np.atleast_2d(_as_f64(sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))
    return max(fd, 0.0)  # rounding can leave -1e-12 for identical sets


def frechet_distance_from_embeddings(emb1, emb2) -> float:
    """:func:`frechet_distance` of the Gaussians fitted to two (N, D) embedding sets."""
    return frechet_distance(*embedding_stats(emb1), *embedding_stats(emb2))
