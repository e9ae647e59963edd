"""LAION-CLAP from a user-supplied checkpoint: layout validation, text tower and projection heads.

A published LAION-CLAP checkpoint (``630k-audioset-best.pt`` and its siblings) is a dict
whose ``"state_dict"`` holds, under a ``module.`` prefix (it was saved from DDP):

* ``audio_branch.*``: the audio encoder, HTS-AT (a Swin transformer over log-mels) for the
  published checkpoints, or PANNs Cnn14 for some early ones;
* ``text_branch.*``: a RoBERTa-base encoder in Hugging Face naming;
* ``audio_projection.{0,2}.*`` and ``text_projection.{0,2}.*``: Linear → ReLU → Linear heads
  into the 512-d joint space; ``audio_transform`` / ``text_transform``: training-only MLPs;
* ``logit_scale_a``, ``logit_scale_t``: learnt temperatures.

What is implemented: the full layout check (every group, the projection shapes, the encoder
type), the text tower (RoBERTa rebuilt by ``transformers`` from the checkpoint's own shapes,
with a tokenizer the user supplies from a local directory, since no hub is reachable), and
both projection heads. What is not: the HTS-AT audio encoder. Reimplementing a Swin
transformer without the reference weights at hand to check it against would give numbers
that look like CLAP scores and are not, so :meth:`ClapModel.embed_audio` refuses; audio
features computed by the reference implementation can still be projected with
:meth:`ClapModel.project_audio` and scored with :func:`lafma.metrics.clap_score`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lafma.metrics.embedders.checkpoints import (
    CheckpointFormatError,
    check_state_dict,
    load_torch_file,
    require_file,
    sha256_file,
)

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


class ClapModel(nn.Module):
    """The parts of LAION-CLAP this project runs: text tower, projections, temperatures.

    Args:
        checkpoint: a ``630k-audioset-best.pt``-style file.
        tokenizer: a Hugging Face tokenizer object, or a local directory holding the
            ``roberta-base`` tokenizer files; ``None`` leaves :meth:`embed_text` unusable
            (:meth:`embed_text_ids` still works).
        num_heads: attention heads of the text encoder when not ``hidden / 64``.
    """

    def __init__(self, checkpoint: str | os.PathLike, tokenizer: Any = None, num_heads: int | None = None):
        super().__init__()
        path = require_file(checkpoint, LAYOUT)
        state, self.audio_kind = read_clap_state(path)
        self.audio_projection = _projection(state, "audio").eval().requires_grad_(False)
        self.text_projection = _projection(state, "text").eval().requires_grad_(False)
        self.register_buffer("logit_scale_a", state["logit_scale_a"].float().reshape(()))
        self.register_buffer("logit_scale_t", state["logit_scale_t"].float().reshape(()))
        self.text_branch = _roberta(state, path, num_heads)
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer), local_files_only=True)
        self.tokenizer = tokenizer
        self.name = f"laion-clap-{self.audio_kind}"
        self.weights_sha256 = sha256_file(path)
        self.dim = self.audio_projection[2].out_features

    @torch.no_grad()
    def embed_text_ids(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids (B, L) → unit-norm joint embeddings (B, 512), via RoBERTa's pooler output."""
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

    def embed_audio(self, wave: Tensor, sample_rate: int | None = None) -> Tensor:
        """Not implemented: the HTS-AT audio encoder is not rebuilt here (see the module docstring)."""
        raise NotImplementedError(
            f"{self.name}: the {self.audio_kind} audio encoder of LAION-CLAP is not implemented in "
            "lafma; compute its 'embedding' output with the reference code and pass it to project_audio()")
