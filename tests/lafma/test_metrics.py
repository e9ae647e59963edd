"""Metrics with known answers, the aisfx embedder, the contrastive text–audio model and attribute accuracy."""

import hashlib
import importlib.metadata
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lafma.metrics import (
    AttributeClassifiers,
    attribute_accuracy,
    clap_score,
    embedding_stats,
    fit_attribute_classifiers,
    fit_text_audio_projection,
    frechet_distance,
    frechet_distance_from_embeddings,
    inception_score,
    kl_divergence,
    retrieval_accuracy,
)
from lafma.metrics.embedders import (
    AisfxEmbedder,
    CheckpointFormatError,
    convert_aisfx,
    ensure_aisfx_weights,
)
from lafma.metrics.text_audio import TextAudioProjection


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core runner two OpenMP threads waiting on each other
    at every barrier run these small problems 10-30x slower (measured), and one is deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# ------------------------------------------------------------------ Fréchet distance


def test_frechet_distance_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16))  # correlated dims
    assert frechet_distance_from_embeddings(x, x) == pytest.approx(0.0, abs=1e-8)
    # Fewer samples than dimensions: a singular covariance, where sqrtm(S1 S2) needs an epsilon.
    few = rng.standard_normal((10, 64))
    assert frechet_distance_from_embeddings(few, few) == pytest.approx(0.0, abs=1e-8)


def test_shifting_the_mean_by_d_adds_its_squared_norm():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 8))
    d = rng.standard_normal(8) * 3
    assert frechet_distance_from_embeddings(x, x + d) == pytest.approx(float(d @ d), rel=1e-9)
    assert frechet_distance_from_embeddings(torch.from_numpy(x), torch.from_numpy(x + d)) == pytest.approx(float(d @ d))


def test_diagonal_gaussians_match_the_closed_form():
    # For commuting covariances tr((S1 S2)^½) = Σ √(s1 s2), so FD = |Δμ|² + Σ (√s1 − √s2)².
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = (1 + 0 + 6.25) + (4 + 1 + 0)  # |Δμ|² + Σ (√s1 − √s2)²
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_full_covariances_agree_with_scipy_sqrtm():
    from scipy import linalg  # the reference sqrtm: a dev dependency
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((6, 6)), rng.standard_normal((6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    ref = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)


def test_embedding_stats_are_the_unbiased_mean_and_covariance():
    x = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    mu, sigma = embedding_stats(x)
    np.testing.assert_allclose(mu, [2.0, 2.0])
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False))
    with pytest.raises(ValueError):
        embedding_stats(x[:1])


# ------------------------------------------------------------------ KL, IS, CLAP score


@pytest.mark.parametrize("head", ["softmax", "sigmoid", "bernoulli"])
def test_kl_of_identical_outputs_is_zero(head):
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 4
    assert kl_divergence(logits, logits, head=head) == pytest.approx(0.0, abs=1e-12)


def test_kl_is_positive_for_different_outputs_and_matches_the_formula():
    # Two classes, p = (0.5, 0.5) vs q = (0.9, 0.1): KL(p‖q) = ½ ln(0.5/0.9) + ½ ln(0.5/0.1).
    ref = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    gen = torch.log(torch.tensor([[0.9, 0.1]], dtype=torch.float64))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(ref, gen) == pytest.approx(expected, rel=1e-9)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 527, generator=g), torch.randn(8, 527, generator=g)
    assert kl_divergence(a, b, head="softmax") > 0.1
    assert kl_divergence(a, b, head="bernoulli") > 0.1


def test_kl_sigmoid_reproduces_audioldm_eval_with_its_epsilon():
    g = torch.Generator().manual_seed(2)
    ref, gen = torch.randn(4, 10, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)
    p, q = torch.sigmoid(ref), torch.sigmoid(gen)
    expected = float((p * (p.log() - (q + 1e-6).log())).sum() / 4)  # Σ_k p log(p / (q + eps)), mean over pairs
    assert kl_divergence(ref, gen, head="sigmoid", eps=1e-6) == pytest.approx(expected, rel=1e-9)


def test_inception_score_of_a_uniform_classifier_is_one():
    mean, std = inception_score(torch.zeros(100, 10), splits=10)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_a_confident_diverse_classifier_is_the_number_of_classes():
    k = 8
    logits = torch.full((10 * k, k), -60.0)
    logits[torch.arange(10 * k), torch.arange(10 * k) % k] = 60.0  # every class used equally, confidently
    assert inception_score(logits, splits=1)[0] == pytest.approx(k, rel=1e-6)
    # Unshuffled, each of the 10 splits holds every class once: K in every split.
    mean, std = inception_score(logits, splits=10, shuffle_seed=None)
    assert mean == pytest.approx(k, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    probs = torch.eye(k).repeat(3, 1)
    assert inception_score(probs, splits=1, inputs="probs")[0] == pytest.approx(k)
    # Confident but not diverse: always the same class scores 1.
    assert inception_score(logits[::k], splits=1)[0] == pytest.approx(1.0)


def test_clap_score_is_the_mean_paired_cosine():
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    assert clap_score(t, t * 5) == pytest.approx(1.0)
    assert clap_score(t, -t) == pytest.approx(-1.0)
    assert clap_score(t[:2], t[:2].flip(1)) == pytest.approx(0.0)


# ------------------------------------------------------------------ aisfx


@pytest.fixture(scope="module")
def aisfx_weights(tmp_path_factory):
    import aisfx.models.cnn2d  # noqa: F401 — installed by the Makefile (NO_DEPS): missing fails, not skips
    return ensure_aisfx_weights(tmp_path_factory.mktemp("aisfx"))


@pytest.fixture(scope="module")
def aisfx(aisfx_weights):
    return AisfxEmbedder(aisfx_weights)


def test_aisfx_conversion_round_trips_to_the_original_network(aisfx):
    from aisfx.inference import get_path_modelWeights
    from aisfx.models.cnn2d import CrossNet, EmbeddingNet

    # The original module, loaded the way aisfx itself loads it (a trusted file, read once here).
    weights, ds_dict = torch.load(get_path_modelWeights(), map_location="cpu", weights_only=False)
    ref = CrossNet(EmbeddingNet("max", 3, 1, 64), ds_dict, "cpu")
    ref.load_state_dict(weights)
    ref.eval()
    spec = torch.rand(3, 100, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = aisfx.net(spec)
        torch.testing.assert_close(ours, ref.get_embedding(spec), rtol=0, atol=0)
        for head in ds_dict:
            torch.testing.assert_close(aisfx.net.head_logits(ours, head), ref(spec, head)[1], rtol=0, atol=0)


def test_aisfx_conversion_happens_once(aisfx_weights, tmp_path):
    assert aisfx_weights.name == f"aisfx-{importlib.metadata.version('aisfx')}.safetensors"
    before = aisfx_weights.stat().st_mtime_ns
    assert ensure_aisfx_weights(aisfx_weights.parent) == aisfx_weights
    assert aisfx_weights.stat().st_mtime_ns == before  # found, not rewritten
    again = convert_aisfx(tmp_path / "again.safetensors")
    assert again.read_bytes() == aisfx_weights.read_bytes()  # the conversion is deterministic
    assert not list(tmp_path.glob("*.tmp"))


def test_aisfx_embedder_reports_its_scale_and_weights(aisfx, aisfx_weights):
    assert aisfx.name == f"aisfx-{importlib.metadata.version('aisfx')}"
    assert aisfx.weights_sha256 == hashlib.sha256(aisfx_weights.read_bytes()).hexdigest()
    assert aisfx.dim == 512 and aisfx.head_activation == "softmax"
    assert len(aisfx.heads) == 9 and aisfx.num_classes == aisfx.heads["ucsMixed"] == 69
    assert aisfx.describe()["embedder"] == aisfx.name


def _tones_and_noise(sr: int, seconds: float = 2.56):
    t = np.arange(int(seconds * sr)) / sr
    # 50 ms fades: an abrupt onset is a broadband click, which a 16 kHz copy cannot contain.
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.05)
    tones = [0.5 * fade * np.sin(2 * np.pi * f * t) for f in (330.0, 550.0, 880.0)]
    rng = np.random.default_rng(0)
    noise = [0.3 * rng.standard_normal(t.size) for _ in range(3)]
    return torch.tensor(np.array(tones + noise), dtype=torch.float32)


def test_aisfx_tells_a_tone_from_noise(aisfx):
    emb = aisfx.embed(_tones_and_noise(16000), sample_rate=16000)  # resampled to 44.1 kHz inside
    assert emb.shape == (6, 512)
    d = torch.cdist(emb, emb)
    within = torch.cat([d[:3, :3][~torch.eye(3, dtype=torch.bool)], d[3:, 3:][~torch.eye(3, dtype=torch.bool)]])
    between = d[:3, 3:].flatten()
    assert between.min() > within.max(), (within, between)


def test_aisfx_input_rate_does_not_matter(aisfx):
    at_16k = aisfx.embed(_tones_and_noise(16000)[:1], sample_rate=16000)
    at_44k = aisfx.embed(_tones_and_noise(44100)[:1], sample_rate=44100)
    assert torch.nn.functional.cosine_similarity(at_16k, at_44k).item() > 0.999
    # Were the rate ignored, the 16 kHz tone would be heard 2.76x higher and shorter.
    misread = aisfx.embed(_tones_and_noise(16000)[:1], sample_rate=44100)
    assert torch.dist(at_16k, at_44k) < 0.1 * torch.dist(misread, at_44k)


def test_aisfx_classifier_gives_log_probabilities(aisfx):
    emb, logits = aisfx.embed_and_classify(_tones_and_noise(16000)[[0, 3]], sample_rate=16000)
    assert logits.shape == (2, 69) and emb.shape == (2, 512)
    torch.testing.assert_close(logits.exp().sum(1), torch.ones(2))
    assert kl_divergence(logits[:1], logits[1:]) > 0.1  # a tone and noise land in different classes


def test_aisfx_loads_only_its_own_safetensors(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        AisfxEmbedder(missing)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, str(other))
    with pytest.raises(CheckpointFormatError, match="convert_aisfx"):
        AisfxEmbedder(other)


# ------------------------------------------------------------------ contrastive text–audio model


def _paired(n: int, seed: int):
    """Audio and text embeddings that are two different noisy linear views of one latent."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.Generator().manual_seed(99)  # the same views for every split
    a_map, t_map = torch.randn(6, 40, generator=mix), torch.randn(6, 24, generator=mix)
    z = torch.randn(n, 6, generator=g)
    audio = z @ a_map + 0.3 * torch.randn(n, 40, generator=g) + 5.0  # offset: standardisation matters
    text = z @ t_map + 0.3 * torch.randn(n, 24, generator=g)
    return audio, text


def test_contrastive_projection_matches_held_out_pairs_far_above_chance(tmp_path):
    audio, text = _paired(256, seed=0)
    model = fit_text_audio_projection(audio, text, dim=16, steps=150, seed=0)
    test_audio, test_text = _paired(100, seed=1)
    acc = retrieval_accuracy(model, test_audio, test_text)
    assert acc["chance"] == pytest.approx(0.01)
    assert acc["audio_to_text"] > 0.3 and acc["text_to_audio"] > 0.3, acc
    paired = model.score(test_audio, test_text).mean()
    shuffled = model.score(test_audio, test_text.roll(1, dims=0)).mean()
    assert paired > shuffled + 0.5
    model.save(tmp_path / "proj.safetensors")
    loaded = TextAudioProjection.load(tmp_path / "proj.safetensors")
    torch.testing.assert_close(loaded.score(test_audio, test_text), model.score(test_audio, test_text))


def test_contrastive_projection_is_deterministic_from_its_seed():
    audio, text = _paired(64, seed=2)
    before = torch.random.get_rng_state()
    a = fit_text_audio_projection(audio, text, dim=8, steps=20, batch_size=16, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is untouched
    b = fit_text_audio_projection(audio, text, dim=8, steps=20, batch_size=16, seed=3)
    c = fit_text_audio_projection(audio, text, dim=8, steps=20, batch_size=16, seed=4)
    torch.testing.assert_close(a.audio_proj.weight, b.audio_proj.weight, rtol=0, atol=0)
    assert not torch.allclose(a.audio_proj.weight, c.audio_proj.weight)


def test_repeated_captions_count_as_matches():
    audio, text = _paired(6, seed=5)
    text = text[[0, 0, 1, 1, 2, 2]]  # three captions, each used for two clips
    keys = ["a", "a", "b", "b", "c", "c"]
    model = fit_text_audio_projection(audio, text, keys=keys, dim=4, steps=5, seed=0)
    assert retrieval_accuracy(model, audio, text, keys)["chance"] == pytest.approx(2 / 6)


# ------------------------------------------------------------------ attribute classifiers


def _attributes(n: int, seed: int):
    """Embeddings whose position along separate directions encodes three attributes."""
    rng = np.random.default_rng(seed)
    fixed = np.random.default_rng(7)
    values = {"family": ["instrument", "synth"], "register": ["low", "middle", "high"],
              "pattern": ["scale", "chord", "arpeggio", "single_note"]}
    centres = {a: fixed.standard_normal((len(v), 32)) * 3 for a, v in values.items()}
    labels = {a: [v[i] for i in rng.integers(len(v), size=n)] for a, v in values.items()}
    # "register" does not apply to synth sounds, as in the demo corpus (None, or NaN after Parquet).
    labels["register"] = [r if f == "instrument" else (None if i % 2 else float("nan"))
                          for i, (r, f) in enumerate(zip(labels["register"], labels["family"]))]
    emb = rng.standard_normal((n, 32))
    for a, v in values.items():
        for i, lab in enumerate(labels[a]):
            if isinstance(lab, str):
                emb[i] += centres[a][v.index(lab)]
    return torch.tensor(emb, dtype=torch.float32), labels


def test_attribute_classifiers_reach_well_above_chance_on_separable_embeddings(tmp_path):
    emb, labels = _attributes(400, seed=0)
    clf = fit_attribute_classifiers(emb, labels)
    test_emb, test_labels = _attributes(200, seed=1)
    scores = attribute_accuracy(clf, test_emb, test_labels)
    assert set(scores) == {"family", "register", "pattern"}
    for attr, s in scores.items():
        assert s["accuracy"] > 0.9 and s["chance"] < 0.6, (attr, s)
    n_instruments = sum(v == "instrument" for v in test_labels["family"])
    assert scores["register"]["n"] == n_instruments  # rows without a register are not scored
    assert scores["pattern"]["uniform_chance"] == pytest.approx(0.25)
    clf.save(tmp_path / "attr.safetensors")
    loaded = AttributeClassifiers.load(tmp_path / "attr.safetensors")
    assert attribute_accuracy(loaded, test_emb, test_labels) == scores


def test_attribute_chance_is_the_majority_baseline_and_unseen_classes_count_as_wrong():
    emb, labels = _attributes(100, seed=2)
    clf = fit_attribute_classifiers(emb, {"family": labels["family"]})
    majority = clf.majority["family"]
    noise = torch.zeros(4, 32)
    score = attribute_accuracy(clf, noise, {"family": [majority, majority, majority, "drone"]})["family"]
    assert score["chance"] == pytest.approx(0.75)
    assert score["accuracy"] <= 0.75  # "drone" was never seen: it cannot be predicted
