"""Stored token embeddings back into a padded batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def pad_embeddings(embs: Sequence, lengths: Sequence[int], dim: int) -> tuple[Tensor, Tensor]:
    """Flat (L_i · D) token embeddings → (B, max L, D) zero-padded, and the (B, max L) mask.

    The text stage stores only each caption's real tokens, flattened; this is the batch the
    UNet's cross-attention reads, with the padding masked out.
    """
    lengths = [int(n) for n in lengths]
    # Filled in numpy: a row read from Arrow is a read-only view, which torch.from_numpy would
    # wrap (and warn about); copying it into this array is the one copy the batch needs.
    out = np.zeros((len(lengths), max(lengths), dim), dtype=np.float32)
    for i, (e, n) in enumerate(zip(embs, lengths)):
        out[i, :n] = np.asarray(e, dtype=np.float32).reshape(n, dim)  # (n·D,) -> (n, D)
    mask = torch.arange(out.shape[1])[None] < torch.tensor(lengths)[:, None]
    return torch.from_numpy(out), mask
