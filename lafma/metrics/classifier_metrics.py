"""KL divergence between paired classifier outputs, and the inception score.

Inputs are classifier *logits* (B, K), as :meth:`AudioEmbedder.classify` returns them, and
``head`` says how to turn them into probabilities:

* ``softmax``: one categorical distribution per clip. KL(ref ‖ gen) summed over classes and
  averaged over pairs; this is audioldm_eval's ``kullback_leibler_divergence_softmax`` (the
  AudioGen formulation), the KL most text-to-audio papers (AudioLDM, Tango, LAFMA) report
  with PANNs' 527 AudioSet logits. Also the right reading for aisfx's heads, which were
  trained with cross-entropy.
* ``sigmoid``: audioldm_eval's ``kullback_leibler_divergence_sigmoid`` exactly: PANNs'
  per-class sigmoid outputs treated as unnormalised masses, Σ_k p_k log(p_k / q_k). It is
  what that code reports for the multi-label head, but it is not a divergence (it can be
  negative when the generated clip scores higher on every class), so use it only to compare
  with papers that report it.
* ``bernoulli``: the proper divergence for a multi-label head: per-class Bernoulli KL,
  Σ_k [p log(p/q) + (1 - p) log((1 - p)/(1 - q))], >= 0 and 0 only for identical outputs.

audioldm_eval adds 1e-6 to the generated probabilities before the log; ``eps`` (default 0,
the exact value) reproduces that when set to 1e-6. The difference is at most K·eps.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

Head = Literal["softmax", "sigmoid", "bernoulli"]


def _logits(x) -> Tensor:
    t = torch.as_tensor(x).detach().double().cpu()
    if t.dim() != 2:
        raise ValueError(f"expected (B, K) logits, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("logits contain NaN or Inf")
    return t


def kl_divergence(ref_logits, gen_logits, head: Head = "softmax", eps: float = 0.0) -> float:
    """Mean over pairs of KL(ref_i ‖ gen_i): how far each generated clip's class posterior is from its reference's.

    Args:
        ref_logits: (B, K) logits of the reference (real) clips: the "target" distribution.
        gen_logits: (B, K) logits of the generated clips, row i paired with reference row i.
        head: ``softmax``, ``sigmoid`` or ``bernoulli`` (see the module docstring).
        eps: added to the generated probabilities inside the log (1e-6 = audioldm_eval).

    Returns:
        The KL in nats, averaged over the B pairs.
    """
    p_log, q_log = _logits(ref_logits), _logits(gen_logits)
    if p_log.shape != q_log.shape:
        raise ValueError(f"paired outputs differ in shape: {tuple(p_log.shape)} vs {tuple(q_log.shape)}")
    if head == "softmax":
        p = p_log.softmax(dim=1)
        log_q = q_log.log_softmax(dim=1) if eps == 0 else (q_log.softmax(dim=1) + eps).log()
        kl = torch.special.xlogy(p, p) - p * log_q  # 0 · log 0 = 0
    elif head == "sigmoid":
        p = torch.sigmoid(p_log)
        log_q = torch.nn.functional.logsigmoid(q_log) if eps == 0 else (torch.sigmoid(q_log) + eps).log()
        kl = torch.special.xlogy(p, p) - p * log_q
    elif head == "bernoulli":
        p = torch.sigmoid(p_log)
        # log(1 - sigmoid(x)) = logsigmoid(-x): exact even where sigmoid rounds to 1.
        kl = (torch.special.xlogy(p, p) - p * torch.nn.functional.logsigmoid(q_log)
              + torch.special.xlogy(1 - p, 1 - p) - (1 - p) * torch.nn.functional.logsigmoid(-q_log))
    else:
        raise ValueError(f"head must be softmax, sigmoid or bernoulli, got {head!r}")
    return float(kl.sum(dim=1).mean())


def inception_score(logits, splits: int = 10, shuffle_seed: int | None = 2020,
                    inputs: Literal["logits", "probs"] = "logits") -> tuple[float, float]:
    """Inception score exp(E_x KL(p(y|x) ‖ p(y))), its mean and std over ``splits`` chunks.

    1 when every clip gets the same distribution; K when each clip is confidently one of K
    classes and the classes are used equally. The defaults are audioldm_eval's: softmax of
    the logits, rows shuffled with ``numpy.random.RandomState(2020)``, 10 splits.

    Args:
        logits: (N, K) classifier logits (or probabilities with ``inputs="probs"``).
        splits: number of chunks; each needs at least one row.
        shuffle_seed: seed of the row permutation before splitting; ``None`` keeps the order.
        inputs: ``logits`` (softmax is applied) or ``probs`` (rows already sum to one).

    Returns:
        ``(mean, std)`` over the splits.
    """
    x = _logits(logits)
    n = x.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, N={n}], got {splits}")
    if shuffle_seed is not None:
        x = x[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(n))]
    if inputs == "logits":
        p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
    elif inputs == "probs":
        if (x < 0).any() or not torch.allclose(x.sum(dim=1), torch.ones(n, dtype=x.dtype), atol=1e-4):
            raise ValueError("probabilities must be non-negative and sum to one per row")
        p, log_p = x, x.log()
    else:
        raise ValueError(f"inputs must be logits or probs, got {inputs!r}")
    scores = []
    for i in range(splits):
        sl = slice(i * n // splits, (i + 1) * n // splits)
        marginal = p[sl].mean(dim=0, keepdim=True)  # p(y) within the split
        # Classes a clip gives zero probability contribute nothing (0 · log 0 = 0).
        kl = torch.where(p[sl] > 0, p[sl] * (log_p[sl] - marginal.log()), 0.0)
        scores.append(float(kl.sum(dim=1).mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))
