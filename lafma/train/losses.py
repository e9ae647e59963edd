"""How every GAN job turns its named loss terms into the one scalar it backpropagates.

Losses are dicts of unweighted scalars (``"mel/l1"``, ``"adv/gen"``, ``"kl"``, …) logged as-is;
the lambdas are a second dict with the same keys (descript-audio-codec's shape), so what is
logged and what is optimised can never drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def weighted_sum(losses: Mapping[str, Tensor], weights: Mapping[str, float | Tensor]) -> Tensor:
    """Sum of ``weights[k] * losses[k]`` over the keys both share.

    Keys only in ``weights`` are skipped, so one weight dict serves the generator and the
    discriminator steps (as in descript-audio-codec); a loss without a weight is logged but
    not optimised. A weight may be a tensor (the VAE's adaptive adversarial weight).

    Args:
        losses: named scalar terms.
        weights: lambdas by the same names.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: If no key is shared (almost certainly a typo).
    """
    keys = [k for k in weights if k in losses]
    if not keys:
        raise ValueError(f"no weighted loss among {sorted(losses)}; weights have {sorted(weights)}")
    return torch.stack([weights[k] * losses[k] for k in keys]).sum()
