"""The evaluation recipe: every number the ``evaluate`` stage reports, from embeddings alone.

Given the embeddings of held-out real clips and of clips generated from their captions (the
same order: row i of both belongs to caption i), of training clips with their caption
embeddings, and the attribute labels of both sets, :func:`score_generations` returns:

* ``eval/fd``: Fréchet distance between generated and real, over the embedder's FD rows
  (clips, or frames for VGGish);
* ``eval/fd_half`` and ``ref/real_vs_real/fd``: FD of half the generated clips against the
  other half of the real ones, beside real against real on the same halves, so both are
  measured at the same sample size (FD is biased upwards at small N);
* ``eval/kl``, ``eval/is`` and ``ref/real/is`` when the embedder has a classifier head;
* ``ref/<name>/fd`` for any extra reference set (the vocoder on real mels, ...);
* ``eval/text_audio`` and ``ref/real/text_audio``: mean paired score of a contrastive
  text-audio projection fitted on the training clips;
* ``attr/<attribute>/{accuracy,chance,real_accuracy}``: attribute classifiers fitted on the
  training clips, on generated clips against their captions' attributes, beside their
  accuracy on the real held-out clips.

Pure numpy/torch: no files, no models to load, no tracking.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lafma.metrics.attributes import Labels, attribute_accuracy, fit_attribute_classifiers
from lafma.metrics.classifier_metrics import inception_score, kl_divergence
from lafma.metrics.frechet import frechet_distance_from_embeddings
from lafma.metrics.text_audio import TextAudioProjection, fit_text_audio_projection

# audioldm_eval's inception score splits its set in 10; a small held-out set gets fewer, with
# at least two clips in each.
IS_SPLITS = 10


@dataclass
class Embedded:
    """What an embedder made of one set of N clips.

    Attributes:
        fd: (M, D) rows the Fréchet distance pools (M = N for clip-level embedders).
        clips: (N, D) one embedding per clip.
        logits: (N, K) classifier logits, or None for an embedder without a head.
    """

    fd: np.ndarray
    clips: np.ndarray
    logits: np.ndarray | None = None


@dataclass
class Scores:
    """:func:`score_generations`' result.

    Attributes:
        metrics: flat metric names (see the module docstring) → values.
        text_audio_per_clip: (N,) the text-audio score of each generated clip.
        halves: the row indices of the two halves ``eval/fd_half`` (generated rows of the
            first against real rows of the second) and ``ref/real_vs_real/fd`` compare.
        projection: the fitted text-audio projection that scored ``eval/text_audio``: with
            the embedder and the text encoder, the scorer best-of-N generation ranks by
            (:class:`lafma.metrics.scoring.ProjectionScorer`).
    """

    metrics: dict[str, float]
    text_audio_per_clip: np.ndarray
    halves: tuple[np.ndarray, np.ndarray]
    projection: TextAudioProjection | None = None


def halves(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Even and odd indices of ``n`` rows: two disjoint halves of one set."""
    idx = np.arange(n)
    return idx[0::2], idx[1::2]


def score_generations(real: Embedded, generated: Embedded, *, train: np.ndarray, train_text: np.ndarray,
                      train_captions: Sequence[str], held_text: np.ndarray, train_labels: Labels | None = None,
                      held_labels: Labels | None = None, references: Mapping[str, np.ndarray] | None = None,
                      seed: int = 0) -> Scores:
    """Score generated clips against the real held-out clips of the same captions.

    Args:
        real: the held-out real clips (N >= 4).
        generated: clips generated from the same N captions, row for row.
        train: (Nt, D) clip embeddings of the training clips.
        train_text: (Nt, Dt) text embeddings of their captions; ``train_captions`` those
            captions (equal captions count as matches when fitting the projection).
        held_text: (N, Dt) text embeddings of the held-out captions.
        train_labels, held_labels: ``attribute -> labels`` of the training and held-out clips
            (``None`` where an attribute does not apply); no attributes: no ``attr/`` metrics.
        references: ``name -> (M, D)`` FD rows of other renderings of the real clips, each
            scored against ``real.fd`` as ``ref/<name>/fd``.
        seed: of the text-audio projection's fit.

    Returns:
        :class:`Scores`; metric values are floats.
    """
    n = len(real.clips)
    if len(generated.clips) != n or len(held_text) != n:
        raise ValueError(f"{n} real clips, {len(generated.clips)} generated, {len(held_text)} captions: "
                         "the sets must be paired row for row")
    a, b = halves(n)
    metrics = {"eval/fd": frechet_distance_from_embeddings(generated.fd, real.fd),
               "eval/fd_half": frechet_distance_from_embeddings(generated.clips[a], real.clips[b])}
    refs = {"ref/real_vs_real/fd": frechet_distance_from_embeddings(real.clips[a], real.clips[b])}
    if generated.logits is not None and real.logits is not None:
        splits = min(IS_SPLITS, n // 2)
        metrics["eval/kl"] = kl_divergence(real.logits, generated.logits)
        metrics["eval/is"] = inception_score(generated.logits, splits=splits)[0]
        refs["ref/real/is"] = inception_score(real.logits, splits=splits)[0]
    for name, rows in (references or {}).items():
        refs[f"ref/{name}/fd"] = frechet_distance_from_embeddings(rows, real.fd)

    proj = fit_text_audio_projection(torch.from_numpy(train), torch.as_tensor(train_text),
                                     keys=list(train_captions), seed=seed)
    held = torch.as_tensor(held_text)
    per_clip = proj.score(torch.from_numpy(generated.clips), held).detach().numpy()
    metrics["eval/text_audio"] = float(per_clip.mean())
    refs["ref/real/text_audio"] = float(proj.score(torch.from_numpy(real.clips), held).detach().mean())

    attrs = {}
    if train_labels:
        fit = fit_attribute_classifiers(torch.from_numpy(train), train_labels)
        on_gen = attribute_accuracy(fit, torch.from_numpy(generated.clips), held_labels or {})
        on_real = attribute_accuracy(fit, torch.from_numpy(real.clips), held_labels or {})
        for name, v in on_gen.items():
            attrs |= {f"attr/{name}/accuracy": v["accuracy"], f"attr/{name}/chance": v["chance"],
                      f"attr/{name}/real_accuracy": on_real[name]["accuracy"]}
    return Scores(metrics | refs | attrs, per_clip, (a, b), proj)
