"""Best-of-N: candidates are the row's seed and the seeds after it, the scorer's favourite is
kept, and one candidate is plain generation, bit for bit."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

from lafma.metrics.scoring import ProjectionScorer, TextAudioScorer, best_of_n, candidate_seeds
from lafma.metrics.text_audio import TextAudioProjection, masked_mean
from lafma.models import build_pipeline
from pipelines.config import load_pipeline_config
from tests.lafma.test_metrics_clap import small_htsat_file, text_parts  # noqa: F401 — fixtures: a tiny CLAP

CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"


@pytest.fixture(scope="module")
def pipe():
    """configs/test.yaml's generator with random weights, its UNet stirred (a fresh UNet's
    zero-initialised output makes every seed's clip alike)."""
    torch.manual_seed(0)
    p = build_pipeline(load_pipeline_config(CONFIG))
    with torch.no_grad():
        for w in p.unet.parameters():
            w.add_(0.05 * torch.randn_like(w))
    return p


class FrontLoaded(TextAudioScorer):
    """Prefers the clip with the most energy in its first quarter, whatever the caption."""

    def score(self, audio: Tensor, sample_rate: int, captions: Sequence[str]) -> Tensor:
        return audio[:, : audio.shape[1] // 4].pow(2).mean(dim=1)


def test_candidate_seeds_follow_the_rows_seed_and_wrap():
    assert candidate_seeds(7, 3) == [7, 8, 9]
    assert candidate_seeds(2**31 - 1, 2) == [2**31 - 1, 0]
    assert candidate_seeds(5, 4)[:2] == candidate_seeds(5, 2)  # the first k of n are the candidates of k


def test_the_candidate_the_scorer_prefers_is_kept(pipe):
    captions, seeds = ["a bell rings", "rain on a roof"], [11, 40]
    picks = best_of_n(pipe.generate, captions, seeds, [4, 3], scorer=FrontLoaded(), batch_size=3, steps=2)
    for caption, seed, pick in zip(captions, seeds, picks):
        alone = [pipe.generate([caption], seeds=[s], steps=2).audio[0] for s in candidate_seeds(seed, len(pick.seeds))]
        want = [float(FrontLoaded().score(a[None], pipe.sample_rate, [caption])[0]) for a in alone]
        assert pick.seeds == candidate_seeds(seed, len(alone))
        assert pick.scores == pytest.approx(want, rel=1e-5)
        best = max(range(len(want)), key=want.__getitem__)
        assert len(set(want)) == len(want) and pick.index == best and pick.seed == pick.seeds[best]
        # The kept clip is plain generation with the kept seed (batched otherwise: to float rounding).
        torch.testing.assert_close(pick.audio, alone[best], rtol=0, atol=1e-5)
        assert pick.score == pick.scores[best]
    # Batching the candidates otherwise changes nothing.
    again = best_of_n(pipe.generate, captions, seeds, [4, 3], scorer=FrontLoaded(), batch_size=8, steps=2)
    assert [p.seed for p in again] == [p.seed for p in picks]
    for a, b in zip(again, picks):
        torch.testing.assert_close(a.audio, b.audio, rtol=0, atol=1e-5)


def test_one_candidate_is_plain_generation_bit_for_bit(pipe):
    captions, seeds = ["a bell rings", "a dog barks", "wind"], [3, 4, 99]
    plain = pipe.generate(captions, seeds=seeds, steps=2)
    for scorer in (None, FrontLoaded()):
        # Batched as plain generation was (a batch job's shards are): the same bits.
        picks = best_of_n(pipe.generate, captions, seeds, 1, scorer=scorer, batch_size=3, steps=2)
        assert [p.seed for p in picks] == seeds and all(p.index == 0 for p in picks)
        assert torch.equal(torch.stack([p.audio for p in picks]), plain.audio)
        assert all((p.scores is None) == (scorer is None) for p in picks)


def test_best_of_n_refuses_to_guess_without_a_scorer(pipe):
    with pytest.raises(ValueError, match="needs a scorer"):
        best_of_n(pipe.generate, ["a bell"], [1], 2, steps=2)
    with pytest.raises(ValueError, match="2 seeds"):
        best_of_n(pipe.generate, ["a bell"], [1, 2], 1, steps=2)


class MeanEmbedder(torch.nn.Module):
    """A stand-in audio embedder: (B, N) → (B, 4) summary statistics."""

    name = "mean-embedder"

    def embed(self, wave: Tensor, sample_rate: int) -> Tensor:
        w = wave.float()
        return torch.stack([w.mean(1), w.abs().mean(1), w.pow(2).mean(1), w.abs().amax(1)], dim=1)


def test_the_projection_scorer_is_the_evaluations_score_of_mean_pooled_captions(pipe):
    torch.manual_seed(1)
    projection = TextAudioProjection(4, 32, dim=8)
    with torch.no_grad():
        for p in projection.parameters():
            p.normal_()
    scorer = ProjectionScorer(MeanEmbedder(), projection, pipe.text_encoder)
    audio = torch.randn(3, 4000)
    captions = ["a bell rings", "rain", "a dog barks twice"]
    emb, mask = pipe.text_encoder(captions)
    want = projection.score(MeanEmbedder().embed(audio, 16000), masked_mean(emb, mask))
    assert torch.allclose(scorer.score(audio, 16000, captions), want, atol=1e-6)


def test_the_clap_scorer_is_the_cosine_of_claps_two_towers(small_htsat_file, text_parts):  # noqa: F811
    from lafma.metrics.embedders import ClapModel
    from lafma.metrics.scoring import ClapScorer

    clap = ClapModel(small_htsat_file, tokenizer=text_parts[1])
    audio = 0.1 * torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    captions = ["a dog barks twice", "rain on a tin roof"]
    a = torch.nn.functional.normalize(clap.embed_audio(audio, 16000), dim=-1)
    t = torch.nn.functional.normalize(clap.embed_text(captions), dim=-1)
    torch.testing.assert_close(ClapScorer(clap).score(audio, 16000, captions), (a * t).sum(-1), atol=1e-5, rtol=0)
