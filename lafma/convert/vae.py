"""Published mel VAEs → :class:`lafma.vae.MelVAE`.

Three layouts hold the same network (LDM's ``AutoencoderKL`` over a (B, 1, T, n_mels) mel image):

* LAFMA's released VAEGAN (Amphion's code): ``{"autoencoder": state_dict, ...}`` in LDM's names,
  without the middle self-attention, used with no latent scale;
* an AudioLDM (LDM) checkpoint: the VAE is the ``first_stage_model.`` part of ``state_dict``,
  next to the diffusion model, the text encoder and AudioLDM's HiFi-GAN (``vocoder.``);
* a diffusers ``AutoencoderKL`` directory (``config.json`` + weights), in diffusers' names.

MelVAE's names are LDM's, so the first two only lose their prefixes; diffusers' names are mapped
back to LDM's. Either way the architecture is read off the tensors, and the result is checked
key for key and shape for shape against the MelVAE it describes before it is returned.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lafma.convert.checkpoint import CheckpointError, load_checkpoint, state_dict_from
from lafma.vae.model import MelVAE

# Parts of a VAE's state dict that are not the autoencoder: LDM's discriminator and LPIPS live
# under ``loss.``; AudioLDM's AutoencoderKL carries its HiFi-GAN under ``vocoder.`` (converted
# on its own, by the vocoder converter).
_NOT_THE_VAE = ("loss.", "vocoder.")
_LDM_PREFIX = "first_stage_model."
# MelVAE's GroupNorm (LDM's Normalize) has 32 groups; LDM checkpoints do not store the number.
_GROUPS = 32
# diffusers' AutoencoderKL default when config.json has no scaling_factor (Stable Diffusion's).
_DIFFUSERS_DEFAULT_SCALE = 0.18215
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass
class ConvertedVAE:
    """A published VAE in this project's layout.

    Attributes:
        state_dict: loads strictly into ``MelVAE(**config)``.
        config: :class:`lafma.config.VAEConfig` field values (in_channels, ch, ch_mult,
            num_res_blocks, z_channels, mid_attention, scale_factor).
        source: the layout it was read from: ``"lafma-vaegan"``, ``"ldm-checkpoint"``,
            ``"vae-state-dict"`` or ``"diffusers"``.
    """

    state_dict: dict[str, Tensor]
    config: dict
    source: str

    def build(self) -> MelVAE:
        """The MelVAE with these weights, in eval mode."""
        vae = MelVAE(**self.config)
        vae.load_state_dict(self.state_dict, strict=True)
        return vae.eval()


def convert_vae(path: str | os.PathLike) -> ConvertedVAE:
    """Read a published mel VAE and map it onto :class:`lafma.vae.MelVAE`.

    Args:
        path: a diffusers ``AutoencoderKL`` directory (or a pipeline directory with ``vae/``),
            or a file: LAFMA's released ``{"autoencoder": sd}``, a full LDM / AudioLDM checkpoint
            (``state_dict`` with ``first_stage_model.`` keys), or a bare VAE state dict.

    Returns:
        The state dict, the architecture it implies and its latent scale: diffusers'
        ``scaling_factor``; an LDM checkpoint's stored ``scale_factor`` tensor, else 1.0; 1.0 for
        LAFMA's release, which scales nothing.

    Raises:
        CheckpointError: the file cannot be read safely, is not one of these layouts, has keys
            MelVAE lacks or lacks keys it has, or uses norm groups other than 32.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _from_diffusers(path)
    ckpt = load_checkpoint(path)
    scale = 1.0
    if isinstance(ckpt.get("autoencoder"), Mapping):
        source, sd = "lafma-vaegan", state_dict_from(ckpt, ["autoencoder"], path)
    else:
        sd = state_dict_from(ckpt, ["state_dict"], path)
        source = "vae-state-dict"
        if any(k.startswith(_LDM_PREFIX) for k in sd):
            source = "ldm-checkpoint"
            # LDM registers scale_factor as a buffer only with scale_by_std; otherwise it is
            # a constant of the YAML, which is not in the file.
            stored = sd.get("scale_factor")
            scale = float(stored) if isinstance(stored, Tensor) and stored.numel() == 1 else 1.0
            sd = {k[len(_LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(_LDM_PREFIX)}
    sd = _drop_extras(sd)
    config = _infer_config(sd, path)
    config["scale_factor"] = scale
    _check_loads(sd, config, path)
    return ConvertedVAE(sd, config, source)


def _drop_extras(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    # A DDP-wrapped model saved as is prefixes every key with "module.".
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.startswith(_NOT_THE_VAE)}


def _shape(sd: Mapping[str, Tensor], key: str, path: str) -> torch.Size:
    if key not in sd:
        raise CheckpointError(f"{path}: no {key!r}, so not an LDM/AudioLDM mel VAE "
                              f"(keys start {sorted(sd)[:5]})")
    return sd[key].shape


def _indices(sd: Mapping[str, Tensor], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})


def _infer_config(sd: Mapping[str, Tensor], path: str) -> dict:
    """Architecture from LDM-named tensors: widths from conv shapes, depths from key indices."""
    ch, in_channels = _shape(sd, "encoder.conv_in.weight", path)[:2]  # (ch, in, 3, 3)
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"{path}: encoder levels {levels} are not 0..n-1")
    widths = [_shape(sd, f"encoder.down.{i}.block.0.conv1.weight", path)[0] for i in levels]
    if any(w % _GROUPS for w in widths) or any(w % ch for w in widths):
        raise CheckpointError(f"{path}: level widths {widths} are not multiples of ch={ch} and of "
                              f"{_GROUPS} (MelVAE's GroupNorm groups)")
    return dict(
        in_channels=int(in_channels),
        ch=int(ch),
        ch_mult=tuple(int(w // ch) for w in widths),
        num_res_blocks=len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")),
        z_channels=int(_shape(sd, "post_quant_conv.weight", path)[0]),  # (z, z, 1, 1)
        mid_attention=any(k.startswith("encoder.mid.attn_1.") for k in sd),
    )


def _check_loads(sd: Mapping[str, Tensor], config: dict, path: str) -> None:
    """Refuse unless ``sd`` has exactly the keys and shapes of ``MelVAE(**config)``."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        want = {k: v.shape for k, v in MelVAE(**config).state_dict().items()}
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    wrong = sorted(f"{k} {tuple(sd[k].shape)} != {tuple(s)}" for k, s in want.items()
                   if k in sd and sd[k].shape != s)
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:4])}{', …' if len(keys) > 4 else ''}"
                for what, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
                if keys]
    if problems:
        raise CheckpointError(f"{path} does not match MelVAE({config}): " + "; ".join(problems))


def _from_diffusers(path: str) -> ConvertedVAE:
    root = os.path.join(path, "vae") if os.path.isfile(os.path.join(path, "vae", "config.json")) else path
    config_path = os.path.join(root, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path}: a directory without config.json (or vae/config.json), "
                              "so not a diffusers AutoencoderKL")
    with open(config_path) as f:
        dcfg = json.load(f)
    _check_diffusers_config(dcfg, config_path)
    weights = next((os.path.join(root, w) for w in _DIFFUSERS_WEIGHTS if os.path.isfile(os.path.join(root, w))),
                   None)
    if weights is None:
        raise CheckpointError(f"{root}: none of {', '.join(_DIFFUSERS_WEIGHTS)}")
    sd = _diffusers_to_ldm(state_dict_from(load_checkpoint(weights), [], weights))
    config = _infer_config(sd, weights)
    # The tensors decide the architecture; config.json must agree with them.
    claimed = dict(
        in_channels=dcfg.get("in_channels", 3),
        ch=dcfg.get("block_out_channels", [64])[0],
        ch_mult=tuple(c // config["ch"] for c in dcfg.get("block_out_channels", [64])),
        num_res_blocks=dcfg.get("layers_per_block", 1),
        z_channels=dcfg.get("latent_channels", 4),
        mid_attention=dcfg.get("mid_block_add_attention", True),
    )
    if claimed != config:
        raise CheckpointError(f"{config_path} describes {claimed} but the weights are {config}")
    config["scale_factor"] = float(dcfg.get("scaling_factor", _DIFFUSERS_DEFAULT_SCALE))
    _check_loads(sd, config, weights)
    return ConvertedVAE(sd, config, "diffusers")


def _check_diffusers_config(dcfg: dict, path: str) -> None:
    """Refuse the AutoencoderKL options MelVAE does not have, naming the option."""
    refusals = {
        "_class_name": (dcfg.get("_class_name", "AutoencoderKL") == "AutoencoderKL", "only AutoencoderKL"),
        "norm_num_groups": (dcfg.get("norm_num_groups", 32) == _GROUPS, f"MelVAE's GroupNorm has {_GROUPS} groups"),
        "act_fn": (dcfg.get("act_fn", "silu") == "silu", "MelVAE uses SiLU"),
        "down_block_types": (set(dcfg.get("down_block_types", ["DownEncoderBlock2D"])) == {"DownEncoderBlock2D"},
                             "only DownEncoderBlock2D"),
        "up_block_types": (set(dcfg.get("up_block_types", ["UpDecoderBlock2D"])) == {"UpDecoderBlock2D"},
                           "only UpDecoderBlock2D"),
        "out_channels": (dcfg.get("out_channels", 3) == dcfg.get("in_channels", 3), "must equal in_channels"),
        "use_quant_conv": (dcfg.get("use_quant_conv", True), "MelVAE has a quant_conv"),
        "use_post_quant_conv": (dcfg.get("use_post_quant_conv", True), "MelVAE has a post_quant_conv"),
        "shift_factor": (dcfg.get("shift_factor") in (None, 0, 0.0), "MelVAE scales latents but does not shift them"),
    }
    bad = [f"{name}={dcfg.get(name)!r} ({why})" for name, (ok, why) in refusals.items() if not ok]
    if bad:
        raise CheckpointError(f"{path}: cannot be a MelVAE: " + "; ".join(bad))


# diffusers → LDM, applied in order to each key. Older diffusers files name the attention's
# projections query/key/value/proj_attn instead of to_q/to_k/to_v/to_out.0.
_RENAMES = [
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
    (r"\.attn_1\.(?:to_q|query)\.", ".attn_1.q."),
    (r"\.attn_1\.(?:to_k|key)\.", ".attn_1.k."),
    (r"\.attn_1\.(?:to_v|value)\.", ".attn_1.v."),
    (r"\.attn_1\.(?:to_out\.0|proj_attn)\.", ".attn_1.proj_out."),
]


def _diffusers_to_ldm(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL names → LDM's; keys it does not know pass through (and are refused)."""
    # diffusers' decoder runs up_blocks 0..L-1 from the lowest resolution; LDM stores the same
    # levels as up.{L-1-i} (up.0 is full resolution) and runs them in reverse.
    n_up = len(_indices(sd, r"decoder\.up_blocks\.(\d+)\."))

    def up_level(m: re.Match) -> str:
        inner = "block." if m.group(2) == "resnets." else "upsample."
        return f"decoder.up.{n_up - 1 - int(m.group(1))}.{inner}"

    out = {}
    for key, value in sd.items():
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets\.|upsamplers\.0\.)", up_level, key)
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        if ".attn_1." in new and value.dim() == 2:
            value = value[:, :, None, None]  # Linear (C, C) → 1×1 conv (C, C, 1, 1)
        out[new] = value
    return out
