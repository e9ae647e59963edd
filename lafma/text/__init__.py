"""Text encoders with one interface: captions → (embeddings (B, L, D), mask (B, L))."""

from lafma.text.encoders import (
    TextEncoder,
    build_text_encoder,
    minilm_encoder,
    t5_encoder,
    tiny_t5_encoder,
)
from lafma.text.tokens import pad_embeddings

__all__ = ["TextEncoder", "build_text_encoder", "minilm_encoder", "pad_embeddings", "t5_encoder", "tiny_t5_encoder"]
