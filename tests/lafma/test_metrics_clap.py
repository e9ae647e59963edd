"""LAION-CLAP: checkpoints in the published layout load strictly, and audio meets text in 512-d.

The checkpoints here are built by the tests, key by key from the published layout (the
``state_dict`` of LAION-CLAP's ``CLAP`` module under ``module.``), with random weights: they
check the format and the plumbing (strict loading, shapes, preprocessing, errors), not the
numbers, which need the real reference weights. Where the architecture allows, the widths are
small (a tiny RoBERTa, an 8-wide HTS-AT, a narrow Cnn14); one HTS-AT is at the published
tiny size. The Swin pieces are also checked against direct definitions (masked full
attention, the chunk stacking) written here independently.
"""

import hashlib
import math
from pathlib import Path

import pytest
import torch

from lafma.metrics import clap_score
from lafma.metrics.embedders import (
    EMBEDDERS,
    AudioEmbedder,
    CheckpointFormatError,
    ClapModel,
    build_embedder,
)
from lafma.metrics.embedders.clap import CLIP_SAMPLES, fit_clip, quantize_int16
from lafma.metrics.embedders.htsat import HTSAT, HTSATConfig, SwinBlock, unstack_chunks

JOINT = 512


# Every test here runs with one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ published layouts


def _bn(prefix: str, c: int) -> dict:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def _ln(prefix: str, c: int) -> dict:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def _linear(prefix: str, n_out: int, n_in: int, bias: bool = True) -> dict:
    return {f"{prefix}.weight": (n_out, n_in)} | ({f"{prefix}.bias": (n_out,)} if bias else {})


def _front_end(n_fft: int = 1024, mels: int = 64) -> dict:
    bins = n_fft // 2 + 1
    return {"spectrogram_extractor.stft.conv_real.weight": (bins, 1, n_fft),
            "spectrogram_extractor.stft.conv_imag.weight": (bins, 1, n_fft),
            "logmel_extractor.melW": (bins, mels), **_bn("bn0", mels)}


def htsat_layout(embed=96, depths=(2, 2, 6, 2), heads=(4, 8, 16, 32), window=8, classes=527) -> dict:
    """``audio_branch.*`` of LAION-CLAP's HTS-AT (tiny by default): keys → shapes, buffers included."""
    layout = _front_end() | {"patch_embed.proj.weight": (embed, 1, 4, 4), "patch_embed.proj.bias": (embed,),
                             **_ln("patch_embed.norm", embed)}
    side = 64  # 256 / patch 4
    for i, (depth, h) in enumerate(zip(depths, heads, strict=True)):
        dim, w = embed * 2**i, min(window, side)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            layout |= {**_ln(f"{p}.norm1", dim), **_ln(f"{p}.norm2", dim),
                       f"{p}.attn.relative_position_bias_table": ((2 * w - 1) ** 2, h),
                       f"{p}.attn.relative_position_index": (w * w, w * w),
                       **_linear(f"{p}.attn.qkv", 3 * dim, dim), **_linear(f"{p}.attn.proj", dim, dim),
                       **_linear(f"{p}.mlp.fc1", 4 * dim, dim), **_linear(f"{p}.mlp.fc2", dim, 4 * dim)}
            if j % 2 and side > window:
                layout[f"{p}.attn_mask"] = ((side // w) ** 2, w * w, w * w)
        if i < len(depths) - 1:
            layout |= {**_ln(f"layers.{i}.downsample.norm", 4 * dim),
                       **_linear(f"layers.{i}.downsample.reduction", 2 * dim, 4 * dim, bias=False)}
            side //= 2
    width = embed * 2 ** (len(depths) - 1)
    return layout | {**_ln("norm", width), "tscam_conv.weight": (classes, width, 2, 3),
                     "tscam_conv.bias": (classes,), **_linear("head", classes, classes)}


def cnn14_layout(channels=(64, 128, 256, 512, 1024, 2048), classes=527) -> dict:
    """``audio_branch.*`` of LAION-CLAP's PANN-14 (published widths by default)."""
    layout, chans = _front_end(), [1, *channels]
    for i in range(6):
        layout |= {f"conv_block{i + 1}.conv1.weight": (chans[i + 1], chans[i], 3, 3),
                   f"conv_block{i + 1}.conv2.weight": (chans[i + 1], chans[i + 1], 3, 3),
                   **_bn(f"conv_block{i + 1}.bn1", chans[i + 1]), **_bn(f"conv_block{i + 1}.bn2", chans[i + 1])}
    return layout | _linear("fc1", chans[-1], chans[-1]) | _linear("fc_audioset", classes, chans[-1])


def _bias_index(w: int) -> torch.Tensor:
    """Bias-table row of every (query, key) pair in a w × w window, pair by pair."""
    out = torch.empty(w * w, w * w, dtype=torch.long)
    for a in range(w * w):
        for b in range(w * w):
            (ya, xa), (yb, xb) = divmod(a, w), divmod(b, w)
            out[a, b] = (ya - yb + w - 1) * (2 * w - 1) + (xa - xb + w - 1)
    return out


def _shift_mask(side: int, w: int) -> torch.Tensor:
    """The shifted-window mask, from its definition: a token of the rolled grid remembers where it came
    from; two tokens of one window may attend iff neither crossed the wrap-around seam apart."""
    s = w // 2
    origin = (torch.arange(side) + s) % side  # rolled position -> original position
    seg = (origin >= s).long() + (origin >= side - w + s).long()  # 0: wrapped in from the front
    seg = torch.where(origin < s, 3, seg)
    seg2 = seg[:, None] * 4 + seg[None, :]
    n = side // w
    win = seg2.view(n, w, n, w).permute(0, 2, 1, 3).reshape(n * n, w * w)
    return torch.where(win[:, :, None] == win[:, None, :], 0.0, -100.0)


def _random_state(layout: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(100)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith("relative_position_index"):
            state[k] = _bias_index(math.isqrt(shape[0]))
        elif k.endswith("attn_mask"):
            w = math.isqrt(shape[1])
            state[k] = _shift_mask(w * math.isqrt(shape[0]), w)
        elif k.endswith("melW"):
            state[k] = torch.rand(shape, generator=g) * 0.01
        elif k.endswith(("norm.weight", "norm1.weight", "norm2.weight", "bn0.weight")) or ".bn" in k:
            state[k] = torch.ones(shape)
        elif len(shape) <= 1:
            state[k] = 0.02 * torch.randn(shape, generator=g)
        else:  # He-style scale keeps activations finite through the deep stack
            fan_in = math.prod(shape[1:])
            state[k] = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
    return state


def _tiny_roberta(vocab: int, seed: int):
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                           intermediate_size=128, max_position_embeddings=80, type_vocab_size=1,
                           layer_norm_eps=1e-5, pad_token_id=1)
    return RobertaModel(config).eval()


@pytest.fixture(scope="module")
def text_parts():
    """Tiny RoBERTa (+ the byte-level ByT5 tokenizer, which needs no files), projections, scales."""
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer()
    with torch.random.fork_rng(devices=[]):
        text = _tiny_roberta(len(tokenizer), seed=0)
        g = torch.Generator().manual_seed(1)
        state = {f"text_branch.{k}": v for k, v in text.state_dict().items()}
        state["text_branch.embeddings.position_ids"] = torch.arange(80)[None]  # older transformers saved it
        state |= {"text_projection.0.weight": 0.1 * torch.randn(JOINT, 64, generator=g),
                  "text_projection.0.bias": torch.zeros(JOINT),
                  "text_projection.2.weight": torch.randn(JOINT, JOINT, generator=g) / JOINT**0.5,
                  "text_projection.2.bias": torch.zeros(JOINT)}
        for side in ("audio", "text"):
            for i in (0, 3):  # MLPLayers: Linear, ReLU, Dropout, Linear
                state |= {f"{side}_transform.sequential.{i}.weight": torch.zeros(JOINT, JOINT),
                          f"{side}_transform.sequential.{i}.bias": torch.zeros(JOINT)}
        state |= {"logit_scale_a": torch.tensor(math.log(1 / 0.07)), "logit_scale_t": torch.tensor(math.log(1 / 0.07))}
    return state, tokenizer, text


def _clap_state(text_state: dict, audio_layout: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed + 1)
    audio = {f"audio_branch.{k}": v for k, v in _random_state(audio_layout, seed).items()}
    width = (audio_layout["fc1.weight"] if "fc1.weight" in audio_layout else audio_layout["norm.weight"])[0]
    head = {"audio_projection.0.weight": torch.randn(JOINT, width, generator=g) / width**0.5,
            "audio_projection.0.bias": torch.zeros(JOINT),
            "audio_projection.2.weight": torch.randn(JOINT, JOINT, generator=g) / JOINT**0.5,
            "audio_projection.2.bias": torch.zeros(JOINT)}
    return audio | head | text_state


def _save(state: dict, path: Path) -> Path:
    torch.save({"epoch": 45, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path


SMALL_HTSAT = {"embed": 8, "depths": (2, 2, 2, 2), "heads": (1, 2, 2, 4)}


@pytest.fixture(scope="module")
def small_htsat_file(text_parts, tmp_path_factory):
    state = _clap_state(text_parts[0], htsat_layout(**SMALL_HTSAT), seed=2)
    return _save(state, tmp_path_factory.mktemp("clap") / "630k-audioset-best.pt")


def _noise(*shape, seed=3, scale=0.1):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ end to end


def test_htsat_tiny_at_published_size_embeds_audio_and_text_in_512_d(text_parts, big_dir):
    text_state, tokenizer, _ = text_parts
    path = _save(_clap_state(text_state, htsat_layout(), seed=4), big_dir / "630k-audioset-best.pt")
    clap = ClapModel(path, tokenizer=tokenizer)
    assert clap.name == "laion-clap-htsat" and clap.audio_branch_dim == 768 and clap.dim == JOINT
    assert clap.audio_branch.config == HTSATConfig()  # the shapes imply HTSAT-tiny's settings
    assert clap.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    captions = ["a dog barks twice", "rain on a tin roof"]
    tone = 0.5 * torch.sin(2 * math.pi * 440 * torch.arange(CLIP_SAMPLES) / 48000)
    wave = torch.stack([_noise(CLIP_SAMPLES), tone])
    a = clap.embed_audio(wave, 48000)
    t = clap.embed_text(captions)
    assert a.shape == t.shape == (2, JOINT) and torch.isfinite(a).all()
    assert not torch.allclose(a[0], a[1], atol=1e-3)  # noise and a tone embed apart
    torch.testing.assert_close(a.norm(dim=1), torch.ones(2))
    assert -1 <= clap_score(t, a) <= 1
    assert clap_score(a, a) == pytest.approx(1.0, abs=1e-6) and clap_score(t, t) == pytest.approx(1.0, abs=1e-6)
    feats = clap.audio_features(wave, 48000)
    assert feats.shape == (2, 768)
    torch.testing.assert_close(clap.project_audio(feats), a)


def test_small_htsat_text_tower_is_roberta_pooler_through_the_projection(small_htsat_file, text_parts):
    state, tokenizer, text = text_parts
    clap = ClapModel(small_htsat_file, tokenizer=tokenizer)
    captions = ["a dog barks twice", "rain on a tin roof"]
    tok = tokenizer(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        pooled = text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
        proj = torch.relu(pooled @ state["text_projection.0.weight"].T + state["text_projection.0.bias"])
        proj = proj @ state["text_projection.2.weight"].T + state["text_projection.2.bias"]
    torch.testing.assert_close(clap.embed_text(captions), torch.nn.functional.normalize(proj, dim=-1))


def test_audio_is_fitted_to_10_s_at_48_khz_as_laion_clap_does(small_htsat_file):
    clap = ClapModel(small_htsat_file)
    short = _noise(4 * 48000, seed=5)  # 4 s: tiled twice, then 2 s of zeros
    fitted = fit_clip(short)
    assert fitted.shape == (CLIP_SAMPLES,)
    torch.testing.assert_close(fitted[: 8 * 48000], short.repeat(2))
    assert (fitted[8 * 48000:] == 0).all()
    long = _noise(12 * 48000, seed=6)  # 12 s: one random 10 s window, reproducible with a generator
    a = fit_clip(long, generator=torch.Generator().manual_seed(0))
    assert a.shape == (CLIP_SAMPLES,) and torch.equal(a, fit_clip(long, generator=torch.Generator().manual_seed(0)))
    start = int(torch.nonzero(long == a[0])[0])
    torch.testing.assert_close(long[start:start + CLIP_SAMPLES], a)
    # 16-bit round trip: clipped to ±1, truncated to a multiple of 1/32767.
    q = quantize_int16(torch.tensor([2.0, -0.5, 1e-6]))
    torch.testing.assert_close(q, torch.tensor([1.0, -16383 / 32767, 0.0]))
    # Clips of different lengths in one batch; each is the embedding of its fitted 10 s.
    emb = clap.embed_audio([short, long[:CLIP_SAMPLES]], sample_rate=48000)
    assert emb.shape == (2, JOINT)
    torch.testing.assert_close(emb[:1], clap.embed_audio(fitted, 48000), rtol=1e-4, atol=1e-5)
    # Another rate is resampled to 48 kHz first: 10 s at 16 kHz fills the clip exactly.
    assert clap.prepare_audio(_noise(1, 160000), sample_rate=16000).shape == (1, CLIP_SAMPLES)
    with pytest.raises(ValueError, match="NaN"):
        clap.embed_audio(torch.full((1, 1000), float("nan")))


def test_pann14_checkpoint_embeds_audio_through_the_cnn14_branch(text_parts, tmp_path):
    channels = (4, 8, 8, 16, 16, 32)
    path = _save(_clap_state(text_parts[0], cnn14_layout(channels), seed=7), tmp_path / "pann14.pt")
    clap = ClapModel(path, tokenizer=text_parts[1])
    assert clap.name == "laion-clap-pann" and clap.audio_branch_dim == 32
    assert clap.audio_branch.logmel_extractor.melW.shape == (513, 64)  # 1024-point window at 48 kHz
    a = clap.embed_audio(_noise(2, 3 * 48000), 48000)
    assert a.shape == (2, JOINT) and torch.isfinite(a).all()
    assert -1 <= clap_score(clap.embed_text(["a", "b"]), a) <= 1


def test_the_clap_embedder_is_the_audio_tower_behind_the_embedder_interface(small_htsat_file):
    """``evaluate.embedder: clap``: built by name from a published-layout checkpoint, no text tower."""
    assert "clap" in EMBEDDERS
    emb = build_embedder("clap", small_htsat_file)
    assert isinstance(emb, AudioEmbedder) and emb.clap.text_branch is None
    assert emb.describe() == {"embedder": "laion-clap-htsat", "embedder_sha256": ClapModel(small_htsat_file).weights_sha256,
                              "embedder_dim": JOINT, "embedder_classes": 0}
    waves = torch.stack([_noise(12 * 16000, seed=11), _noise(12 * 16000, seed=12)])  # 12 s at 16 kHz: cut to 10 s
    e = emb.embed(waves, 16000)
    assert e.shape == (2, JOINT) and emb.fd_features(waves, 16000).shape == (2, JOINT)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2))
    # The same 10 s LAION-CLAP would embed with this window, and the same alone as in a batch.
    want = emb.clap.embed_audio(waves[:1], 16000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(e[:1], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(emb.embed(waves[1], 16000), e[1:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="without its text tower"):
        emb.clap.embed_text_ids(torch.zeros(1, 77, dtype=torch.long), torch.ones(1, 77, dtype=torch.long))


# ------------------------------------------------------------------ refusals


def test_a_wrong_audio_key_or_shape_is_named(text_parts, tmp_path):
    state = _clap_state(text_parts[0], htsat_layout(**SMALL_HTSAT), seed=8)
    renamed = dict(state)
    renamed["audio_branch.layers.1.blocks.0.attn.qkvs.weight"] = renamed.pop("audio_branch.layers.1.blocks.0.attn.qkv.weight")
    with pytest.raises(CheckpointFormatError, match="layers.1.blocks.0.attn.qkv.weight") as err:
        ClapModel(_save(renamed, tmp_path / "renamed.pt"))
    assert err.value.missing == ["layers.1.blocks.0.attn.qkv.weight"]
    assert err.value.unexpected == ["layers.1.blocks.0.attn.qkvs.weight"]
    assert "audio_branch (HTS-AT)" in str(err.value)

    narrow = dict(state)
    narrow["audio_projection.0.weight"] = torch.zeros(JOINT, 32)  # the branch gives 64-d embeddings
    with pytest.raises(CheckpointFormatError, match=r"audio_projection.0.weight: file \(512, 32\)"):
        ClapModel(_save(narrow, tmp_path / "narrow.pt"))

    no_mask = {k: v for k, v in state.items() if not k.endswith("layers.0.blocks.1.attn_mask")}
    with pytest.raises(CheckpointFormatError, match="layers.0.blocks.1.attn_mask"):
        ClapModel(_save(no_mask, tmp_path / "no_mask.pt"))

    bad_index = dict(state)
    bad_index["audio_branch.layers.2.blocks.0.attn.relative_position_index"] = torch.zeros(64, 64, dtype=torch.long)
    with pytest.raises(CheckpointFormatError, match="derived buffers"):
        ClapModel(_save(bad_index, tmp_path / "bad_index.pt"))


def test_a_fusion_checkpoint_is_refused_by_name(text_parts, tmp_path):
    state = _clap_state(text_parts[0], htsat_layout(**SMALL_HTSAT), seed=9)
    # aff_2d fusion (LAION-CLAP's enable_fusion=True): a conv over the local crops and an AFF module.
    state["audio_branch.patch_embed.mel_conv2d.weight"] = torch.zeros(8, 1, 4, 12)
    state["audio_branch.patch_embed.mel_conv2d.bias"] = torch.zeros(8)
    state["audio_branch.patch_embed.fusion_model.local_att.0.weight"] = torch.zeros(2, 8, 1, 1)
    with pytest.raises(NotImplementedError, match="feature-fusion.*630k-audioset-best.pt"):
        ClapModel(_save(state, tmp_path / "630k-audioset-fusion-best.pt"))


# ------------------------------------------------------------------ the Swin pieces


@pytest.mark.parametrize("shift", [0, 4])
def test_window_attention_is_masked_full_attention_over_the_window_groups(shift):
    """Windows of 8 on a 16 × 16 grid, shifted by 4: each token attends exactly to its group, the
    tiles cut at offsets shift + 8k (no wrap-around), with the bias of its true displacement."""
    side, w, dim, heads = 16, 8, 8, 2
    torch.manual_seed(10)
    block = SwinBlock(dim, side, heads, w, shift, mlp_ratio=2.0).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
        block.mlp.fc2.weight.zero_()
        block.mlp.fc2.bias.zero_()  # the output is then x + attention alone
    x = torch.randn(2, side * side, dim)
    with torch.no_grad():
        got = block(x) - x
        y = block.norm1(x)
        q, k, v = block.attn.qkv(y).view(2, side * side, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        pos = torch.arange(side)
        group = (pos - shift).div(w, rounding_mode="floor")  # tile index along one axis
        ys, xs = pos.repeat_interleave(side), pos.repeat(side)  # row-major coordinates
        same = (group[ys][:, None] == group[ys][None, :]) & (group[xs][:, None] == group[xs][None, :])
        rows = (ys[:, None] - ys[None, :] + w - 1) * (2 * w - 1) + (xs[:, None] - xs[None, :] + w - 1)
        bias = block.attn.relative_position_bias_table[rows.clamp(0, (2 * w - 1) ** 2 - 1)].permute(2, 0, 1)
        logits = q @ k.transpose(-2, -1) * (dim // heads) ** -0.5 + bias
        attn = logits.masked_fill(~same, float("-inf")).softmax(-1) @ v
        want = block.attn.proj(attn.transpose(1, 2).reshape(2, side * side, dim))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_to_image_and_unstack_chunks_keep_time_in_order():
    """A log-mel whose value is its frame index, stacked into the image, pooled 32× as the network
    downsamples and put back by the head, reads as 32 increasing time steps in every frequency row."""
    with torch.device("meta"):
        net = HTSAT(init_frontend=False)
    frames = torch.arange(1024.0)[None, None, :, None].expand(1, 1, 1024, 64)  # (B, 1, T, M)
    image = net.to_image(frames)
    assert image.shape == (1, 1, 256, 256)
    assert torch.equal(image[0, 0, :64, :], torch.arange(256.0).expand(64, 256))  # chunk 0 on top
    assert torch.equal(image[0, 0, 192:, 0], torch.full((64,), 768.0))  # chunk 3 at the bottom
    pooled = torch.nn.functional.avg_pool2d(image, 32)  # (1, 1, 8, 8), as after the four stages
    tokens = pooled.flatten(2).transpose(1, 2)  # (1, 64, 1) row-major tokens
    out = unstack_chunks(tokens, freq_ratio=4)
    assert out.shape == (1, 1, 2, 32)
    assert torch.equal(out[0, 0, 0], out[0, 0, 1]) and (out[0, 0, 0].diff() > 0).all()
    # 1001 frames (10 s at 480 hop) are stretched to 1024 along time only.
    stretched = net.to_image(torch.linspace(0, 1, 1001)[None, None, :, None].expand(1, 1, 1001, 64))
    assert stretched[0, 0, 0, 0] == 0 and stretched[0, 0, 255, 255] == pytest.approx(1.0)
