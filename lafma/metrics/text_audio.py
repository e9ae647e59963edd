"""Text–audio agreement: the CLAP score, and a small contrastive model trained offline.

:func:`clap_score` is the literature's number (mean cosine between each caption's and its
clip's embedding in a joint space). Without LAION-CLAP weights, :func:`fit_text_audio_projection`
builds a joint space of our own: frozen audio embeddings (e.g. aisfx) and frozen text
embeddings (the project's text encoder, mean-pooled) are standardised and mapped by two
learnt linear projections, trained with CLIP's symmetric InfoNCE loss on the training split.
Its scores are this project's own scale.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


def clap_score(text_emb: Tensor, audio_emb: Tensor) -> float:
    """Mean cosine similarity between paired rows: text_emb (B, D) and audio_emb (B, D).

    In [-1, 1]; papers that quote CLAP scores as percentages multiply by 100.
    """
    t, a = torch.as_tensor(text_emb).float(), torch.as_tensor(audio_emb).float()
    if t.shape != a.shape or t.dim() != 2:
        raise ValueError(f"need paired (B, D) embeddings, got {tuple(t.shape)} and {tuple(a.shape)}")
    return float(nn.functional.cosine_similarity(t, a, dim=1).mean())


def masked_mean(emb: Tensor, mask: Tensor) -> Tensor:
    """Token embeddings (B, L, D) and mask (B, L) → mean over real tokens (B, D)."""
    m = mask.to(emb.dtype).unsqueeze(-1)  # (B, L, 1)
    return (emb * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def _positives(keys: Sequence[str] | None, n: int, device: torch.device) -> Tensor:
    """(n, n) bool: which pairs count as matches. Identical captions of different clips match too,
    so a corpus with repeated captions does not push equally-correct pairs apart."""
    if keys is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} pairs")
    ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    code = torch.tensor([ids[k] for k in keys], device=device)
    return code[:, None] == code[None, :]


class TextAudioProjection(nn.Module):
    """Two linear maps from frozen embeddings into a shared unit sphere.

    Args:
        audio_dim, text_dim: widths of the frozen embeddings.
        dim: width of the joint space.
    """

    def __init__(self, audio_dim: int, text_dim: int, dim: int = 64):
        super().__init__()
        # Frozen embedders have very different scales (aisfx's are non-negative maxima):
        # standardising each side lets one learning rate serve both projections.
        for side, d in (("audio", audio_dim), ("text", text_dim)):
            self.register_buffer(f"{side}_mean", torch.zeros(d))
            self.register_buffer(f"{side}_std", torch.ones(d))
        self.audio_proj = nn.Linear(audio_dim, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def embed_audio(self, audio_emb: Tensor) -> Tensor:
        """(B, audio_dim) → unit-norm (B, dim)."""
        x = (audio_emb.float() - self.audio_mean) / self.audio_std
        return nn.functional.normalize(self.audio_proj(x), dim=-1)

    def embed_text(self, text_emb: Tensor) -> Tensor:
        """(B, text_dim) → unit-norm (B, dim)."""
        x = (text_emb.float() - self.text_mean) / self.text_std
        return nn.functional.normalize(self.text_proj(x), dim=-1)

    def similarity(self, audio_emb: Tensor, text_emb: Tensor) -> Tensor:
        """Cosine similarity of every audio row with every text row: (Na, Nt)."""
        return self.embed_audio(audio_emb) @ self.embed_text(text_emb).T

    @torch.no_grad()
    def score(self, audio_emb: Tensor, text_emb: Tensor) -> Tensor:
        """Cosine similarity of paired rows (B,): how well clip i matches caption i."""
        return (self.embed_audio(audio_emb) * self.embed_text(text_emb)).sum(dim=-1)

    def loss(self, audio_emb: Tensor, text_emb: Tensor, keys: Sequence[str] | None = None) -> Tensor:
        """Symmetric InfoNCE (CLIP): audio→text and text→audio cross-entropy over the batch."""
        logits = self.similarity(audio_emb, text_emb) * self.logit_scale.clamp(max=math.log(100)).exp()
        pos = _positives(keys, logits.shape[0], logits.device)
        # -log Σ_positives softmax: with one positive per row this is plain cross-entropy.
        a2t = torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~pos, -torch.inf), 1)
        t2a = torch.logsumexp(logits, 0) - torch.logsumexp(logits.masked_fill(~pos, -torch.inf), 0)
        return (a2t.mean() + t2a.mean()) / 2

    def save(self, path: str | os.PathLike) -> None:
        """Write the weights (safetensors); :meth:`load` reads the widths back from the shapes."""
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> TextAudioProjection:
        state = load_file(os.fspath(path))
        dim, audio_dim = state["audio_proj.weight"].shape
        model = cls(audio_dim, state["text_proj.weight"].shape[1], dim)
        model.load_state_dict(state)
        return model.eval()


def fit_text_audio_projection(audio_emb: Tensor, text_emb: Tensor, *, keys: Sequence[str] | None = None,
                              dim: int = 64, steps: int = 300, lr: float = 1e-2, weight_decay: float = 1e-2,
                              batch_size: int = 256, seed: int = 0) -> TextAudioProjection:
    """Train a :class:`TextAudioProjection` on paired frozen embeddings (deterministic from ``seed``).

    Args:
        audio_emb: (N, Da) audio embeddings of the training clips.
        text_emb: (N, Dt) text embeddings of their captions (row i describes clip i).
        keys: optional caption strings; rows with equal keys count as matches of each other.
        dim: joint-space width.
        steps: AdamW steps; each sees one minibatch (the whole set when N <= batch_size).
        lr, weight_decay: AdamW settings.
        batch_size: pairs per step; InfoNCE's negatives are the rest of the batch.
        seed: fixes initialisation and minibatch order.

    Returns:
        The trained model, in eval mode, on CPU.
    """
    a, t = torch.as_tensor(audio_emb).float().cpu(), torch.as_tensor(text_emb).float().cpu()
    n = a.shape[0]
    if a.dim() != 2 or t.dim() != 2 or t.shape[0] != n or n < 2:
        raise ValueError(f"need paired (N >= 2, D) embeddings, got {tuple(a.shape)} and {tuple(t.shape)}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = TextAudioProjection(a.shape[1], t.shape[1], dim)
    model.audio_mean.copy_(a.mean(0))
    model.audio_std.copy_(a.std(0).clamp_min(1e-6))
    model.text_mean.copy_(t.mean(0))
    model.text_std.copy_(t.std(0).clamp_min(1e-6))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    bs = min(batch_size, n)
    order = torch.randperm(n, generator=gen)
    pos = 0
    model.train()
    for _ in range(steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + bs]
        pos += bs
        batch_keys = None if keys is None else [keys[i] for i in idx.tolist()]
        loss = model.loss(a[idx], t[idx], batch_keys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def retrieval_accuracy(model: TextAudioProjection, audio_emb: Tensor, text_emb: Tensor,
                       keys: Sequence[str] | None = None) -> dict[str, float]:
    """Top-1 retrieval within a set of N pairs, both directions, with its chance level.

    Returns:
        ``audio_to_text``, ``text_to_audio`` (fraction of rows whose best match is a positive)
        and ``chance`` (the same fraction for a random ranking: mean positives per row / N).
    """
    sim = model.similarity(torch.as_tensor(audio_emb), torch.as_tensor(text_emb))  # (N, N)
    pos = _positives(keys, sim.shape[0], sim.device)
    rows = torch.arange(sim.shape[0])
    return {
        "audio_to_text": float(pos[rows, sim.argmax(1)].float().mean()),
        "text_to_audio": float(pos[sim.argmax(0), rows].float().mean()),
        "chance": float(pos.float().sum(1).mean() / sim.shape[0]),
    }
