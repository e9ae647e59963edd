"""Small checkpoints in the published files' exact layouts (the released LAFMA LFM and VAEGAN,
AudioLDM's HiFi-GAN + JSON, a FLAN-T5-style save_pretrained directory), for the import tests.

Written from this project's modules by renaming to the published key names; what the names mean
is checked elsewhere against diffusers' and transformers' own implementations."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lafma.unet import UNet
from lafma.vae.model import MelVAE
from lafma.vocoder.hifigan import HiFiGANGenerator


def ldm_unet_keys(sd: dict) -> dict:
    """This project's UNet names → the released (LDM openaimodel) names."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"\.out_layers\.2\.", ".out_layers.3.", k)
        k = re.sub(r"\.out_norm\.", ".out_layers.0.", k)
        k = re.sub(r"\.skip\.", ".skip_connection.", k)
        k = re.sub(r"\.blocks\.", ".transformer_blocks.", k)
        k = re.sub(r"\.ff\.(\d)\.", r".ff.net.\1.", k)
        out[k] = v
    return out


def perturbed(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Every parameter nudged at random: zero-initialised layers would hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def write_released_lfm(path: Path, unet: UNet) -> Path:
    torch.save({"model": {"unet." + k: v for k, v in ldm_unet_keys(unet.state_dict()).items()}}, path)
    return path


def write_released_vae(path: Path, vae: MelVAE) -> Path:
    torch.save({"autoencoder": vae.state_dict(), "discriminator": {"net.0.weight": torch.zeros(2)}}, path)
    return path


def write_audioldm_hifigan(path: Path, generator: HiFiGANGenerator, *, rates, kernels, initial, rk, rd,
                           n_mels: int = 64) -> Path:
    """``{"generator": …}`` with old-style weight norm (``weight_g`` / ``weight_v``), some keys
    prefixed ``_orig_mod.`` as torch.compile leaves them, and the JSON beside it."""
    sd = {}
    for i, (k, v) in enumerate(generator.state_dict().items()):
        k = k.replace(".parametrizations.weight.original0", ".weight_g").replace(
            ".parametrizations.weight.original1", ".weight_v")
        sd[("_orig_mod." if i % 3 == 0 else "") + k] = v
    torch.save({"generator": sd}, path)
    config = {"resblock": "1", "num_gpus": 1, "batch_size": 16, "learning_rate": 2e-4, "upsample_rates": list(rates),
              "upsample_kernel_sizes": list(kernels), "upsample_initial_channel": initial,
              "resblock_kernel_sizes": list(rk), "resblock_dilation_sizes": [list(d) for d in rd],
              "segment_size": 8192, "num_mels": n_mels, "num_freq": 513, "n_fft": 1024, "hop_size": 160,
              "win_size": 1024, "sampling_rate": 16000, "fmin": 0, "fmax": 8000, "fmax_for_loss": None}
    path.with_suffix(".json").write_text(json.dumps(config))
    return path


def save_tiny_t5(directory: Path, dim: int = 32, seed: int = 0) -> Path:
    """A FLAN-T5-shaped encoder directory (random weights, the file-free byte tokenizer)."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=dim, d_kv=8, d_ff=2 * dim, num_layers=1, num_heads=4,
                      dropout_rate=0.0, feed_forward_proj="gated-gelu")
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
