"""Evaluation metrics: Fréchet distance, KL, inception score, text–audio scores, attribute accuracy,
text–audio scorers and best-of-N generation by them (:mod:`lafma.metrics.scoring`), and the
recipe that computes all of them for the ``evaluate`` stage (:mod:`lafma.metrics.evaluation`).

Pure torch + numpy. Embedders (aisfx offline; PANNs Cnn14, VGGish and LAION-CLAP from local
reference checkpoints) live in :mod:`lafma.metrics.embedders`.
"""

from lafma.metrics.attributes import (
    AttributeClassifiers,
    attribute_accuracy,
    fit_attribute_classifiers,
)
from lafma.metrics.classifier_metrics import inception_score, kl_divergence
from lafma.metrics.embedders import AudioEmbedder, CheckpointFormatError, build_embedder
from lafma.metrics.evaluation import Embedded, Scores, score_generations
from lafma.metrics.frechet import (
    embedding_stats,
    frechet_distance,
    frechet_distance_from_embeddings,
)
from lafma.metrics.scoring import (
    ClapScorer,
    Pick,
    ProjectionScorer,
    TextAudioScorer,
    best_of_n,
    candidate_seeds,
)
from lafma.metrics.text_audio import (
    TextAudioProjection,
    clap_score,
    fit_text_audio_projection,
    masked_mean,
    retrieval_accuracy,
)

__all__ = [
    "AttributeClassifiers",
    "AudioEmbedder",
    "CheckpointFormatError",
    "ClapScorer",
    "Embedded",
    "Pick",
    "ProjectionScorer",
    "Scores",
    "TextAudioProjection",
    "TextAudioScorer",
    "attribute_accuracy",
    "best_of_n",
    "build_embedder",
    "candidate_seeds",
    "clap_score",
    "embedding_stats",
    "fit_attribute_classifiers",
    "fit_text_audio_projection",
    "frechet_distance",
    "frechet_distance_from_embeddings",
    "inception_score",
    "kl_divergence",
    "masked_mean",
    "retrieval_accuracy",
    "score_generations",
]
