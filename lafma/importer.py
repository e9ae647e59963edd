"""Published weights → a bundle: the released LAFMA LFM and VAEGAN, AudioLDM's HiFi-GAN (or the
``vae/`` and ``vocoder/`` of a diffusers AudioLDM directory) and a FLAN-T5 encoder become one
directory that :func:`lafma.bundle.load_bundle` opens, so generation, evaluation and the
registry treat them like anything trained here.

Each file is converted once (read with ``weights_only=True``), loaded strictly into the module
its shapes describe, and written as safetensors carrying the mel-config hash. The bundle's
config says what the shapes cannot: the released objective (σ_min 0, t × 999), the released
head split, and the released sampler (its Euler grid, unconditional input and output peak);
``key=value`` overrides any of it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from safetensors.torch import save_file

from lafma.bundle import file_sha256, write_bundle
from lafma.config import ConfigError, LafmaConfig, apply_overrides, from_dict, merge, to_dict
from lafma.convert.checkpoint import CheckpointError
from lafma.convert.unet import convert_unet
from lafma.convert.vae import convert_vae
from lafma.convert.vocoder import convert_vocoder
from lafma.models import build_unet, build_vae, build_vocoder

# What the released code does and the shapes cannot say (DESIGN.md, "The released code").
RELEASED = {
    "flow": {"sigma_min": 0.0, "time_scale": 999.0},
    "sampler": {"solver": "euler", "steps": 10, "guidance": 3.0, "grid": "released", "null_caption": "released",
                "peak_normalize": True, "peak": 0.8},
}


# The released script tokenises captions up to the tokenizer's 512 tokens.
RELEASED_TEXT_LENGTH = 512


def _text_section(text_encoder: str) -> dict:
    """``--text-encoder``: a local ``save_pretrained`` directory (its config says T5 or not) or a hub id."""
    config = os.path.join(text_encoder, "config.json")
    if os.path.isfile(config):
        with open(config) as f:
            kind = "t5" if json.load(f).get("model_type") in ("t5", "mt5", "umt5") else "minilm"
        return {"kind": kind, "name_or_path": os.path.abspath(text_encoder), "max_length": RELEASED_TEXT_LENGTH}
    if os.path.exists(text_encoder):
        raise ConfigError("--text-encoder", f"{text_encoder} is not a save_pretrained directory (no config.json)")
    return {"kind": "t5", "name_or_path": text_encoder, "max_length": RELEASED_TEXT_LENGTH}


def _source(path: str, fmt: str) -> dict:
    """Provenance of one source: its name, format and the SHA-256 of every file in it."""
    name = os.path.basename(path.rstrip("/"))
    if os.path.isfile(path):
        return {"path": os.path.abspath(path), "name": name, "format": fmt, "sha256": {name: file_sha256(path)}}
    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
    return {"path": os.path.abspath(path), "name": name, "format": fmt,
            "sha256": {f: file_sha256(os.path.join(path, f)) for f in files}}


def imported_config(*, unet: Mapping, vae: Mapping, vocoder: Mapping, vocoder_mel: Mapping, text: Mapping,
                    base: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> LafmaConfig:
    """The bundle's config: ``base`` (a YAML's sections), the architectures read from the files,
    the released objective and sampler, then ``overrides``.

    Raises:
        ConfigError: naming the key, when the vocoder's declared mel settings differ from the
            config's, or the text encoder's width from the UNet's context width.
    """
    data = merge(dict(base or {}), {
        "unet": dict(unet), "vocoder": {**vocoder, "kind": "hifigan"}, "text": dict(text),
        # The published VAEs were trained on the raw log-mel (no normalisation).
        "vae": {**vae, "mel_mean": 0.0, "mel_std": 1.0}, **RELEASED})
    apply_overrides(data, overrides)
    cfg = from_dict(LafmaConfig, data)
    cfg.validate()
    mel = to_dict(cfg.mel)
    for key, value in vocoder_mel.items():
        if key in mel and float(mel[key]) != float(value):
            raise ConfigError(f"mel.{key}", f"the vocoder was trained with {key} = {value:g}, the config has "
                                            f"{mel[key]:g}: pass mel.{key}={value:g} or the matching vocoder")
    width = cfg.text.dim
    if width != cfg.context_dim:
        raise ConfigError("unet.context_dim", f"the LFM cross-attends to {cfg.context_dim}-d text, the text encoder "
                                              f"{cfg.text.name_or_path} gives {width}-d: pass the encoder the LFM "
                                              "was trained with (FLAN-T5-Large for the released LAFMA)")
    return cfg


def import_published(*, lfm: str, vae: str, vocoder: str, text_encoder: str, out_dir: str,
                     vocoder_config: str | None = None, base: Mapping[str, Any] | None = None,
                     overrides: Sequence[str] = ()) -> dict:
    """Convert the published files into the bundle directory ``out_dir``.

    Args:
        lfm: the released LFM checkpoint (``{"model": …}``, keys ``unet.…``) or an LDM checkpoint.
        vae: the released VAEGAN (``{"autoencoder": …}``), an LDM checkpoint, or a diffusers ``vae/``.
        vocoder: AudioLDM's ``hifigan_16k_64bins.ckpt`` or a diffusers ``vocoder/`` directory.
        text_encoder: a local ``save_pretrained`` directory or a hub id (FLAN-T5-Large).
        out_dir: where the bundle is written (created; an existing bundle is replaced).
        vocoder_config: the HiFi-GAN JSON (default: ``<vocoder without .ckpt>.json`` if present).
        base: config sections to start from (e.g. ``configs/lafma_audiocaps.yaml``'s).
        overrides: ``key=value`` applied last (``unet.num_heads=8``, ``sampler.steps=200``).

    Returns:
        The bundle manifest; its ``lineage.sources`` names every source file and its SHA-256.

    Raises:
        CheckpointError: a file that is unsafe to read or not the expected layout.
        ConfigError: the components or the text encoder do not fit together (the key is named).
    """
    if vocoder_config is None and os.path.isfile(vocoder):
        guess = os.path.splitext(vocoder)[0] + ".json"
        vocoder_config = guess if os.path.isfile(guess) else None
    u, v, g = convert_unet(lfm), convert_vae(vae), convert_vocoder(vocoder, vocoder_config)
    cfg = imported_config(unet=u.config, vae=v.config, vocoder=g.config, vocoder_mel=g.mel,
                          text=_text_section(text_encoder), base=base, overrides=overrides)
    meta = {"mel_hash": cfg.mel.config_hash()}
    sources = {"lfm": _source(lfm, u.source), "vae": _source(vae, v.source), "vocoder": _source(vocoder, g.source)}
    if vocoder_config:
        sources["vocoder_config"] = _source(vocoder_config, "hifigan-json")
    with tempfile.TemporaryDirectory(prefix="lafma-import-") as tmp:
        weights = {}
        for component, converted, build in (("unet", u, build_unet), ("vae", v, build_vae),
                                            ("vocoder", g, build_vocoder)):
            module = build(cfg)
            try:  # strict: every tensor in the file has a place, every parameter a tensor
                module.load_state_dict(converted.state_dict, strict=True)
            except RuntimeError as err:
                raise CheckpointError(f"{sources[component if component != 'unet' else 'lfm']['path']} does not "
                                      f"fit the {component} its shapes describe: {err}") from None
            weights[component] = os.path.join(tmp, f"{component}.safetensors")
            tensors = {k: t.detach().float().contiguous() for k, t in module.state_dict().items()}
            save_file(tensors, weights[component], metadata={**meta, "component": component})
        components = {c: to_dict(cfg) for c in weights}
        return write_bundle(out_dir, components=components, weights=weights,
                            lineage={"imported": True, "sources": sources})
