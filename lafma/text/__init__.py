"""Text encoders with one interface: captions → (embeddings (B, L, D), mask (B, L))."""

from lafma.text.encoders import (
    TextEncoder,
    build_text_encoder,
    minilm_encoder,
    t5_encoder,
    tiny_t5_encoder,
)

__all__ = ["TextEncoder", "build_text_encoder", "minilm_encoder", "t5_encoder", "tiny_t5_encoder"]
