"""The released LAFMA UNet (LDM's ``openaimodel.UNetModel`` layout) → :class:`lafma.unet.UNet`.

Our UNet keeps LDM's module tree (``input_blocks``, ``middle_block``, ``output_blocks``,
``time_embed``, ``out``) and differs in four names only, so the conversion is a rename plus
an architecture read off the tensor shapes:

=====================================  ==========================
LDM / released LAFMA                   here
=====================================  ==========================
``<resblock>.out_layers.0`` (norm)     ``<resblock>.out_norm``
``<resblock>.out_layers.3`` (conv)     ``<resblock>.out_layers.2``
``<resblock>.skip_connection``         ``<resblock>.skip``
``<transformer>.transformer_blocks``   ``<transformer>.blocks``
``ff.net.0`` / ``ff.net.2``            ``ff.0`` / ``ff.2``
=====================================  ==========================

What shapes cannot tell is the head split: the released model has 32 heads in every layer
(LDM's "legacy" ``num_heads``), which the caller may override.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

from lafma.convert.checkpoint import CheckpointError, load_checkpoint, state_dict_from

# The released config: 32 heads per attention layer whatever its width (exp_config_lfm.json).
RELEASED_NUM_HEADS = 32
# Prefixes under which published files keep the UNet: the released AudioLDM wrapper, a full
# LDM / AudioLDM training checkpoint.
PREFIXES = ("unet.", "model.diffusion_model.")  # their sources: "lafma-released", "ldm"

_RENAMES = (
    (re.compile(r"\.out_layers\.0\."), ".out_norm."),
    (re.compile(r"\.out_layers\.3\."), ".out_layers.2."),
    (re.compile(r"\.skip_connection\."), ".skip."),
    (re.compile(r"\.transformer_blocks\."), ".blocks."),
    (re.compile(r"\.ff\.net\.(\d)\."), r".ff.\1."),
)


@dataclass
class ConvertedUNet:
    """A UNet state dict in this project's names and the :class:`~lafma.config.UNetConfig`
    fields it was read with."""

    state_dict: dict[str, Tensor]
    config: dict = field(default_factory=dict)
    source: str = ""


def _strip_prefix(sd: Mapping[str, Tensor], path: str) -> tuple[dict[str, Tensor], str]:
    for prefix, source in zip(PREFIXES, ("lafma-released", "ldm")):
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, source
    if "input_blocks.0.0.weight" in sd:
        return dict(sd), "ldm-unet"
    raise CheckpointError(f"{path}: no UNet found (expected keys under {' or '.join(PREFIXES)}, "
                          "e.g. unet.input_blocks.0.0.weight)")


def rename_ldm_keys(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """LDM ``UNetModel`` keys → :class:`lafma.unet.UNet` keys (prefix already removed).

    A transformer's ``proj_in`` / ``proj_out`` stored as a linear layer (SD 2's
    ``use_linear_in_transformer``) becomes the equivalent 1×1 conv.
    """
    out = {}
    for key, value in sd.items():
        for pattern, repl in _RENAMES:
            key = pattern.sub(repl, key)
        if re.search(r"\.proj_(in|out)\.weight$", key) and value.dim() == 2:
            value = value[:, :, None, None]  # (out, in) → (out, in, 1, 1)
        out[key] = value
    return out


def _blocks(sd: Mapping[str, Tensor], name: str) -> list[int]:
    return sorted({int(k.split(".")[1]) for k in sd if k.startswith(name + ".")})


def infer_unet_config(sd: Mapping[str, Tensor]) -> dict:
    """UNetConfig fields determined by the tensor shapes of a renamed state dict.

    Raises:
        CheckpointError: the layout is not an LDM UNet this project can build.
    """
    try:
        model_channels, in_channels = sd["input_blocks.0.0.weight"].shape[:2]
        out_channels = sd["out.2.weight"].shape[0]
    except KeyError as missing:
        raise CheckpointError(f"not an LDM UNet: no {missing}") from None
    levels: list[list[int]] = [[]]  # input block indices of each level's res blocks
    for i in _blocks(sd, "input_blocks")[1:]:
        if f"input_blocks.{i}.0.op.weight" in sd:
            levels.append([])
        elif f"input_blocks.{i}.0.in_layers.2.weight" in sd:
            levels[-1].append(i)
        else:
            raise CheckpointError(f"input_blocks.{i} is neither a res block nor a downsample")
    counts = {len(level) for level in levels}
    if len(counts) != 1 or 0 in counts:
        raise CheckpointError(f"levels have different numbers of res blocks: {[len(x) for x in levels]}")
    mults, attention, transformers = [], [], set()
    for level, blocks in enumerate(levels):
        width = sd[f"input_blocks.{blocks[0]}.0.in_layers.2.weight"].shape[0]
        if width % model_channels:
            raise CheckpointError(f"level {level} has {width} channels, not a multiple of {model_channels}")
        mults.append(width // model_channels)
        n = sum(f"input_blocks.{blocks[0]}.{j}.norm.weight" in sd for j in (1, 2))
        if n:
            attention.append(2**level)
            transformers.add(n)
    mid = sum(f"middle_block.{j}.norm.weight" in sd for j in (1, 2))
    transformers.add(mid)
    if len(transformers) != 1 or not mid:
        raise CheckpointError(f"transformers per attention site differ ({sorted(transformers)}) or the middle "
                              "block has none: not a layout this UNet builds")
    site = next(k for k in sd if ".blocks." in k and k.endswith("attn2.to_k.weight"))
    prefix = site.split(".blocks.")[0]
    depth = len({k.split(".blocks.")[1].split(".")[0] for k in sd if k.startswith(prefix + ".blocks.")})
    emb_out = sd[f"input_blocks.{levels[0][0]}.0.emb_layers.1.weight"].shape[0]
    return dict(in_channels=int(in_channels), out_channels=int(out_channels), model_channels=int(model_channels),
                channel_mult=tuple(mults), num_res_blocks=len(levels[0]), attention_resolutions=tuple(sorted(attention, reverse=True)),
                transformer_depth=depth, context_dim=int(sd[site].shape[1]),
                use_scale_shift_norm=emb_out == 2 * mults[0] * model_channels,
                extra_attention=transformers == {2})


def convert_unet(path: str, num_heads: int = RELEASED_NUM_HEADS) -> ConvertedUNet:
    """Read a released LAFMA LFM checkpoint (``{"model": state_dict}`` of its ``AudioLDM``
    wrapper, keys ``unet.…``) or an LDM checkpoint (``{"state_dict": …}``, keys
    ``model.diffusion_model.…``) into this project's UNet names.

    Args:
        path: the checkpoint file (torch pickle read with ``weights_only=True``, or safetensors).
        num_heads: attention heads per layer (not visible in the shapes; the released model: 32).

    Returns:
        :class:`ConvertedUNet` whose state dict loads strictly into ``UNet(**config)``.

    Raises:
        CheckpointError: unreadable, unsafe, or not an LDM UNet.
    """
    sd, source = _strip_prefix(state_dict_from(load_checkpoint(path), ("model", "state_dict"), path), path)
    sd = rename_ldm_keys(sd)
    if "label_emb.weight" in sd:
        raise CheckpointError(f"{path}: a class-conditional UNet (label_emb); LAFMA's is text-conditional only")
    config = {**infer_unet_config(sd), "num_heads": num_heads}
    return ConvertedUNet(sd, config, source)
