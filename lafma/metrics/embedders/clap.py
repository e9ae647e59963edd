"""LAION-CLAP from a user-supplied checkpoint: layout validation, audio and text towers, projections.

A published LAION-CLAP checkpoint (``630k-audioset-best.pt`` and its siblings) is a dict
whose ``"state_dict"`` holds, under a ``module.`` prefix (it was saved from DDP):

* ``audio_branch.*``: the audio encoder, HTS-AT (a Swin transformer over log-mels) for the
  published checkpoints, or PANNs Cnn14 for some early ones;
* ``text_branch.*``: a RoBERTa-base encoder in Hugging Face naming;
* ``audio_projection.{0,2}.*`` and ``text_projection.{0,2}.*``: Linear → ReLU → Linear heads
  into the 512-d joint space; ``audio_transform`` / ``text_transform``: training-only MLPs;
* ``logit_scale_a``, ``logit_scale_t``: learnt temperatures.

What is implemented: the full layout check (every group, the projection shapes, the encoder
type), both audio towers rebuilt in lafma and loaded strictly from ``audio_branch.*``
(HTS-AT, :mod:`lafma.metrics.embedders.htsat`, for ``amodel="HTSAT-tiny"``/``"HTSAT-base"``;
Cnn14, :mod:`lafma.metrics.embedders.panns`, for ``amodel="PANN-14"``), LAION-CLAP's audio
preprocessing at 48 kHz, the text tower (RoBERTa rebuilt by ``transformers`` from the
checkpoint's own shapes, with a tokenizer the user supplies from a local directory, since no
hub is reachable), and both projection heads. The audio side is the ``clap`` embedder of the
evaluation (:class:`ClapEmbedder`, which does not build the text tower). What is not
implemented: feature-fusion checkpoints
(``630k-fusion-best.pt``, ``630k-audioset-fusion-best.pt``), whose audio branch adds a second
convolutional path over three local 10 s crops; they are refused by name.

Audio preprocessing, as LAION-CLAP's ``get_audio_embedding_from_data`` does it for a
non-fusion model: resample to 48 kHz, quantise to 16 bits, then fit to exactly 10 s
(480 000 samples): shorter clips are tiled whole as many times as fit and zero-padded
(``data_filling="repeatpad"``), longer ones cut to a random 10 s window
(``data_truncating="rand_trunc"``). The encoder's ``embedding`` output goes through
``audio_projection`` and is L2-normalised.

Both audio towers were compared once, out of tree, with the modules of the ``laion_clap``
1.1.7 wheel (HTS-AT tiny and PANN-14 at 48 kHz, random weights and BatchNorm statistics): the
reference ``state_dict`` loads strictly and the ``embedding`` outputs agree exactly. The
test suite cannot repeat that (the reference is not a dependency); it checks format and
plumbing on files built in the published layout. Scores with the real weights have not been
compared with published numbers here. Resampling uses resampy's ``kaiser_best`` filter;
``librosa.load`` in recent librosa uses soxr, which differs slightly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lafma.metrics.embedders.base import AudioEmbedder, resample_hq
from lafma.metrics.embedders.checkpoints import (
    CheckpointFormatError,
    check_state_dict,
    load_checked,
    load_torch_file,
    require_file,
    sha256_file,
)
from lafma.metrics.embedders.htsat import HTSAT, HTSATConfig, mismatched_buffers
from lafma.metrics.embedders.panns import Cnn14, Cnn14Preset

LAYOUT = "LAION-CLAP"
CONTEXT_LENGTH = 77  # CLAP tokenises every caption to exactly 77 tokens
_GROUPS = ("audio_branch.", "text_branch.", "audio_projection.", "text_projection.",
           "audio_transform.", "text_transform.")
_SCALARS = ("logit_scale_a", "logit_scale_t")
# A few keys every encoder of each kind has: enough to say which one the file holds.
_AUDIO_KINDS = {
    "htsat": ("audio_branch.patch_embed.proj.weight", "audio_branch.layers.0.blocks.0.attn.qkv.weight",
              "audio_branch.norm.weight", "audio_branch.tscam_conv.weight",
              "audio_branch.logmel_extractor.melW"),
    "pann": ("audio_branch.conv_block1.conv1.weight", "audio_branch.fc1.weight",
             "audio_branch.logmel_extractor.melW"),
}
_TEXT_KEYS = ("text_branch.embeddings.word_embeddings.weight", "text_branch.embeddings.position_embeddings.weight",
              "text_branch.encoder.layer.0.attention.self.query.weight", "text_branch.pooler.dense.weight")
_HEAD_DIM = 64  # RoBERTa's attention head width: heads = hidden / 64 (12 for roberta-base)
# LAION-CLAP's audio settings (model_configs/{HTSAT-tiny,PANN-14}.json, audio_cfg): 48 kHz,
# 1024-point window, 480 hop (10 ms), 64 mel bins over 50-14000 Hz, 10 s clips.
SAMPLE_RATE = 48000
CLIP_SAMPLES = 480000
_FRONT_END = {"sample_rate": SAMPLE_RATE, "hop_size": 480, "fmin": 50.0, "fmax": 14000.0}
# Keys only a feature-fusion audio branch has (its local-crop convolution and fusion module).
_FUSION_PARTS = ("fusion_model", "mel_conv1d", "mel_conv2d")


def read_clap_state(path: str | os.PathLike) -> tuple[dict[str, Tensor], str]:
    """Load and validate a LAION-CLAP checkpoint.

    Returns:
        ``(state, audio_kind)``: the state dict without its ``module.`` prefix, and
        ``"htsat"`` or ``"pann"``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointFormatError: a group, a key or a shape of the published layout is missing
            or wrong (the message names them).
    """
    path = require_file(path, LAYOUT)
    raw: Any = load_torch_file(path)
    if isinstance(raw, Mapping) and "state_dict" in raw:
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise CheckpointFormatError(path, LAYOUT, detail=f"file holds a {type(raw).__name__}, not a state dict")
    state = {re.sub(r"^module\.", "", k): v for k, v in raw.items()}
    missing = [g + "*" for g in _GROUPS if not any(k.startswith(g) for k in state)]
    missing += [k for k in (*_SCALARS, *_TEXT_KEYS) if k not in state]
    kinds = [kind for kind, keys in _AUDIO_KINDS.items() if all(k in state for k in keys)]
    if not kinds:
        missing += [k for k in _AUDIO_KINDS["htsat"] if k not in state]
    unexpected = [k for k in state if not k.startswith(_GROUPS) and k not in _SCALARS]
    if missing or unexpected:
        raise CheckpointFormatError(path, LAYOUT, missing=missing, unexpected=unexpected)
    expected = {}
    for side in ("audio", "text"):
        w0 = state.get(f"{side}_projection.0.weight")
        joint, width = tuple(w0.shape) if w0 is not None and w0.dim() == 2 else (512, 768)
        expected |= {f"{side}_projection.0.weight": (joint, width), f"{side}_projection.0.bias": (joint,),
                     f"{side}_projection.2.weight": (joint, joint), f"{side}_projection.2.bias": (joint,)}
    expected |= dict.fromkeys(_SCALARS, ())
    heads = {k: v for k, v in state.items() if k.startswith(("audio_projection.", "text_projection.")) or k in _SCALARS}
    check_state_dict(heads, expected, path, LAYOUT)
    if expected["audio_projection.2.weight"] != expected["text_projection.2.weight"]:
        raise CheckpointFormatError(path, LAYOUT, detail="audio and text projections reach different joint widths")
    text_width = state["text_branch.embeddings.word_embeddings.weight"].shape[1]
    if expected["text_projection.0.weight"][1] != text_width:
        raise CheckpointFormatError(path, LAYOUT, mismatched={
            "text_projection.0.weight": (tuple(state["text_projection.0.weight"].shape),
                                         (expected["text_projection.0.weight"][0], text_width))})
    return {k: torch.as_tensor(v) for k, v in state.items()}, kinds[0]


def _projection(state: Mapping[str, Tensor], side: str) -> nn.Sequential:
    w0, w2 = state[f"{side}_projection.0.weight"], state[f"{side}_projection.2.weight"]
    head = nn.Sequential(nn.Linear(w0.shape[1], w0.shape[0]), nn.ReLU(), nn.Linear(w2.shape[1], w2.shape[0]))
    head.load_state_dict({k.removeprefix(f"{side}_projection."): v for k, v in state.items()
                          if k.startswith(f"{side}_projection.")}, strict=True)
    return head


def _roberta(state: Mapping[str, Tensor], path: os.PathLike, num_heads: int | None) -> nn.Module:
    """A RoBERTa encoder shaped by the checkpoint itself, loaded strictly from ``text_branch.*``."""
    from transformers import RobertaConfig, RobertaModel

    sub = {k.removeprefix("text_branch."): v for k, v in state.items() if k.startswith("text_branch.")}
    # Older transformers saved position_ids as a buffer; it is derived, not learnt.
    sub.pop("embeddings.position_ids", None)
    vocab, hidden = sub["embeddings.word_embeddings.weight"].shape
    layers = len({k.split(".")[2] for k in sub if k.startswith("encoder.layer.")})
    config = RobertaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=num_heads or max(hidden // _HEAD_DIM, 1),
        intermediate_size=sub["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=sub["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=sub["embeddings.token_type_embeddings.weight"].shape[0]
        if "embeddings.token_type_embeddings.weight" in sub else 1,
        layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    model = RobertaModel(config, add_pooling_layer=True)
    own = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    check_state_dict(sub, own, path, f"{LAYOUT} text_branch (RoBERTa)")
    model.load_state_dict(sub, strict=False)  # only the derived position_ids buffer is left out
    return model.eval().requires_grad_(False)


def _audio_branch(state: Mapping[str, Tensor], kind: str, path: os.PathLike) -> nn.Module:
    """The audio encoder of ``kind``, shaped by the checkpoint and loaded strictly from ``audio_branch.*``."""
    sub = {k.removeprefix("audio_branch."): v for k, v in state.items() if k.startswith("audio_branch.")}
    fusion = sorted(k for k in sub if any(part.startswith(_FUSION_PARTS) for part in k.split(".")))
    if fusion:
        raise NotImplementedError(
            f"{os.fspath(path)}: a feature-fusion LAION-CLAP checkpoint (audio_branch.{fusion[0]} and "
            f"{len(fusion) - 1} more fusion keys): lafma implements only the non-fusion models; use "
            "630k-audioset-best.pt or 630k-best.pt")
    layout = f"{LAYOUT} audio_branch ({'HTS-AT' if kind == 'htsat' else 'PANNs Cnn14'})"
    try:
        if kind == "htsat":
            config = HTSATConfig.from_state(sub, **_FRONT_END)
        else:
            n_fft = 2 * (sub["logmel_extractor.melW"].shape[0] - 1)
            preset = Cnn14Preset(window_size=n_fft, mel_bins=sub["bn0.weight"].shape[0],
                                 classes=sub["fc_audioset.weight"].shape[0], **_FRONT_END)
            channels = [sub[f"conv_block{i}.conv1.weight"].shape[0] for i in range(1, 7)]
    except KeyError as err:  # a key the network's shape is read from is absent
        raise CheckpointFormatError(path, layout, missing=[f"audio_branch.{err.args[0]}"]) from err
    except IndexError as err:  # such a key has too few dimensions
        raise CheckpointFormatError(path, layout, detail=f"malformed parameter shapes ({err})") from err
    with torch.device("meta"):  # every tensor comes from the file
        net = HTSAT(config, init_frontend=False) if kind == "htsat" else \
            Cnn14(preset, init_frontend=False, channels=channels)
    load_checked(net, sub, path, layout)
    if kind == "htsat" and (wrong := mismatched_buffers(sub, config)):
        raise CheckpointFormatError(path, layout, detail=f"derived buffers {wrong} differ from the "
                                    f"window geometry (window {config.window}) the shapes imply")
    return net.eval().requires_grad_(False)


def fit_clip(wave: Tensor, length: int = CLIP_SAMPLES, generator: torch.Generator | None = None) -> Tensor:
    """(N,) → (length,): LAION-CLAP's ``repeatpad`` for short clips, ``rand_trunc`` for long ones.

    A short clip is tiled whole ``length // N`` times, then zero-padded; a long one is cut to a
    uniformly random window (``generator`` makes the choice reproducible).
    """
    n = wave.shape[-1]
    if n > length:
        start = int(torch.randint(0, n - length + 1, (1,), generator=generator))
        return wave[start:start + length]
    if n < length:
        wave = wave.repeat(length // n)
        wave = nn.functional.pad(wave, (0, length - wave.shape[-1]))
    return wave


def quantize_int16(wave: Tensor) -> Tensor:
    """Round-trip through 16-bit PCM as LAION-CLAP does before embedding: clip to ±1, truncate."""
    return (wave.clamp(-1.0, 1.0) * 32767.0).to(torch.int16).float() / 32767.0


class ClapModel(nn.Module):
    """LAION-CLAP for scoring: audio tower, text tower, projections, temperatures.

    Args:
        checkpoint: a ``630k-audioset-best.pt``-style file (HTS-AT or PANN-14, non-fusion).
        tokenizer: a Hugging Face tokenizer object, or a local directory holding the
            ``roberta-base`` tokenizer files; ``None`` leaves :meth:`embed_text` unusable
            (:meth:`embed_text_ids` still works).
        num_heads: attention heads of the text encoder when not ``hidden / 64``.
        text: build the text tower (RoBERTa-base, 125 M parameters); without it only the
            audio side works (:class:`ClapEmbedder`). Its layout is checked either way.

    Raises:
        CheckpointFormatError: the file is not in the published layout (names the keys).
        NotImplementedError: a feature-fusion checkpoint.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, checkpoint: str | os.PathLike, tokenizer: Any = None, num_heads: int | None = None,
                 text: bool = True):
        super().__init__()
        path = require_file(checkpoint, LAYOUT)
        state, self.audio_kind = read_clap_state(path)
        self.audio_branch = _audio_branch(state, self.audio_kind, path)
        width = state["audio_projection.0.weight"].shape[1]
        if width != self.audio_branch_dim:
            raise CheckpointFormatError(path, LAYOUT, mismatched={"audio_projection.0.weight": (
                tuple(state["audio_projection.0.weight"].shape),
                (state["audio_projection.0.weight"].shape[0], self.audio_branch_dim))})
        self.audio_projection = _projection(state, "audio").eval().requires_grad_(False)
        self.text_projection = _projection(state, "text").eval().requires_grad_(False)
        self.register_buffer("logit_scale_a", state["logit_scale_a"].float().reshape(()))
        self.register_buffer("logit_scale_t", state["logit_scale_t"].float().reshape(()))
        self.text_branch = _roberta(state, path, num_heads) if text else None
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer), local_files_only=True)
        self.tokenizer = tokenizer
        self.name = f"laion-clap-{self.audio_kind}"
        self.weights_sha256 = sha256_file(path)
        self.dim = self.audio_projection[2].out_features

    @property
    def audio_branch_dim(self) -> int:
        """Width of the audio encoder's embedding (768 for HTS-AT tiny, 2048 for Cnn14)."""
        branch = self.audio_branch
        return branch.config.num_features if isinstance(branch, HTSAT) else branch.dim

    @torch.no_grad()
    def embed_text_ids(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids (B, L) → unit-norm joint embeddings (B, 512), via RoBERTa's pooler output."""
        if self.text_branch is None:
            raise ValueError(f"{self.name} was built without its text tower (text=False)")
        pooled = self.text_branch(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return nn.functional.normalize(self.text_projection(pooled), dim=-1)

    @torch.no_grad()
    def embed_text(self, captions: Sequence[str]) -> Tensor:
        """Captions → unit-norm joint embeddings (B, 512), tokenised to 77 tokens as CLAP does."""
        if self.tokenizer is None:
            raise ValueError("ClapModel was built without a tokenizer: pass the local directory of "
                             "the roberta-base tokenizer")
        tok = self.tokenizer(list(captions), padding="max_length", truncation=True,
                             max_length=CONTEXT_LENGTH, return_tensors="pt")
        device = self.logit_scale_a.device
        return self.embed_text_ids(tok["input_ids"].to(device), tok["attention_mask"].to(device))

    @torch.no_grad()
    def project_audio(self, features: Tensor) -> Tensor:
        """Audio-encoder outputs (B, 768 for HTS-AT tiny) → unit-norm joint embeddings (B, 512)."""
        return nn.functional.normalize(self.audio_projection(features), dim=-1)

    def prepare_audio(self, wave: Tensor | Sequence[Tensor], sample_rate: int | None = None,
                      generator: torch.Generator | None = None, quantize: bool = True) -> Tensor:
        """Waveforms → the encoder's input (B, 480000): 48 kHz, 16-bit, exactly 10 s.

        Args:
            wave: (B, N), (N,), or a sequence of (N_i,) clips of different lengths.
            sample_rate: rate of ``wave``; 48 kHz when ``None``. Other rates are resampled
                with :func:`~lafma.metrics.embedders.base.resample_hq` (librosa's Kaiser filter).
            generator: picks the 10 s window of clips longer than 10 s.
            quantize: the 16-bit round trip LAION-CLAP applies to numpy input.
        """
        sr = SAMPLE_RATE if sample_rate is None else int(sample_rate)
        if sr <= 0:
            raise ValueError(f"{self.name}: sample rate must be positive, got {sr}")
        if isinstance(wave, Tensor):
            wave = wave.unsqueeze(0) if wave.dim() == 1 else wave
            if wave.dim() != 2:
                raise ValueError(f"{self.name}: expected waveforms (B, N) or (N,), got shape {tuple(wave.shape)}")
        clips = []
        for clip in wave:
            x = torch.as_tensor(clip, dtype=torch.float32, device=self.logit_scale_a.device)
            if x.dim() != 1 or x.numel() == 0:
                raise ValueError(f"{self.name}: each clip must be a non-empty (N,) waveform, got {tuple(x.shape)}")
            if not torch.isfinite(x).all():
                raise ValueError(f"{self.name}: waveform contains NaN or Inf")
            x = resample_hq(x, sr, SAMPLE_RATE)
            clips.append(fit_clip(quantize_int16(x) if quantize else x, CLIP_SAMPLES, generator))
        return torch.stack(clips)

    @torch.no_grad()
    def audio_features(self, wave: Tensor | Sequence[Tensor], sample_rate: int | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
        """The audio encoder's ``embedding`` output before projection: (B, 768) for HTS-AT tiny."""
        return self.audio_branch(self.prepare_audio(wave, sample_rate, generator))[0]

    @torch.no_grad()
    def embed_audio(self, wave: Tensor | Sequence[Tensor], sample_rate: int | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
        """Waveforms → unit-norm joint embeddings (B, 512), comparable with :meth:`embed_text`.

        See :meth:`prepare_audio` for the arguments; pass a seeded ``generator`` for
        reproducible scores of clips longer than 10 s.
        """
        return self.project_audio(self.audio_features(wave, sample_rate, generator))


class ClapEmbedder(AudioEmbedder):
    """LAION-CLAP's audio tower as an :class:`AudioEmbedder` (``evaluate.embedder: clap``): one
    unit-norm joint-space vector (512-d) per clip, LAION-CLAP's preprocessing included.

    A clip longer than 10 s is cut to one window, as LAION-CLAP does, but each clip draws its
    window from a generator seeded afresh (``crop_seed``), so a clip embeds the same whatever
    batch it is in and on every run. No classifier head: LAION-CLAP's loss is contrastive only,
    so the tagging head a checkpoint carries is not trained with the encoder it sits on; KL and
    IS are not reported with this embedder.

    Args:
        checkpoint: a non-fusion LAION-CLAP checkpoint (``630k-audioset-best.pt``, ``630k-best.pt``).
        crop_seed: seeds the window of clips longer than 10 s.
    """

    fd_unit = "clip"

    def __init__(self, checkpoint: str | os.PathLike, crop_seed: int = 0):
        super().__init__()
        self.clap = ClapModel(checkpoint, text=False)
        self.name, self.weights_sha256 = self.clap.name, self.clap.weights_sha256
        self.sample_rate, self.dim, self.crop_seed = SAMPLE_RATE, self.clap.dim, crop_seed

    @torch.no_grad()
    def frame_embeddings(self, wave: Tensor, sample_rate: int | None = None) -> Tensor:
        """(B, N) or (N,) at ``sample_rate`` (48 kHz when None) → (B, 1, 512)."""
        x = torch.as_tensor(wave, dtype=torch.float32)
        x = x.unsqueeze(0) if x.dim() == 1 else x
        if x.dim() != 2:
            raise ValueError(f"{self.name}: expected waveforms (B, N) or (N,), got shape {tuple(x.shape)}")
        clips = torch.cat([self.clap.prepare_audio(c, sample_rate, torch.Generator().manual_seed(self.crop_seed))
                           for c in x])  # (B, 480000): 10 s at 48 kHz each
        return self.clap.project_audio(self.clap.audio_branch(clips)[0]).unsqueeze(1)  # (B, 512) -> (B, 1, 512)
