"""Audio embedders behind one interface, and the table that builds them by name."""

from __future__ import annotations

import os

from lafma.metrics.embedders.aisfx import AisfxEmbedder, convert_aisfx, ensure_aisfx_weights
from lafma.metrics.embedders.base import AudioEmbedder
from lafma.metrics.embedders.checkpoints import CheckpointFormatError, sha256_file
from lafma.metrics.embedders.clap import ClapEmbedder, ClapModel, read_clap_state
from lafma.metrics.embedders.panns import PannsCnn14Embedder
from lafma.metrics.embedders.vggish import VGGishEmbedder

# kind -> constructor taking the weight file first. Explicit, never import-by-string.
EMBEDDERS = {
    "aisfx": AisfxEmbedder,
    "clap": ClapEmbedder,
    "panns_cnn14_16k": lambda path, **kw: PannsCnn14Embedder(path, preset="16k", **kw),
    "panns_cnn14_32k": lambda path, **kw: PannsCnn14Embedder(path, preset="32k", **kw),
    "vggish": VGGishEmbedder,
}


def build_embedder(kind: str, path: str | os.PathLike, **kwargs) -> AudioEmbedder:
    """Construct the embedder ``kind`` from its weight file (see :data:`EMBEDDERS`)."""
    if kind not in EMBEDDERS:
        raise ValueError(f"unknown embedder {kind!r}; choose one of {sorted(EMBEDDERS)}")
    return EMBEDDERS[kind](path, **kwargs)


__all__ = [
    "EMBEDDERS",
    "AisfxEmbedder",
    "AudioEmbedder",
    "CheckpointFormatError",
    "ClapEmbedder",
    "ClapModel",
    "PannsCnn14Embedder",
    "VGGishEmbedder",
    "build_embedder",
    "convert_aisfx",
    "ensure_aisfx_weights",
    "read_clap_state",
    "sha256_file",
]
