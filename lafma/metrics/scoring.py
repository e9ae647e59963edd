"""Scoring a generated clip against its caption, and best-of-N generation by that score.

A :class:`TextAudioScorer` maps clips and captions into one joint space and scores a pair by
the cosine of their embeddings. Two kinds:

* :class:`ProjectionScorer`: the evaluation's own contrastive model
  (:func:`lafma.metrics.text_audio.fit_text_audio_projection`): a frozen audio embedder (aisfx
  by default) and the generator's own text encoder, mean-pooled over real tokens (what the
  text stage stored and the evaluation fitted on), each through its learnt projection.
* :class:`ClapScorer`: LAION-CLAP's two towers, given its checkpoint and tokenizer.

:func:`best_of_n` generates ``n`` candidates per caption with seeds ``seed, seed + 1, ...``
(:func:`candidate_seeds`) and keeps the best-scored one (TangoFlux ranks its candidates with
CLAP the same way). Pure torch: the files a scorer is saved in are the caller's business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lafma.metrics.embedders.base import AudioEmbedder
from lafma.metrics.text_audio import TextAudioProjection, masked_mean

SEED_SPACE = 2**31  # seeds are drawn and stored as non-negative 31-bit integers


class TextAudioScorer(nn.Module):
    """Base class: clips and captions → unit vectors in one space; a pair's score is their cosine.

    Subclasses implement :meth:`embed_audio` and :meth:`embed_text` and set :attr:`name`.
    """

    name: str = "text-audio"

    def embed_audio(self, audio: Tensor, sample_rate: int) -> Tensor:
        """Waveforms (B, N) at ``sample_rate`` → unit-norm (B, D)."""
        raise NotImplementedError

    def embed_text(self, captions: Sequence[str]) -> Tensor:
        """B captions → unit-norm (B, D)."""
        raise NotImplementedError

    @torch.no_grad()
    def score(self, audio: Tensor, sample_rate: int, captions: Sequence[str]) -> Tensor:
        """How well clip i matches caption i: cosine similarity (B,) on the CPU, in [-1, 1]."""
        a = self.embed_audio(audio, sample_rate)
        t = self.embed_text(list(captions)).to(a.device)
        return (a * t).sum(dim=-1).float().cpu()


class ProjectionScorer(TextAudioScorer):
    """The evaluation's scorer: ``embedder`` + ``projection`` for clips, the generator's own
    ``text_encoder`` (mean-pooled over real tokens) + ``projection`` for captions.

    Args:
        embedder: the frozen audio embedder the projection was fitted on.
        projection: the fitted :class:`~lafma.metrics.text_audio.TextAudioProjection`.
        text_encoder: captions → (token embeddings (B, L, D), mask (B, L)), the encoder whose
            mean-pooled outputs the projection was fitted on.
    """

    def __init__(self, embedder: AudioEmbedder, projection: TextAudioProjection,
                 text_encoder: Callable[[list[str]], tuple[Tensor, Tensor]]):
        super().__init__()
        self.embedder, self.projection = embedder.eval(), projection.eval()
        self.text_encoder = text_encoder  # the generator's: not this module's to own or move
        self.name = f"projection/{embedder.name}"

    @torch.no_grad()
    def embed_audio(self, audio: Tensor, sample_rate: int) -> Tensor:
        emb = self.embedder.embed(audio, sample_rate)  # (B, D_audio)
        return self.projection.embed_audio(emb.to(self.projection.audio_mean.device))

    @torch.no_grad()
    def embed_text(self, captions: Sequence[str]) -> Tensor:
        emb, mask = self.text_encoder(list(captions))  # (B, L, D_text), (B, L)
        pooled = masked_mean(emb.float(), mask)  # (B, D_text)
        return self.projection.embed_text(pooled.to(self.projection.text_mean.device))


class ClapScorer(TextAudioScorer):
    """LAION-CLAP: its audio and text towers with their projections (the CLAP score).

    Args:
        clap: a :class:`~lafma.metrics.embedders.ClapModel` built with a tokenizer.
    """

    def __init__(self, clap: nn.Module):
        super().__init__()
        self.clap = clap.eval()
        self.name = "clap"

    @torch.no_grad()
    def embed_audio(self, audio: Tensor, sample_rate: int) -> Tensor:
        return nn.functional.normalize(self.clap.embed_audio(audio, sample_rate).float(), dim=-1)

    @torch.no_grad()
    def embed_text(self, captions: Sequence[str]) -> Tensor:
        return nn.functional.normalize(self.clap.embed_text(list(captions)).float(), dim=-1)


def candidate_seeds(seed: int, n: int) -> list[int]:
    """The seeds of a row's ``n`` candidates: ``seed, seed + 1, ...`` (wrapping at 2**31).

    The first is the row's own seed, so one candidate is plain generation with that seed, and
    the first ``k`` candidates of ``n`` are the candidates of ``k``.
    """
    return [(int(seed) + k) % SEED_SPACE for k in range(n)]


@dataclass
class Pick:
    """What :func:`best_of_n` kept for one caption.

    Attributes:
        audio: (N,) the kept clip.
        seed: its seed (plain generation with it gives this clip).
        index: its position among the candidates (0 is the caption's own seed).
        seeds: every candidate's seed.
        scores: every candidate's score, or None when nothing scored them.
        nfe: velocity-model evaluations of the ``generate`` call that made the kept clip.
        latents: (C, T', F') its final latent.
    """

    audio: Tensor
    seed: int
    index: int
    seeds: list[int]
    scores: list[float] | None
    nfe: int
    latents: Tensor

    @property
    def score(self) -> float | None:
        return None if self.scores is None else self.scores[self.index]


def best_of_n(generate: Callable, captions: Sequence[str], seeds: Sequence[int], candidates: Sequence[int] | int, *,
              scorer: TextAudioScorer | None = None, batch_size: int = 8, audio: Tensor | None = None,
              **kwargs) -> list[Pick]:
    """For each caption, generate its candidates and keep the best-scored one.

    Candidates of all captions are generated ``batch_size`` clips per call (each clip depends
    only on its caption and seed, so how they are batched changes nothing), scored as they
    come, and only each caption's best clip so far is held. A tie keeps the earlier seed.

    Args:
        generate: :meth:`lafma.pipeline.LafmaPipeline.generate` (captions, seeds=, audio=,
            **kwargs) → a :class:`~lafma.pipeline.Generation`.
        captions: B captions.
        seeds: B seeds; caption i's candidates are :func:`candidate_seeds` (seeds[i], n_i).
        candidates: n per caption, or one n for all.
        scorer: scores the candidates; needed when any caption has more than one (with one,
            the clip is kept unscored when no scorer is given).
        batch_size: clips per ``generate`` call.
        audio: (B, N) input clips, one per caption (inpainting, audio-to-audio), or None.
        **kwargs: the rest of ``generate``'s arguments (steps, guidance, solver, duration,
            strength, regenerate), shared by every call.

    Returns:
        One :class:`Pick` per caption, in order.
    """
    captions = list(captions)
    counts = [int(candidates)] * len(captions) if isinstance(candidates, int) else [int(n) for n in candidates]
    if len(seeds) != len(captions) or len(counts) != len(captions):
        raise ValueError(f"{len(captions)} captions, {len(seeds)} seeds, {len(counts)} candidate counts")
    if any(n < 1 for n in counts):
        raise ValueError(f"candidates must be >= 1, got {counts}")
    if scorer is None and any(n > 1 for n in counts):
        raise ValueError("best-of-N needs a scorer to choose between candidates")
    if audio is not None and audio.shape[0] != len(captions):
        raise ValueError(f"{audio.shape[0]} input clips for {len(captions)} captions")
    items = [(i, s) for i, n in enumerate(counts) for s in candidate_seeds(seeds[i], n)]  # (caption, seed)
    scores: list[list[float]] = [[] for _ in captions]
    best: list[Pick | None] = [None] * len(captions)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        rows = [i for i, _ in chunk]
        extra = {} if audio is None else {"audio": audio[rows]}
        gen = generate([captions[i] for i in rows], seeds=[s for _, s in chunk], **extra, **kwargs)
        got = scorer.score(gen.audio, gen.sample_rate, [captions[i] for i in rows]) if scorer is not None else None
        for j, (i, seed) in enumerate(chunk):
            if got is not None:
                scores[i].append(float(got[j]))
            k = len(scores[i]) - 1 if got is not None else 0
            if best[i] is None or scores[i][k] > scores[i][best[i].index]:
                best[i] = Pick(gen.audio[j], seed, k, candidate_seeds(seeds[i], counts[i]), None, gen.nfe,
                               gen.latents[j])
    for i, pick in enumerate(best):
        pick.scores = scores[i] if scorer is not None else None
    return best  # type: ignore[return-value]  # every caption has at least one candidate
