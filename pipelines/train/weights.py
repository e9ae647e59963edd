"""Trained weights on storage: ``<component>.safetensors`` beside the config that made them."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors.torch import load, save

from lafma.config import to_dict
from pipelines.config import PipelineConfig
from pipelines.core import storage


def export_weights(state_dict: Mapping[str, torch.Tensor], cfg: PipelineConfig, out_dir: str,
                   component: str) -> None:
    """Write ``<component>.safetensors`` (fp32) and ``config.json`` (the whole resolved config).

    Both carry the mel hash, so a component trained on other mels cannot be paired by mistake.
    """
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state_dict.items()}
    meta = {"mel_hash": cfg.mel.config_hash(), "component": component}
    storage.write_bytes(storage.join(out_dir, f"{component}.safetensors"), save(tensors, metadata=meta))
    storage.write_json(storage.join(out_dir, "config.json"), {**meta, "config": to_dict(cfg)})


def load_weights(uri: str) -> dict[str, torch.Tensor]:
    """A safetensors file (local or remote) as a state dict."""
    return load(storage.read_bytes(uri))
