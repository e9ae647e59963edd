import pytest
import torch

from lafma.config import TextConfig
from lafma.text import build_text_encoder, minilm_encoder, t5_encoder, tiny_t5_encoder


@pytest.fixture(scope="module")
def tiny():
    return tiny_t5_encoder(dim=32, layers=2, seed=0, max_length=16)


def test_shapes_mask_and_zeroed_padding(tiny):
    emb, mask = tiny(["a dog barks", "rain", ""])
    assert emb.shape[0] == 3 and emb.shape[2] == 32 and mask.shape == emb.shape[:2]
    assert mask.dtype == torch.bool
    assert mask.sum(1).tolist()[2] >= 1  # the empty caption still has its end token
    assert (emb[~mask] == 0).all()
    assert emb[mask].abs().sum() > 0


def test_batching_does_not_change_a_caption_embedding(tiny):
    alone, m = tiny(["rain"])
    batched, bm = tiny(["rain", "a much longer caption about a dog barking twice"])
    n = int(m.sum())
    torch.testing.assert_close(batched[0, :n], alone[0, :n], atol=1e-5, rtol=1e-5)
    assert int(bm[0].sum()) == n


def test_long_captions_are_truncated_not_fatal(tiny):
    emb, mask = tiny(["word " * 500])
    assert emb.shape[1] == 16 and mask.all()


def test_tiny_encoder_is_deterministic_from_its_seed():
    a = tiny_t5_encoder(seed=3)(["hello"])[0]
    b = tiny_t5_encoder(seed=3)(["hello"])[0]
    c = tiny_t5_encoder(seed=4)(["hello"])[0]
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3


def test_a_single_string_is_refused(tiny):
    with pytest.raises(TypeError):
        tiny("a dog barks")


def test_t5_loads_from_a_local_directory(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = build_text_encoder(TextConfig(kind="t5", name_or_path=str(tmp_path), max_length=16))
    assert loaded.dim == 32
    torch.testing.assert_close(loaded(["a dog barks"])[0], tiny(["a dog barks"])[0])


def test_missing_t5_directory_fails_clearly(tmp_path):
    with pytest.raises(OSError):
        t5_encoder(str(tmp_path / "no-such-model"))


def test_offline_minilm_embeds_meaning():
    enc = minilm_encoder()
    assert enc.dim == 384
    emb, mask = enc(["a dog barks", "a dog is barking loudly", "a violin plays a slow melody", ""])
    pooled = (emb * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # mean over real tokens
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    same, different = pooled[0] @ pooled[1], pooled[0] @ pooled[2]
    assert same > different + 0.2, (same, different)


def test_a_local_encoder_directory_states_its_own_width(tmp_path):
    """No guess by name: a local model directory's config.json says how wide it is."""
    (tmp_path / "config.json").write_text('{"model_type": "t5", "d_model": 48}')
    assert TextConfig(kind="t5", name_or_path=str(tmp_path)).dim == 48
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 96}')
    assert TextConfig(kind="minilm", name_or_path=str(tmp_path)).dim == 96
    assert TextConfig(kind="t5", name_or_path="google/flan-t5-base").dim == 768


def test_layers_concatenate_the_chosen_hidden_states(tiny):
    """``layers`` = (0, -1): each token is its input embedding, then its last layer's state."""
    both = tiny_t5_encoder(dim=32, layers=2, seed=0, max_length=16, hidden_layers=(0, -1))
    assert both.dim == 64 and TextConfig(kind="tiny_t5", tiny_dim=32, layers=(0, -1)).dim == 64
    captions = ["a dog barks", "rain", ""]
    last, mask = tiny(captions)
    emb, both_mask = both(captions)
    assert torch.equal(both_mask, mask) and emb.shape == (*last.shape[:2], 64)
    torch.testing.assert_close(emb[..., 32:], last)  # the last layer, as the default gives it
    ids = tiny.tokenizer(captions, padding=True, return_tensors="pt")["input_ids"]
    words = tiny.model.get_input_embeddings()(ids) * mask[..., None]  # the input embedding layer
    torch.testing.assert_close(emb[..., :32], words)
    assert (emb[~mask] == 0).all()
    # The unconditional input of the released sampler carries the same layers.
    assert both.padded_empty(5)[0].shape == (1, 5, 64)
    with pytest.raises(ValueError, match="at least one"):
        tiny_t5_encoder(hidden_layers=())


def test_minilm_input_layer_tells_antonyms_apart_where_its_last_layer_hardly_does():
    """Why the demo conditions on MiniLM's input and last layers: its last layer, trained for
    sentence similarity, maps "fast" and "slow" captions of one sound to nearly the same
    vector, the tempo the demo's captions ask for; the input layer keeps the words apart."""
    enc = minilm_encoder(layers=(0, -1))
    emb, mask = enc(["soft fast ticking", "soft slow ticking"])
    pooled = (emb * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (2, 768)
    cos = [float(torch.nn.functional.cosine_similarity(pooled[0, s], pooled[1, s], dim=0))
           for s in (slice(0, 384), slice(384, 768))]
    assert cos[1] > 0.95 and cos[0] < cos[1] - 0.05, cos
