"""The evaluation recipe on synthetic embeddings: answers that are known without running it."""

from __future__ import annotations

import numpy as np
import pytest

from lafma.metrics import Embedded, score_generations

KINDS = ("bell", "dog", "rain")


def clips(n: int, seed: int, dim: int = 8) -> tuple[np.ndarray, list[str]]:
    """Embeddings (n, dim) clustered by their kind (one centre per kind), and the kinds."""
    rng = np.random.default_rng(seed)
    centres = 3.0 * np.eye(dim)[: len(KINDS)]
    kinds = [KINDS[i % len(KINDS)] for i in range(n)]
    emb = np.stack([centres[KINDS.index(k)] for k in kinds]) + 0.5 * rng.standard_normal((n, dim))
    return emb.astype(np.float32), kinds


@pytest.fixture(scope="module")
def data():
    train, train_kinds = clips(60, seed=0)
    held, held_kinds = clips(12, seed=1)
    rng = np.random.default_rng(2)
    text = {k: rng.standard_normal(5).astype(np.float32) for k in KINDS}  # one caption per kind
    logits = rng.standard_normal((12, 4)).astype(np.float32)
    return {"train": train, "train_text": np.stack([text[k] for k in train_kinds]), "train_captions": train_kinds,
            "held_text": np.stack([text[k] for k in held_kinds]), "train_labels": {"kind": train_kinds},
            "held_labels": {"kind": held_kinds}, "real": Embedded(held, held, logits)}


def score(data, generated: Embedded, **kw):
    args = {k: v for k, v in data.items() if k != "real"} | kw
    return score_generations(data["real"], generated, **args)


def test_generations_identical_to_the_real_clips_score_like_the_real_clips(data):
    real = data["real"]
    s = score(data, Embedded(real.fd.copy(), real.clips.copy(), real.logits.copy()))
    m = s.metrics
    assert m["eval/fd"] == pytest.approx(0.0, abs=1e-6)
    assert m["eval/fd_half"] == m["ref/real_vs_real/fd"] > 0  # the same halves of the same set
    assert m["eval/kl"] == pytest.approx(0.0, abs=1e-9) and m["eval/is"] == m["ref/real/is"]
    assert m["eval/text_audio"] == pytest.approx(m["ref/real/text_audio"])
    assert m["attr/kind/accuracy"] == m["attr/kind/real_accuracy"] == 1.0  # separable clusters
    assert m["attr/kind/chance"] == pytest.approx(4 / 12)  # the training majority class, 4 of 12 held out
    assert s.text_audio_per_clip.shape == (12,) and m["eval/text_audio"] == pytest.approx(s.text_audio_per_clip.mean())


def test_a_shifted_generated_set_is_as_far_as_the_squared_shift(data):
    real, shift = data["real"], np.full(8, 0.5, np.float32)
    m = score(data, Embedded(real.fd + shift, real.clips, real.logits)).metrics
    assert m["eval/fd"] == pytest.approx(float(shift @ shift), rel=1e-5)  # same covariance: |Δμ|² is all


def test_generations_with_the_wrong_captions_lose_attributes_and_text_agreement(data):
    real = data["real"]
    wrong = np.roll(real.clips, 1, axis=0)  # every clip is the one of the next caption: another kind
    m = score(data, Embedded(wrong, wrong, real.logits)).metrics
    assert m["attr/kind/accuracy"] == 0.0 and m["attr/kind/real_accuracy"] == 1.0
    assert m["eval/text_audio"] < m["ref/real/text_audio"]
    assert m["eval/fd"] == pytest.approx(0.0, abs=1e-6)  # the same set in another order: FD cannot tell


def test_only_what_the_inputs_allow_is_reported(data):
    real = data["real"]
    plain = Embedded(real.fd, real.clips)  # no classifier head
    m = score(data, plain, train_labels=None, held_labels=None,
              references={"vocoder": real.fd, "vae_vocoder": real.fd + 1.0}).metrics
    assert not {"eval/kl", "eval/is", "ref/real/is"} & set(m) and not any(k.startswith("attr/") for k in m)
    assert m["ref/vocoder/fd"] == pytest.approx(0.0, abs=1e-6) and m["ref/vae_vocoder/fd"] == pytest.approx(8.0)
    with pytest.raises(ValueError, match="paired"):
        score(data, Embedded(real.fd, real.clips[:-1]))
