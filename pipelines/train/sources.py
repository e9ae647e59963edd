"""Weights from elsewhere: ``vae.pretrained`` / ``vocoder.pretrained`` (use a component as it is)
and ``train_<job>.init_from`` (start a job from it, i.e. fine-tune).

A source is a bundle directory, a registered model (``models:/lafma/3``, ``runs:/<id>/model``) or
a published checkpoint of the component (the files :mod:`lafma.importer` reads). The weights
decide the architecture, so :func:`resolve_sources` overlays the source's architecture on the
config before anything is hashed or built, and refuses — naming the key — a source trained on
other mels or whose tensors do not fit.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lafma.bundle import MANIFEST, check_bundle, tree_sha256
from lafma.config import ConfigError, from_dict, to_dict
from lafma.convert.checkpoint import CheckpointError
from lafma.models import build_unet, build_vae, build_vocoder
from pipelines.config import PipelineConfig

# Fields the weights determine, per component (config section → fields); the rest stays the config's.
ARCHITECTURE = {
    "vae": {"vae": ("in_channels", "ch", "ch_mult", "num_res_blocks", "z_channels", "mid_attention",
                    "mel_mean", "mel_std")},
    "vocoder": {"vocoder": ("upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel",
                            "resblock_kernel_sizes", "resblock_dilation_sizes", "upsample_padding")},
    # The LFM also brings the objective and the latent scale it was trained with.
    "unet": {"unet": ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                      "attention_resolutions", "num_head_channels", "num_heads", "transformer_depth",
                      "context_dim", "use_scale_shift_norm", "extra_attention", "pooled_context",
                      "duration_embedding", "position_channels"),
             "flow": ("sigma_min", "time_scale"), "vae": ("scale_factor",)},
}
BUILD = {"unet": build_unet, "vae": build_vae, "vocoder": build_vocoder}
# Config keys that name a source, and the component each one's weights are.
KEYS = {"vae.pretrained": "vae", "vocoder.pretrained": "vocoder", "train_vae.init_from": "vae",
        "train_vocoder.init_from": "vocoder", "train_lfm.init_from": "unet"}


@dataclass
class Source:
    """One component's weights from a source, in this project's names.

    Attributes:
        state_dict: loads strictly into the component built from the resolved config.
        sections: the config fields the weights bring (``{"vae": {...}}``), see :data:`ARCHITECTURE`.
        mel_hash: the mel config the weights were trained on, when the source records it.
        mel: mel fields the source declares (a published vocoder's JSON).
        sha256: identifies the weights (a bundle's recorded digest, or the file's).
        format: what the source was ("bundle", "lafma-released", "hifigan", ...).
        origin: for a bundle made by ``lafma import``, the published file it came from and
            its SHA-256 ("" otherwise).
    """

    state_dict: dict[str, torch.Tensor]
    sections: dict
    mel_hash: str | None
    mel: dict
    sha256: str
    format: str
    origin: str = ""


def _sections(component: str, config: Mapping) -> dict:
    return {sec: {f: config[sec][f] for f in fields if f in config.get(sec, {})}
            for sec, fields in ARCHITECTURE[component].items()}


def _bundle_dir(uri: str, root: str, tmp: str) -> str | None:
    """A local bundle directory for ``uri``: itself, or a registered model's bundle downloaded."""
    if os.path.isfile(os.path.join(uri, MANIFEST)):
        return uri
    if not uri.startswith(("models:/", "runs:/")):
        return None
    from pipelines.core.registry import download_bundle

    return download_bundle(uri, root=root, dst=tmp)


def _published(component: str, path: str, num_heads: int) -> Source:
    if component == "unet":
        from lafma.convert.unet import convert_unet

        c = convert_unet(path, num_heads=num_heads)
        # The shapes give the architecture; the objective (sigma_min, time_scale) stays the
        # config's (its defaults are the released ones). The released LFM decodes unscaled latents.
        config = {"unet": c.config, **({"vae": {"scale_factor": 1.0}} if c.source == "lafma-released" else {})}
        return Source(c.state_dict, _sections(component, config), None, {}, tree_sha256(path), c.source)
    if component == "vae":
        from lafma.convert.vae import convert_vae

        c = convert_vae(path)
        config = {"vae": {**c.config, "mel_mean": 0.0, "mel_std": 1.0}}
        return Source(c.state_dict, _sections(component, config), None, {}, tree_sha256(path), c.source)
    from lafma.convert.vocoder import convert_vocoder

    c = convert_vocoder(path)
    return Source(c.state_dict, _sections(component, {"vocoder": c.config}), None, dict(c.mel), tree_sha256(path),
                  c.source)


def _stamp(uri: str) -> tuple:
    """What changes when a local source changes: every file's path, size and mtime."""
    if uri.startswith(("models:/", "runs:/")):
        return ()
    files = [uri] if os.path.isfile(uri) else [os.path.join(d, f) for d, _, fs in sorted(os.walk(uri)) for f in sorted(fs)]
    return tuple((f, (st := os.stat(f)).st_size, st.st_mtime_ns) for f in files)


# One entry per component a run can name (an LFM state dict at paper size is 1.1 GB).
@functools.lru_cache(maxsize=3)
def _read(component: str, uri: str, root: str, stamp: tuple, num_heads: int) -> Source:
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="lafma-source-") as tmp:
        bundle = _bundle_dir(uri, root, tmp)
        if bundle is None:
            return _published(component, uri, num_heads)
        manifest = check_bundle(bundle)
        entry = manifest["components"][component]
        sd = load_file(os.path.join(bundle, entry["file"]))
        published = manifest.get("lineage", {}).get("sources", {}).get("lfm" if component == "unet" else component)
        origin = ", ".join(f"{f} sha256:{h}" for f, h in published["sha256"].items()) if published else ""
        return Source(sd, _sections(component, entry["config"]), entry["mel_hash"], {}, entry["sha256"], "bundle",
                      origin)


def read_source(component: str, uri: str, *, root: str, key: str, num_heads: int = 0) -> Source:
    """The weights of ``component`` (``unet``, ``vae`` or ``vocoder``) at ``uri``.

    Args:
        num_heads: a published LFM's head split (not in its shapes); 0: the released 32.

    Raises:
        ConfigError: naming ``key``, when ``uri`` cannot be read or is not such weights.
    """
    from lafma.convert.unet import RELEASED_NUM_HEADS

    num_heads = (num_heads or RELEASED_NUM_HEADS) if component == "unet" else 0  # one cache entry per source
    local = not uri.startswith(("models:/", "runs:/"))
    if local and not os.path.exists(uri):
        raise ConfigError(key, f"{uri}: no such file or directory")
    try:
        return _read(component, uri, root, _stamp(uri), num_heads)
    except (CheckpointError, KeyError, OSError, ValueError) as e:
        raise ConfigError(key, f"cannot use {uri} as the {component}: {e}") from None


def resolve_sources(cfg: PipelineConfig, root: str) -> tuple[PipelineConfig, dict[str, dict]]:
    """Overlay each named source's architecture on ``cfg`` and check that it fits.

    Returns:
        The resolved config and, per config key that names a source, ``{"uri", "sha256",
        "format"}`` (what stage hashes and the registry's lineage record).

    Raises:
        ConfigError: naming the key — a source that is unreadable, trained on other mels than
            ``cfg.mel``, or whose weights do not load into the component it describes.
    """
    named = {k: v for k, v in ((k, _get(cfg, k)) for k in KEYS) if v}
    if not named:
        return cfg, {}
    for comp in ("vae", "vocoder"):
        if f"{comp}.pretrained" in named and f"train_{comp}.init_from" in named:
            raise ConfigError(f"train_{comp}.init_from", f"{comp}.pretrained uses a {comp} as it is; "
                                                         "fine-tuning one needs init_from alone")
    if "vocoder.pretrained" in named and cfg.vocoder.kind != "hifigan":
        raise ConfigError("vocoder.kind", "vocoder.pretrained is a HiFi-GAN: set vocoder.kind=hifigan")
    data = to_dict(cfg)
    sources = {}
    for key, uri in named.items():
        src = read_source(KEYS[key], uri, root=root, key=key, num_heads=cfg.unet.num_heads)
        for section, fields in src.sections.items():
            data[section] = {**data[section], **fields}
        sources[key] = (src, {"uri": uri, "sha256": src.sha256, "format": src.format,
                              **({"origin": src.origin} if src.origin else {})})
    resolved = from_dict(PipelineConfig, data)
    resolved.validate()
    for key, (src, _) in sources.items():
        _check_fits(resolved, key, src)
    if "train_lfm.init_from" in sources and resolved.text.dim != resolved.context_dim:
        # Found now, not after the text stage has encoded every caption.
        raise ConfigError("text.name_or_path", f"train_lfm.init_from's LFM cross-attends to {resolved.context_dim}-d "
                                               f"text; {resolved.text.name_or_path} gives {resolved.text.dim}-d: use "
                                               "the encoder it was trained with")
    return resolved, {k: info for k, (_, info) in sources.items()}


def _get(cfg: PipelineConfig, key: str) -> str:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _check_fits(cfg: PipelineConfig, key: str, src: Source) -> None:
    component = KEYS[key]
    if src.mel_hash is not None and src.mel_hash != cfg.mel.config_hash() and component != "unet":
        raise ConfigError(key, f"was trained on mel config {src.mel_hash}, this config's is {cfg.mel.config_hash()}: "
                               "use the same mel settings (mel.*) or a matching component")
    mel = to_dict(cfg.mel)
    for field, value in src.mel.items():
        if field in mel and float(mel[field]) != float(value):
            raise ConfigError(key, f"was trained with mel.{field} = {value:g}, this config has {mel[field]:g}")
    module = BUILD[component](cfg)
    try:
        module.load_state_dict(src.state_dict, strict=True)
    except RuntimeError as e:
        raise ConfigError(key, f"its weights do not fit the {component} the config describes: {e}") from None


def source_weights(cfg: PipelineConfig, key: str, root: str) -> dict[str, torch.Tensor]:
    """The state dict a resolved ``key`` names (read once per process: cached)."""
    return read_source(KEYS[key], _get(cfg, key), root=root, key=key, num_heads=cfg.unet.num_heads).state_dict

