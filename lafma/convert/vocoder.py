"""Published HiFi-GAN vocoders → :class:`lafma.vocoder.hifigan.HiFiGANGenerator`.

Two layouts hold the same network (HiFi-GAN V1 with ``ResBlock1``):

* the reference training code's, as AudioLDM publishes it (``hifigan_16k_64bins.ckpt`` and its
  ``.json``; LAFMA and Tango use that file): ``{"generator": state_dict}`` with the old
  ``torch.nn.utils.weight_norm`` split ``weight_g`` / ``weight_v``;
* a diffusers / transformers ``SpeechT5HifiGan`` directory (diffusers AudioLDM's ``vocoder/``):
  ``config.json`` plus plain weights, ``upsampler.{i}`` for ``ups.{i}``, and an optional input
  normalisation.

Both pad their transposed convs the reference way, so the imported config says
``upsample_padding="reference"``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lafma.config import HiFiGANConfig
from lafma.convert.checkpoint import CheckpointError, load_checkpoint, state_dict_from
from lafma.vocoder.hifigan import HiFiGANGenerator

# The HiFiGANConfig fields that shape the generator (the rest configure its discriminators).
GENERATOR_FIELDS = ("upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel",
                    "resblock_kernel_sizes", "resblock_dilation_sizes", "upsample_padding")
# Reference-config name → MelConfig field.
_MEL_FIELDS = {"sampling_rate": "sample_rate", "n_fft": "n_fft", "win_size": "win_length",
               "hop_size": "hop_length", "num_mels": "n_mels", "fmin": "f_min", "fmax": "f_max"}
# How a conv's parameters are spelt, old weight norm, new weight norm or none → our role name.
_PARAM_ROLES = {"parametrizations.weight.original0": "g", "parametrizations.weight.original1": "v",
                "weight_g": "g", "weight_v": "v", "weight": "w", "bias": "bias"}
_ROLE_KEYS = {"g": "weight_g", "v": "weight_v", "w": "weight", "bias": "bias"}
_WEIGHTS_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                  "diffusion_pytorch_model.bin")
_G, _V = "parametrizations.weight.original0", "parametrizations.weight.original1"
_CONV_PRE_POST_KERNEL = 7  # HiFiGANGenerator hard-codes it, as the reference does


@dataclass
class ConvertedVocoder:
    """A published vocoder in this project's terms.

    Attributes:
        state_dict: Loads strictly into ``HiFiGANGenerator(**config, n_mels=n_mels)``.
        config: The generator's :class:`~lafma.config.HiFiGANConfig` fields.
        n_mels: Mel bins of the input (conv_pre's input channels).
        mel: The mel settings the source states, as :class:`~lafma.config.MelConfig` field names;
            settings it leaves unstated are absent.
        source: The layout it was read from: ``"hifigan"`` or ``"speecht5_hifigan"``.
    """

    state_dict: dict[str, Tensor]
    config: dict[str, Any]
    n_mels: int
    mel: dict[str, Any] = field(default_factory=dict)
    source: str = "hifigan"

    def hifigan_config(self) -> HiFiGANConfig:
        return HiFiGANConfig(**self.config)

    def generator(self) -> HiFiGANGenerator:
        """The generator with these weights, in eval mode."""
        gen = HiFiGANGenerator(**self.config, n_mels=self.n_mels)
        gen.load_state_dict(self.state_dict, strict=True)
        return gen.eval()


def _few(keys: Sequence[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _group_by_layer(sd: Mapping[str, Tensor], rename: Callable[[str], str] = lambda p: p
                    ) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """``{"ups.0": {"g": ..., "v": ..., "bias": ...}, ...}`` and the keys that fit no role."""
    layers: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, tensor in sd.items():
        suffix = next((s for s in _PARAM_ROLES if key.endswith("." + s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        layers.setdefault(rename(key[:-len(suffix) - 1]), {})[_PARAM_ROLES[suffix]] = tensor
    return layers, unknown


def _norm_except_dim0(w: Tensor) -> Tensor:
    """(out, ...) → (out, 1, ...): weight norm's g for ``dim=0``."""
    return torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())), keepdim=True)


def _plain_weight(layer: Mapping[str, Tensor], name: str) -> Tensor:
    if "w" in layer:
        return layer["w"]
    if "g" in layer and "v" in layer:
        v = layer["v"]
        return v * (layer["g"] / _norm_except_dim0(v))  # weight norm, dim=0
    raise CheckpointError(f"{name}: has neither a weight nor a weight_g/weight_v pair")


def _to_generator_state(layers: Mapping[str, Mapping[str, Tensor]]) -> tuple[dict[str, Tensor], list[str]]:
    """Each conv's parameters as HiFiGANGenerator's weight-norm parametrisation holds them, and
    the keys of layers without a whole weight (left for the strict check to report)."""
    out, incomplete = {}, []
    for name, layer in layers.items():
        if not ("w" in layer or ("g" in layer and "v" in layer)):
            incomplete.extend(f"{name}.{_ROLE_KEYS[role]}" for role in layer)
            continue
        if "g" in layer and "v" in layer and "w" not in layer:
            out[f"{name}.{_G}"], out[f"{name}.{_V}"] = layer["g"], layer["v"]
        else:
            # Weight norm already folded away: v = w and g = ||w|| give g v / ||v|| = w.
            w = _plain_weight(layer, name)
            out[f"{name}.{_G}"], out[f"{name}.{_V}"] = _norm_except_dim0(w), w
        if "bias" in layer:
            out[f"{name}.bias"] = layer["bias"]
    return out, incomplete


def _check_loads(sd: Mapping[str, Tensor], config: Mapping[str, Any], n_mels: int, path: str,
                 unknown: Sequence[str] = ()) -> None:
    """Raise unless ``sd`` loads strictly into the generator ``config`` describes."""
    with torch.device("meta"):  # shapes only
        want = {k: v.shape for k, v in HiFiGANGenerator(**config, n_mels=n_mels).state_dict().items()}
    extra = [*unknown, *(k for k in sd if k not in want)]
    missing = [k for k in want if k not in sd]
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(s)}" for k, s in want.items() if k in sd and sd[k].shape != s]
    problems = [f"{what}: {_few(keys)}" for what, keys in
                (("unexpected keys", extra), ("missing keys", missing), ("wrong shapes", wrong)) if keys]
    if problems:
        raise CheckpointError(f"{path} does not fit HiFiGANGenerator({_describe(config)}, n_mels={n_mels}): "
                              + "; ".join(problems))


def _describe(config: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={config[k]}" for k in GENERATOR_FIELDS if k in config)


def _indices(layers: Mapping[str, Any], pattern: str) -> list[int]:
    found = sorted({int(m.group(1)) for name in layers if (m := re.fullmatch(pattern, name))})
    return found if found == list(range(len(found))) else []


def _infer_shapes(layers: Mapping[str, Mapping[str, Tensor]], path: str) -> dict[str, Any]:
    """What the tensor shapes fix: n_mels, widths, kernel sizes, convs per resblock."""
    def shape(name: str) -> torch.Size:
        if name not in layers:
            raise CheckpointError(f"{path}: no {name} weights; is this a HiFi-GAN generator?")
        weight = next((layers[name][role] for role in ("w", "v") if role in layers[name]), None)
        if weight is None:
            raise CheckpointError(f"{path}: {name} has no weight (weight, or weight_g with weight_v)")
        return weight.shape

    if any(re.fullmatch(r"resblocks\.\d+\.convs\.\d+", name) for name in layers):
        raise CheckpointError(f"{path} uses ResBlock2 (resblock \"2\"); HiFiGANGenerator only has ResBlock1")
    out_ch, n_mels, k = shape("conv_pre")
    stages = _indices(layers, r"ups\.(\d+)")
    blocks = _indices(layers, r"resblocks\.(\d+)\.convs1\.0")
    if not stages or not blocks or len(blocks) % len(stages) or k != _CONV_PRE_POST_KERNEL:
        raise CheckpointError(f"{path}: {len(stages)} upsampling stages, {len(blocks)} resblocks and a "
                              f"{k}-tap conv_pre do not make a HiFi-GAN V1 generator")
    per_stage = len(blocks) // len(stages)
    return {
        "n_mels": n_mels,
        "upsample_initial_channel": out_ch,
        "upsample_kernel_sizes": tuple(shape(f"ups.{i}")[-1] for i in stages),
        "resblock_kernel_sizes": tuple(shape(f"resblocks.{j}.convs1.0")[-1] for j in range(per_stage)),
        "dilations_per_block": tuple(len(_indices(layers, rf"resblocks\.{j}\.convs1\.(\d+)"))
                                     for j in range(per_stage)),
    }


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON config ({err})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: the config is a {type(cfg).__name__}, not an object")
    return cfg


def _config_from_json(cfg: Mapping[str, Any], shapes: Mapping[str, Any], path: str) -> dict[str, Any]:
    if str(cfg.get("resblock", "1")) != "1":
        raise CheckpointError(f"{path}: resblock {cfg['resblock']!r} (ResBlock2) is not supported; "
                              "HiFiGANGenerator only has ResBlock1")
    try:
        config = {"upsample_rates": tuple(cfg["upsample_rates"]),
                  "resblock_dilation_sizes": tuple(tuple(d) for d in cfg["resblock_dilation_sizes"])}
    except KeyError as err:
        raise CheckpointError(f"{path}: the config has no {err.args[0]!r}") from None
    # Where the config also states what the shapes fix, a disagreement means the wrong config.
    for key in ("upsample_kernel_sizes", "resblock_kernel_sizes", "upsample_initial_channel", "n_mels"):
        theirs = "num_mels" if key == "n_mels" else key
        stated = cfg.get(theirs)
        stated = tuple(stated) if isinstance(stated, list) else stated
        if stated is not None and stated != shapes[key]:
            raise CheckpointError(f"{path}: the config says {theirs}={stated} but the checkpoint's tensors "
                                  f"have {shapes[key]}; is it the config of another checkpoint?")
    if "hop_size" in cfg and cfg["hop_size"] != math.prod(config["upsample_rates"]):
        raise CheckpointError(f"{path}: hop_size {cfg['hop_size']} is not the product of upsample_rates "
                              f"{config['upsample_rates']}")
    return config


def convert_hifigan(path: str, config_path: str | None = None) -> ConvertedVocoder:
    """Import a reference-layout HiFi-GAN generator (AudioLDM's ``hifigan_16k_64bins.ckpt``).

    Args:
        path: ``{"generator": state_dict}`` (or the bare state dict), with ``weight_g`` /
            ``weight_v`` pairs or plain weights; torch.compile's ``_orig_mod.`` is dropped.
        config_path: The reference JSON config. Without it, ``<path stem>.json`` is used when it
            exists (AudioLDM publishes the pair so); otherwise the shapes must match the 16 kHz
            defaults, since upsample rates and dilations cannot be read from tensors.

    Returns:
        The converted generator with ``upsample_padding="reference"``.

    Raises:
        CheckpointError: unsafe or unreadable file, ResBlock2, an architecture the shapes do
            not determine and no config states, or keys that do not load strictly.
    """
    if config_path is None and os.path.isfile(sibling := os.path.splitext(path)[0] + ".json"):
        config_path = sibling
    sd = state_dict_from(load_checkpoint(path), ("generator", "state_dict"), path)
    layers, unknown = _group_by_layer(sd)
    shapes = _infer_shapes(layers, path)
    config = {k: shapes[k] for k in ("upsample_initial_channel", "upsample_kernel_sizes", "resblock_kernel_sizes")}
    mel = {"n_mels": shapes["n_mels"]}
    if config_path is not None:
        cfg = _read_json(config_path)
        config.update(_config_from_json(cfg, shapes, config_path))
        mel.update({ours: cfg[theirs] for theirs, ours in _MEL_FIELDS.items() if cfg.get(theirs) is not None})
    else:
        default = HiFiGANConfig()
        fits = (shapes["upsample_kernel_sizes"] == default.upsample_kernel_sizes
                and shapes["resblock_kernel_sizes"] == default.resblock_kernel_sizes
                and shapes["dilations_per_block"] == tuple(map(len, default.resblock_dilation_sizes)))
        if not fits:
            raise CheckpointError(
                f"{path}: kernel sizes {shapes['upsample_kernel_sizes']} / {shapes['resblock_kernel_sizes']} are "
                "not the 16 kHz vocoder's, so its upsample rates and dilations are unknown; pass its JSON "
                "config with --vocoder-config")
        config.update(upsample_rates=default.upsample_rates, resblock_dilation_sizes=default.resblock_dilation_sizes)
    config["upsample_padding"] = "reference"
    state, incomplete = _to_generator_state(layers)
    _check_loads(state, config, shapes["n_mels"], path, unknown + incomplete)
    return ConvertedVocoder(state, {k: config[k] for k in GENERATOR_FIELDS}, shapes["n_mels"], mel, "hifigan")


def _fold_normalisation(layer: Mapping[str, Tensor], mean: Tensor, scale: Tensor) -> dict[str, Tensor]:
    """conv(W, b)((x - mean) / scale) as conv(W', b')(x): W' = W / scale, b' = b - Σ W' mean.

    The fold is exact wherever conv_pre's kernel lies inside the input. Within 3 frames of
    either end the two differ: the source zero-pads the *normalised* mel, the folded conv the
    raw one, which is as if the source had padded with -mean / scale.
    """
    w = _plain_weight(layer, "conv_pre").double()  # (C, n_mels, 7)
    w_folded = w / scale.double()[None, :, None]  # per input channel (mel bin)
    bias = layer.get("bias", torch.zeros(w.shape[0], dtype=w.dtype)).double()
    bias = bias - (w_folded * mean.double()[None, :, None]).sum(dim=(1, 2))
    dtype = layer.get("w", layer.get("v")).dtype
    return {"w": w_folded.to(dtype), "bias": bias.to(dtype)}


def convert_speecht5_hifigan(directory: str) -> ConvertedVocoder:
    """Import a diffusers / transformers ``SpeechT5HifiGan`` directory (``save_pretrained``).

    Args:
        directory: Holds ``config.json`` and ``model.safetensors`` (or
            ``diffusion_pytorch_model.safetensors`` / ``pytorch_model.bin``).

    Returns:
        The converted generator with ``upsample_padding="reference"``. It takes
        ``(B, n_mels, T)``; SpeechT5HifiGan takes ``(B, T, n_mels)``.

    Raises:
        CheckpointError: missing files, a leaky ReLU slope other than 0.1, or weights that do
            not load strictly.
    """
    config_file = os.path.join(directory, "config.json")
    weights = next((os.path.join(directory, n) for n in _WEIGHTS_FILES if os.path.isfile(os.path.join(directory, n))),
                   None)
    if not os.path.isfile(config_file) or weights is None:
        raise CheckpointError(f"{directory}: expected config.json and one of {', '.join(_WEIGHTS_FILES)}")
    cfg = _read_json(config_file)
    if cfg.get("leaky_relu_slope", 0.1) != 0.1:
        raise CheckpointError(f"{directory}: leaky_relu_slope {cfg['leaky_relu_slope']} is not supported; "
                              "HiFiGANGenerator uses the reference slope 0.1")
    try:
        n_mels = cfg["model_in_dim"]
        config = {"upsample_rates": tuple(cfg["upsample_rates"]),
                  "upsample_kernel_sizes": tuple(cfg["upsample_kernel_sizes"]),
                  "upsample_initial_channel": cfg["upsample_initial_channel"],
                  "resblock_kernel_sizes": tuple(cfg["resblock_kernel_sizes"]),
                  "resblock_dilation_sizes": tuple(tuple(d) for d in cfg["resblock_dilation_sizes"]),
                  "upsample_padding": "reference"}
    except KeyError as err:
        raise CheckpointError(f"{config_file}: no {err.args[0]!r}") from None

    sd = state_dict_from(load_checkpoint(weights), ("state_dict",), weights)
    mean, scale = sd.pop("mean", None), sd.pop("scale", None)
    layers, unknown = _group_by_layer(sd, rename=lambda p: re.sub(r"^upsampler\.", "ups.", p))
    # transformers' default is True, so a config that omits the key normalises.
    if cfg.get("normalize_before", True):
        if mean is None or scale is None or "conv_pre" not in layers:
            raise CheckpointError(f"{weights}: normalize_before is set but mean, scale or conv_pre is missing")
        # HiFiGANGenerator has no input normalisation, and none is needed: it is affine per mel
        # bin and conv_pre is linear, so it folds into conv_pre's weight and bias.
        layers["conv_pre"] = _fold_normalisation(layers["conv_pre"], mean, scale)
    state, incomplete = _to_generator_state(layers)
    _check_loads(state, config, n_mels, weights, unknown + incomplete)
    mel = {"n_mels": n_mels, **({"sample_rate": cfg["sampling_rate"]} if "sampling_rate" in cfg else {})}
    return ConvertedVocoder(state, config, n_mels, mel, "speecht5_hifigan")


def convert_vocoder(path: str, config_path: str | None = None) -> ConvertedVocoder:
    """A ``SpeechT5HifiGan`` directory or a reference-layout checkpoint file, by what ``path`` is.

    Raises:
        CheckpointError: as the two converters, or ``config_path`` given with a directory
            (which carries its own ``config.json``).
    """
    if os.path.isdir(path):
        if config_path is not None:
            raise CheckpointError(f"{path} is a directory with its own config.json; --vocoder-config is only "
                                  "for reference-layout .ckpt files")
        return convert_speecht5_hifigan(path)
    return convert_hifigan(path, config_path)
